"""Winograd convolutions F(4x4, 3x3) and F(4x4, 5x5) for stride-1 convolutions on CPU.

A direct 3x3 convolution makes 9 multiply-adds per output and input channel; both
onnxruntime's NCHWc kernels and ours (:mod:`.cpu_conv`) already run those at close to the
FMA peak here, so the remaining way to be faster is to do fewer. Winograd's minimal filtering
algorithm computes a ``m x m`` output tile from a ``(m + r - 1)^2`` input tile with
``(m + r - 1)^2`` multiplications per channel pair instead of ``m^2 r^2``: F(4x4, 3x3) does
36 where the direct form does 144 (4x fewer), F(4x4, 5x5) 64 for 400 (6x). The price is three transforms (data, output,
and the weights', done once at compile time) and two intermediate tensors.

The rewrite (:class:`Winograd`, a Relax pass before the weight packing) turns
``conv2d [-> add(bias)] [-> relu] [-> max_pool2d]`` into three kernels:

1. ``winograd_data``: the input, zero-padded and channels-last (``wino_input``), cut into
   overlapping ``alpha x alpha`` tiles and transformed (``B^T d B`` as two passes,
   ``wino_rows`` then ``wino_data``), giving ``V [alpha^2, tiles, C]``;
2. ``matmul``: ``alpha^2`` independent ``[tiles, C] x [C, K]`` products with the transformed
   weights ``U = G g G^T`` (a constant), an ordinary batched matmul that
   :class:`~.cpu_matmul.BlockedMatmul` register-blocks;
3. ``winograd_output``: ``A^T M A`` per tile (``wino_cols``, ``wino_tile``), then bias, relu and
   the max pool (per tile, ``wino_pool``, when the tile holds whole windows), written NCHW
   (``wino_output``).

The tile count is padded so the matmul's rows come in register tiles of 4 (the padding tiles
read zeros and are never written out). Transform matrices are TVM's Cook-Toom construction
(``tvm.topi.nn.winograd_util``): in the kernels as constant coefficients (zeros skipped, ones
not multiplied; the schedule unrolls the tile loops so each sum is a fixed expression), in
float64 when folding the weights.

Measured (znver3). AV-MNIST's 32->64 3x3 + relu + 2x2 pool on 28x28, one thread, batch 1:
direct kernel 0.35-0.42 ms, Winograd 0.16 ms (data 0.03, matmul 0.09, output 0.04); batch 8,
2 threads, with its 64->64 on 14x14: 2.39 -> 1.26 ms. Its 16->32 5x5 on 56x56, 2 threads:
0.48 -> 0.26 ms with F(4x4, 5x5); F(2x2, 5x5) had measured 0.77 ms (784 tiles: 2-4 MB
intermediates). Whole models (2 threads, one process, 7 interleaved rounds, against
``winograd=False``; outputs within 4e-8 of onnxruntime): late fusion 0.86x / 0.77x (batch
1 / 8), AV-MNIST 0.57x / 0.76x. Rounding: one layer's outputs (up to 3.4) within 1.0e-5 of
onnxruntime with F(4x4, 5x5) and 3.6e-6 with F(4x4, 3x3), against 2.3e-6 and 1.8e-6 summed
directly. Not taken: convolutions under 8x8 outputs or 8 input channels.
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.relax import expr_functor

from mmcompile.targets.tvm.fuse_pool import whole_windows
from mmcompile.targets.tvm.rewrite import is_call, rewrite_functions
from mmcompile.targets.tvm.schedule_util import VectorRule, extent

# kernel size -> output tile size m: F(4x4, 3x3) (6x6 input tiles), F(4x4, 5x5) (8x8)
TILE = {3: 4, 5: 4}
ROW_TILE = 4  # the batched matmul's register tile rows: the tile count is padded to this
MIN_CHANNELS = 8  # input channels below this: the transforms cost more than they save
# FuseOps pattern of the data transform: opaque, so that the output transform of a Winograd
# convolution before it is not fused into it (each has its own schedule; fused, the output
# transform's blocks went unscheduled: 1.0 ms where the two cost 0.3 ms apart)
OPAQUE = 8
# FuseOps pattern of the output transform: "out-elementwise fusable", like the convolution it
# replaces, so only elementwise and broadcast epilogues (bias, SiLU, a residual add) are fused
# into it. As injective (call_te's default) it also took a following concatenate, which the
# rule cannot put in its store; the generic rule then inlined the whole transform into every
# concatenated element (an 830 KB kernel: 17 s to compile one YOLO neck layer).
OUT_ELEMWISE_FUSABLE = 4


@functools.lru_cache(maxsize=None)
def matrices(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A, B, G)`` of F(m x m, r x r) in float64: ``Y = A^T [(G g G^T) * (B^T d B)] A``."""
    from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points
    return _cook_toom_convolution(_interpolation_points(m + r - 1), m, r)


def tile_grid(batch: int, height: int, width: int, m: int) -> tuple[int, int]:
    """``(tile rows, tile columns)`` covering an output of ``height x width``; the columns
    padded until ``batch x rows x columns`` is a multiple of :data:`ROW_TILE`."""
    rows, cols = -(-height // m), -(-width // m)
    cols = next(c for c in range(cols, cols + ROW_TILE) if batch * rows * c % ROW_TILE == 0)
    return rows, cols


def transform_weights(weight: np.ndarray, m: int) -> np.ndarray:
    """OIHW weights -> ``U [alpha^2, C, K]``, float32."""
    out_channels, in_channels, r, _ = weight.shape
    _, _, g = matrices(m, r)
    u = np.einsum("xa,kcab,yb->xyck", g, weight.astype(np.float64), g)
    alpha = m + r - 1
    return u.reshape(alpha * alpha, in_channels, out_channels).astype(np.float32)


def _combination(column, term):
    """``sum_b column[b] * term(b)`` with constant coefficients: zeros skipped, ones not
    multiplied."""
    out = None
    for b, c in enumerate(column):
        if c == 0:
            continue
        t = term(b)
        if c != 1 and c != -1:
            t = t * tirx.const(float(c), "float32")
        if out is None:
            out = -t if c == -1 else t
        else:
            out = out - t if c == -1 else out + t
    return out if out is not None else tirx.const(0.0, "float32")


def _by_index(index, matrix, term):
    """``sum_b matrix[b, index] * term(b)`` for a loop variable ``index``: one constant
    combination per value of ``index``, picked by a chain of selects that unrolling ``index``
    resolves (the schedule unrolls it)."""
    columns = [_combination(matrix[:, i], term) for i in range(matrix.shape[1])]
    out = columns[-1]
    for i in range(len(columns) - 2, -1, -1):
        out = tirx.Select(index == i, columns[i], out)
    return out


def winograd_data(x, m: int, r: int, pads, tiles):
    """``V [alpha^2, tiles, C]``: ``B^T d B`` of every input tile of ``x [N, C, H, W]``
    padded by ``pads = (top, left)`` (zeros past the bottom and right edges too)."""
    batch, channels, height, width = (int(d) for d in x.shape)
    _, bmat, _ = matrices(m, r)
    alpha = m + r - 1
    rows, cols = tiles
    top, left = pads

    def staged(n, h, w, c):
        hh, ww = h - top, w - left
        inside = tirx.all(hh >= 0, hh < height, ww >= 0, ww < width)
        return tirx.if_then_else(inside, x[n, c, hh, ww], tirx.const(0.0, x.dtype))
    xt = te.compute((batch, rows * m + alpha - m, cols * m + alpha - m, channels), staged,
                    name="wino_input")
    per_image = rows * cols
    partial = te.compute(
        (batch * per_image, alpha, alpha, channels),
        lambda p, a, nu, c: _by_index(nu, bmat, lambda b: xt[
            p // per_image, p // cols % rows * m + a, p % cols * m + b, c]),
        name="wino_rows")
    return te.compute(
        (alpha * alpha, batch * per_image, channels),
        lambda e, p, c: _by_index(e // alpha, bmat, lambda a: partial[p, a, e % alpha, c]),
        name="wino_data")


def winograd_output(prod, *bias, shape, m: int, r: int, tiles, relu: bool, pool: int):
    """``A^T M A`` of every tile of ``prod [alpha^2, tiles, K]``, plus ``bias [1, K, 1, 1]``
    (when given), relu, and a ``pool x pool`` max pool of stride ``pool`` (1: none): the NCHW
    output of the convolution chain, ``shape`` before pooling."""
    batch, channels, height, width = shape
    amat, _, _ = matrices(m, r)
    alpha = m + r - 1
    rows, cols = tiles
    half = te.compute(
        (batch * rows * cols, alpha, m, channels),
        lambda p, xi, j, k: _by_index(j, amat, lambda nu: prod[xi * alpha + nu, p, k]),
        name="wino_cols")
    tile = te.compute(
        (batch * rows * cols, m, m, channels),
        lambda p, i, j, k: _by_index(i, amat, lambda xi: half[p, xi, j, k]),
        name="wino_tile")

    def activated(v, k):
        if bias:
            v = v + bias[0][0, k, 0, 0]
        return tirx.max(v, tirx.const(0.0, "float32")) if relu else v

    def window(read, k, h, w):
        out = None
        for dh in range(pool):
            for dw in range(pool):
                v = activated(read(h * pool + dh, w * pool + dw), k)
                out = v if out is None else tirx.max(out, v)
        return out

    out_shape = (batch, channels, height // pool, width // pool)
    if m % pool:  # windows across tiles: pool the NCHW values
        return te.compute(out_shape, lambda n, k, h, w: window(
            lambda hh, ww: tile[(n * rows + hh // m) * cols + ww // m, hh % m, ww % m, k],
            k, h, w), name="wino_output")
    # each tile holds whole windows: pool it while it is in cache, so the NCHW pass after
    # it moves a quarter of the data (AV-MNIST batch 8, 32->64 on 28x28: 0.48 -> 0.21 ms)
    q = m // pool
    pooled = te.compute(
        (batch * rows * cols, q, q, channels),
        lambda p, i, j, k: window(lambda hh, ww: tile[p, hh, ww, k], k, i, j),
        name="wino_pool")
    return te.compute(
        out_shape,
        lambda n, k, h, w: pooled[(n * rows + h // q) * cols + w // q, h % q, w % q, k],
        name="wino_output")


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _static_shape(expr) -> list[int] | None:
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if not isinstance(shape, relax.ShapeExpr) \
            or not all(isinstance(d, tirx.IntImm) for d in shape.values):
        return None
    return _ints(shape.values)


def _applies(call) -> int | None:
    """The output tile size for a convolution this rewrite handles, else None."""
    data, weight = call.args
    attrs = call.attrs
    shape = _static_shape(call)
    if (not isinstance(weight, tvm.ir.expr.Constant) or attrs.kernel_layout != "OIHW"
            or attrs.data_layout != "NCHW" or attrs.out_layout != "NCHW"
            or int(attrs.groups) != 1 or any(s != 1 for s in _ints(attrs.strides))
            or any(d != 1 for d in _ints(attrs.dilation))
            or str(getattr(data.ty, "dtype", "")) != "float32" or shape is None):
        return None
    out_channels, in_channels, r, r2 = (int(d) for d in weight.value.shape)
    m = TILE.get(r)
    # whole vectors of output channels (the batched matmul's columns)
    if r != r2 or m is None or in_channels < MIN_CHANNELS or out_channels % 8 \
            or min(shape[2:]) < 2 * m:
        return None
    return m


@expr_functor.mutator
class _Winograd(relax.PyExprMutator):
    """Rewrites each qualifying convolution together with the bias add, relu and max pool
    that follow it (each the only user of the one before): the chain's last binding becomes
    the Winograd kernels, the bindings before it go."""

    def __init__(self, mod):
        super().__init__(mod)
        self.chains = {}  # last var of a chain -> (conv call, tile size, bias, relu, pool)
        self.absorbed = set()  # the chain's other vars: not emitted

    def visit_function_(self, func):
        self.chains.clear()
        self.absorbed.clear()
        bindings = [b for block in func.body.blocks for b in block.bindings
                    if isinstance(b, relax.VarBinding)]
        uses = {}
        for b in bindings:
            for var in relax.analysis.free_vars(b.value):
                uses.setdefault(var, []).append(b)
        for var in relax.analysis.free_vars(func.body.body):
            uses.setdefault(var, []).append(None)
        for b in bindings:
            m = _applies(b.value) if is_call(b.value, "relax.nn.conv2d") else None
            if m is not None:
                self._chain(b, m, uses)
        return super().visit_function_(func)

    def _chain(self, conv, m, uses):
        bias, relu, pool, last = None, False, 1, conv.var
        channels = _static_shape(conv.value)[1]
        chain = [last]

        def next_use(var):
            users = uses.get(var, [])
            return users[0] if len(users) == 1 and users[0] is not None else None
        nxt = next_use(last)
        if nxt is not None and is_call(nxt.value, "relax.add") \
                and nxt.value.args[0].same_as(last) \
                and _static_shape(nxt.value.args[1]) == [1, channels, 1, 1] \
                and str(nxt.value.args[1].ty.dtype) == "float32":
            bias, last = nxt.value.args[1], nxt.var
            chain.append(last)
            nxt = next_use(last)
        if nxt is not None and is_call(nxt.value, "relax.nn.relu"):
            relu, last = True, nxt.var
            chain.append(last)
            nxt = next_use(last)
        if nxt is not None and is_call(nxt.value, "relax.nn.max_pool2d") \
                and whole_windows(nxt.value.attrs) \
                and len(set(_ints(nxt.value.attrs.pool_size))) == 1:
            pool, last = _ints(nxt.value.attrs.pool_size)[0], nxt.var
            chain.append(last)
        self.chains[last] = (conv.value, m, bias, relu, pool)
        self.absorbed.update(chain[:-1])

    def visit_var_binding_(self, binding):
        var = binding.var
        if var in self.absorbed:
            return
        if var not in self.chains:
            super().visit_var_binding_(binding)
            return
        call, m, bias, relu, pool = self.chains[var]
        weight = call.args[1].value.numpy()
        out_shape = _static_shape(call)
        tiles = tile_grid(out_shape[0], *out_shape[2:], m)
        r = weight.shape[2]
        packed = self.builder_.emit(self.builder_.call_te(
            winograd_data, self.visit_expr(call.args[0]), m, r, _ints(call.attrs.padding)[:2],
            tiles, primfunc_name_hint="winograd_data",
            primfunc_attrs={"op_pattern": OPAQUE}))
        product = self.builder_.emit(
            relax.op.matmul(packed, relax.const(transform_weights(weight, m))))
        extra = [self.visit_expr(bias)] if bias is not None else []
        out = self.builder_.emit(self.builder_.call_te(
            winograd_output, product, *extra, shape=out_shape, m=m, r=r, tiles=tiles,
            relu=relu, pool=pool, primfunc_name_hint="winograd_output",
            primfunc_attrs={"op_pattern": OUT_ELEMWISE_FUSABLE}))
        self.set_var_remap(var, out)


@tvm.transform.module_pass(opt_level=0, name="mmcompile.Winograd")
class Winograd:
    """Winograd F(m x m, r x r) for the float32 stride-1 convolutions in :data:`TILE` (NCHW,
    constant OIHW weights, at least :data:`MIN_CHANNELS` input channels); run before
    :class:`~.layout.PackConvWeights`."""

    def transform_module(self, mod, _ctx):
        return rewrite_functions(mod, _Winograd(mod))


def _vector_inner(sch, block, lanes):
    """``[p, *small, c]`` -> ``p, c-outer, *small (unrolled), c-lanes (vectorized)``."""
    _, *small, c = sch.get_loops(block)
    n = extent(sch, c)
    if n > lanes and n % lanes == 0:
        co, c = sch.split(c, [None, lanes])
        sch.reorder(co, *small, c)
    for loop in small:
        sch.unroll(loop)
    sch.vectorize(c)


class WinogradTransform(VectorRule):
    """The data and output transforms built by :func:`winograd_data` / :func:`winograd_output`:
    tiles in parallel, channels vectorized."""

    @staticmethod
    def _schedule(func, lanes):
        sch = s_tir.Schedule(func)
        blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
        if "wino_data" in blocks:
            return _schedule_data(sch, blocks, lanes)
        if "wino_output" in blocks:
            return _schedule_output(sch, blocks, lanes)
        return None


def _schedule_data(sch, blocks, lanes):
    staged, rows, data = blocks["wino_input"], blocks["wino_rows"], blocks["wino_data"]
    n, h, _, c = sch.get_loops(staged)
    sch.parallel(sch.fuse(n, h))
    if extent(sch, c) <= 4 * lanes:
        sch.vectorize(c)
    e, p, c = sch.get_loops(data)
    sch.reorder(p, e, c)
    sch.parallel(p)
    sch.compute_at(rows, p)
    _vector_inner(sch, rows, lanes)
    _vector_inner(sch, data, lanes)
    return sch


def _inline_epilogues(sch, epilogues):
    """FuseOps' elementwise epilogues (in function order) folded into ``wino_output``'s store.

    The chain is first inlined forward, into its last block, and only that block is inlined
    backward into the output: a SiLU epilogue (``x * sigmoid(x)``) reads the output twice, and
    reverse-inlining its blocks one by one (multiply into the sigmoid, then the sigmoid
    into the output) left the multiply's direct read of the output pointing at a buffer that
    no longer existed ("wino_output_intermediate is used before its definition", YOLO-style
    detectors)."""
    for block in epilogues[:-1]:
        sch.compute_inline(block)
    if epilogues:
        sch.reverse_compute_inline(epilogues[-1])


def _schedule_output(sch, blocks, lanes):
    half, tile, out = blocks["wino_cols"], blocks["wino_tile"], blocks["wino_output"]
    _inline_epilogues(sch, [b for name, b in blocks.items() if not name.startswith("wino_")])
    pooled = blocks.get("wino_pool")
    anchor = pooled if pooled is not None else tile
    p = sch.get_loops(anchor)[0]
    sch.parallel(p)
    if pooled is not None:
        sch.compute_at(tile, p)
    sch.compute_at(half, p)
    for block in (half, tile, pooled):
        if block is not None:
            _vector_inner(sch, block, lanes)
    # channels innermost and vectorized: contiguous loads of the tiles, the NCHW stores
    # scattered (one per element either way; gathering the loads cost 2x). Channel counts
    # that are not whole vectors (24 on AVX-512) take the widest vector that divides them:
    # the rule raised on them, and the generic rule that then took the kernel inlined the
    # two transform passes into every output element (PaddleOCR's detector: 16x the work,
    # a quarter of its time)
    n, k, h, w = sch.get_loops(out)
    size = extent(sch, k)
    vector = next((v for v in (lanes, lanes // 2, lanes // 4) if v >= 4 and size % v == 0), 1)
    ko, ki = sch.split(k, [None, vector])
    sch.reorder(n, h, ko, w, ki)
    if vector > 1:
        sch.vectorize(ki)
    sch.parallel(sch.fuse(n, h))
    return sch
