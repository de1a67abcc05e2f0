"""The tiler: a quantized layer -> an instruction stream that fits the accelerator's buffers.

Every layer is a GEMM ``(M, K) x (K, N)``; a convolution is one by im2col (rows: output
pixels, columns: C*kh*kw), gathered by the load unit from the NCHW input in DRAM, padding
included, as Gemmini's im2col loader does. im2col rather than a direct convolution because
it keeps one GEMM tiler and one simulator path for both layer kinds, the array sees the
same dense tiles either way, and the DRAM traffic of an im2col tile is still counted as the
input pixels it touches (:func:`_im2col_bytes`), not the patch matrix's size.

What the integer part of the layer becomes:

- the input zero point leaves the sum at compile time: ``sum (x - zx) w + b = sum x' w +
  (b - zx' * colsum(w))`` with ``x'`` the operand the array multiplies (uint8 inputs are read
  as int8 by the load unit flipping the top bit, ``x' = x - 128``, ``zx' = zx - 128``);
  convolution padding is the zero point itself, so it still adds nothing;
- the folded bias is loaded into the accumulator before the first GEMM of each output
  tile; the per-channel multipliers go to the ALU's scale registers with it;
- after the last GEMM the ALU requantizes in place and the store queue writes the int8
  tile out (a convolution's output as NHWC rows, which the host reads back as NCHW).

A max pool (or a bare ReLU, a 1x1 window) is no GEMM: :func:`_lower_pool` gathers its
windows with the same im2col load, takes their maxima with ``POOL`` and rescales them with
the ALU (see :class:`~.layers.QPool`).

Tile sizes are chosen by a small search (:func:`plan_tiles`): the array-mapped dimensions
in multiples of the array (so only edge tiles leave PEs idle), the streamed one as large as
the buffers allow or a fraction of that (smaller tiles start sooner and overlap loads with
compute when double-buffered), under both loop orders, scored by an estimate of
``max(compute, DRAM)`` (double-buffered) or their sum. The score is only a guide; the cost
model (:mod:`.cost`) times the stream that comes out.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

import numpy as np
from mmcompile.targets.accel import dataflow as df
from mmcompile.targets.accel.isa import (
    Alu,
    BufferDecl,
    Gemm,
    Instruction,
    Load,
    Pool,
    Store,
    Stream,
    TensorDecl,
    insert_dependences,
    validate,
)
from mmcompile.targets.accel.layers import Layer, QConv2d, QPool
from mmcompile.targets.accel.spec import AccelSpec

from mmcompile.errors import UnsupportedOpError

INT32 = 2 ** 31


def supports(spec: AccelSpec, layer: Layer) -> tuple[bool, str]:
    """Whether ``spec`` can run ``layer``, and why not: ``(True, "")`` or ``(False, "not
    supported by <accel>: <reason>")``. What the planner asks before placing a node.

    Refused: an op or activation the description does not list, a grouped or depthwise
    convolution (the array runs dense GEMMs), no requantization, a reduction so long that an
    int32 sum could overflow, a folded bias outside int32, a pooling window larger than the
    input buffer.
    """
    def no(reason: str) -> tuple[bool, str]:
        return False, f"not supported by {spec.name}: {reason}"

    if not spec.supports_op(layer.op_type):
        return no(f"{layer.op_type} is not among its ops ({', '.join(spec.ops)})")
    if "QuantizeLinear" not in spec.ops:
        return no("it does not requantize (QuantizeLinear is not among its ops)")
    activation = {"relu": "Relu", "clip": "Clip"}.get(layer.activation or "")
    if activation and not spec.supports_op(activation):
        return no(f"the fused {activation} is not among its ops")
    if isinstance(layer, QPool):
        if not _fits_pool(spec, 1, 1, layer.window):
            return no(f"a window of {layer.window} elements does not fit its input buffer")
        return True, ""
    if isinstance(layer, QConv2d) and layer.groups != 1:
        kind = "depthwise" if layer.groups == layer.input_shape[1] else "grouped"
        return no(f"{kind} convolution (groups={layer.groups}): the array runs dense GEMMs; "
                  f"run it on the host")
    _, k, _ = layer.gemm_shape
    bias = int(np.abs(_folded_bias(layer)).max(initial=0))
    if bias >= INT32:
        return no("the bias with the input zero point folded in does not fit in int32")
    if k * 128 * 128 + bias >= INT32:  # |x'|, |w| <= 128 after the uint8 shift
        return no(f"a reduction of {k} int8 products may overflow the int32 accumulator")
    return True, ""


def _operand_zero(layer: Layer) -> int:
    """The input zero point as the int8 operand the array sees (uint8 shifted by 128)."""
    return int(layer.x.zero_point) - (128 if layer.x.dtype == "uint8" else 0)


def _folded_bias(layer: Layer) -> np.ndarray:
    """``bias - zx' * colsum(W)`` in int64 (checked against int32 by :func:`supports`)."""
    colsum = layer.weight_matrix().astype(np.int64).sum(axis=0)
    return layer.bias_or_zeros().astype(np.int64) - _operand_zero(layer) * colsum


# -- tile planning ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TilePlan:
    """Tile sizes ``(tm, tk, tn)``, loop order (``mn``: output rows outer, ``nm``: output
    columns outer; the reduction is always innermost) and the planner's estimate."""

    tm: int
    tk: int
    tn: int
    order: str
    estimate: float


def _capacity(spec: AccelSpec) -> dict[str, int]:
    if spec.input_kib is not None:
        return {"inp": int(spec.input_kib * 1024), "wgt": int(spec.weight_kib * 1024),
                "acc": spec.accumulator_bytes}
    return {"shared": spec.scratchpad_bytes, "acc": spec.accumulator_bytes}


def _fits(spec: AccelSpec, tm: int, tk: int, tn: int) -> bool:
    cap, s = _capacity(spec), spec.slots
    if s * 4 * tm * tn > cap["acc"]:
        return False
    if "shared" in cap:
        return s * (tm * tk + tk * tn) <= cap["shared"]
    return s * tm * tk <= cap["inp"] and s * tk * tn <= cap["wgt"]


def _largest(spec: AccelSpec, tm: int | None, tk: int | None, tn: int | None,
             limit: int) -> int:
    """The largest value (<= limit) of the one dimension given as None that fits."""
    lo, hi = 0, limit
    while lo < hi:  # the constraints are monotone in each dimension
        mid = (lo + hi + 1) // 2
        dims = [mid if d is None else d for d in (tm, tk, tn)]
        if _fits(spec, *dims):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _steps(total: int, granule: int) -> list[int]:
    """Candidate tile sizes: the whole dimension, and granule * 2^i below it."""
    out, size = {total}, granule
    while size < total:
        out.add(size)
        size *= 2
    return sorted(out)


def _sizes(total: int, tile: int) -> list[tuple[int, int]]:
    """``(size, count)`` of the tiles ``total`` splits into: full ones and the remainder."""
    full, rest = divmod(total, tile)
    return [(tile, full)] + ([(rest, 1)] if rest else [])


def _estimate(spec: AccelSpec, m: int, k: int, n: int, tm: int, tk: int, tn: int,
              order: str, density: float) -> float:
    """Cycles the three queues need for this tiling, the way :mod:`.cost` times them: each
    DRAM transfer costs the latency plus its bytes over the bandwidth in its (in-order)
    queue; double-buffered queues overlap, after the first tile's loads."""
    flow, r, c, s = spec.dataflow, spec.rows, spec.cols, spec.slots
    bw, lat = spec.dram_bytes_per_cycle, spec.dram_latency_cycles
    compute = sum(df.gemm_cycles(flow, r, c, a, b, d) * i * j * h
                  for a, i in _sizes(m, tm) for b, j in _sizes(k, tk) for d, h in _sizes(n, tn))
    nm, nk, nn = ceil(m / tm), ceil(k / tk), ceil(n / tn)
    if order == "mn":
        inp_loads = nm * nk * (1 if nk <= s else nn)
        wgt_loads = nn * nk * (1 if nn * nk <= s else nm)
    else:
        wgt_loads = nn * nk * (1 if nk <= s else nm)
        inp_loads = nm * nk * (1 if nm * nk <= s else nn)
    load_q = inp_loads * (lat + density * tm * tk / bw) + wgt_loads * (lat + tk * tn / bw)
    compute_q = compute + nm * nn * (ceil(tm * tn / c) + 2 * (lat + 4 * tn / bw))
    store_q = nm * nn * (lat + tm * tn / bw)
    if not spec.double_buffer:
        return load_q + compute_q + store_q
    traffic = inp_loads * density * tm * tk + wgt_loads * tk * tn + m * n + nm * nn * 8 * tn
    first = 2 * lat + (density * tm * tk + tk * tn) / bw
    return max(load_q, compute_q, store_q, traffic / bw) + first


def plan_tiles(spec: AccelSpec, m: int, k: int, n: int, density: float = 1.0) -> TilePlan:
    """The tiling of a ``(m, k, n)`` GEMM with the lowest estimated time (see the module
    docstring); ties go to fewer, larger tiles. ``density``: DRAM bytes an input tile reads
    per element of it (1 for a matrix; an im2col tile reads each pixel once, not once per
    patch: about input size / patch-matrix size)."""
    flow, r, c = spec.dataflow, spec.rows, spec.cols
    # the two array-mapped dimensions step by the array; the streamed one is derived
    grid = {"ws": (("tk", k, r), ("tn", n, c), ("tm", m)),
            "os": (("tm", m, r), ("tn", n, c), ("tk", k)),
            "is": (("tk", k, r), ("tm", m, c), ("tn", n))}[flow]
    (a_name, a_total, a_step), (b_name, b_total, b_step), (free, free_total) = grid
    best: tuple | None = None
    for a in _steps(a_total, a_step):
        for b in _steps(b_total, b_step):
            dims = {a_name: a, b_name: b, free: None}
            top = _largest(spec, dims["tm"], dims["tk"], dims["tn"], free_total)
            if top < 1:
                continue
            for div in (1, 2, 4, 8):
                size = max(1, ceil(top / div))
                if div > 1 and size == top:
                    continue
                dims[free] = size
                tm, tk, tn = dims["tm"], dims["tk"], dims["tn"]
                for order in ("mn", "nm"):
                    cost = _estimate(spec, m, k, n, tm, tk, tn, order, density)
                    key = (cost, ceil(m / tm) * ceil(k / tk) * ceil(n / tn), order)
                    if best is None or key < best[0]:
                        best = (key, TilePlan(tm, tk, tn, order, cost))
    if best is None:  # unreachable for a valid spec: one array tile always fits
        raise UnsupportedOpError("Gemm", f"{m}x{k}x{n}", spec.name, "no tile fits")
    return best[1]


# -- lowering ---------------------------------------------------------------------------------

class _Slots:
    """Which tile each slot of a buffer holds; a tile already resident is reused, else the
    least recently used slot is overwritten."""

    def __init__(self, count: int):
        self.held: list[object] = [None] * count
        self.used = [-1] * count
        self.clock = 0

    def get(self, key: object) -> tuple[int, bool]:
        """``(slot, whether it must be loaded)``."""
        self.clock += 1
        if key in self.held:
            slot = self.held.index(key)
            self.used[slot] = self.clock
            return slot, False
        slot = self.used.index(min(self.used))
        self.held[slot], self.used[slot] = key, self.clock
        return slot, True


def _im2col_bytes(layer: QConv2d | QPool, m0: int, m1: int, k0: int, k1: int) -> int:
    """DRAM bytes an im2col tile reads: the input pixels its patches touch, once each
    (channels of the column range x the input rows and columns under its output rows)."""
    _, _, h, w = layer.input_shape
    oh, ow = layer.output_hw
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
    per_channel = kh * kw
    channels = (k1 - 1) // per_channel - k0 // per_channel + 1
    first, last = divmod(m0, oh * ow), divmod(m1 - 1, oh * ow)
    if first[0] != last[0]:  # spans images: whole images
        return min((m1 - m0) * (k1 - k0), (last[0] - first[0] + 1) * channels * h * w)
    row0, col0 = divmod(first[1], ow)
    row1, col1 = divmod(last[1], ow)
    rows = min(h, (row1 - row0) * sh + (kh - 1) * dh + 1)
    cols = min(w, (col1 - col0) * sw + (kw - 1) * dw + 1) if row0 == row1 else w
    return min((m1 - m0) * (k1 - k0), channels * rows * cols)


def lower(spec: AccelSpec, layer: Layer, plan: TilePlan | None = None) -> Stream:
    """Compile ``layer`` for ``spec`` into an instruction stream.

    Args:
        spec: the accelerator.
        layer: a :class:`~.layers.QGemm`, :class:`~.layers.QConv2d` or
            :class:`~.layers.QPool` (:func:`_lower_pool`).
        plan: tile sizes and loop order to use instead of :func:`plan_tiles`'s choice (they
            must fit the buffers; a GEMM's only).

    Returns:
        The stream, validated; ``stream.info`` holds the GEMM shape, tiles, loop order and
        the planner's estimate.

    Raises:
        UnsupportedOpError: ``supports(spec, layer)`` refuses the layer, or ``plan`` does
            not fit the buffers.
    """
    ok, reason = supports(spec, layer)
    if not ok:
        raise UnsupportedOpError(layer.op_type, layer.name, spec.name, reason)
    if isinstance(layer, QPool):
        return _lower_pool(spec, layer)
    m, k, n = layer.gemm_shape
    density = 1.0
    if isinstance(layer, QConv2d):
        density = min(1.0, float(np.prod(layer.input_shape)) / (m * k))
    plan = plan or plan_tiles(spec, m, k, n, density)
    if not _fits(spec, plan.tm, plan.tk, plan.tn):
        raise UnsupportedOpError(layer.op_type, layer.name, spec.name,
                                 f"tiles {plan.tm}x{plan.tk}x{plan.tn} do not fit its buffers")
    tm, tk, tn, s = plan.tm, plan.tk, plan.tn, spec.slots
    lo, hi = layer.output_range()
    zy = int(layer.y.zero_point)

    tensors = {"w": TensorDecl("w", (k, n), "int8", "const"),
               "bias": TensorDecl("bias", (n,), "int32", "const"),
               "scale": TensorDecl("scale", (n,), "float32", "const")}
    flip = layer.x.dtype == "uint8"
    if isinstance(layer, QConv2d):
        tensors.update(_im2col_tensors(layer, int(layer.x.zero_point), (m, k), n))
        view = "im2col"

        def input_bytes(m0: int, m1: int, k0: int, k1: int) -> int:
            return _im2col_bytes(layer, m0, m1, k0, k1)
    else:
        tensors["x"] = TensorDecl("x", (m, k), layer.x.dtype, "input", flip_sign=flip,
                                  logical_shape=tuple(layer.input_shape))
        tensors["y"] = TensorDecl("y", (m, n), layer.y.dtype, "output",
                                  logical_shape=tuple(layer.output_shape))
        view = "matrix"

        def input_bytes(m0: int, m1: int, k0: int, k1: int) -> int:
            return (m1 - m0) * (k1 - k0)

    constants = {"w": layer.weight_matrix(),
                 "bias": _folded_bias(layer).astype(np.int32),
                 "scale": layer.multiplier()}
    buffers = {"inp": BufferDecl(s, tm * tk), "wgt": BufferDecl(s, tk * tn),
               "acc": BufferDecl(s, 4 * tm * tn), "scl": BufferDecl(s, 4 * tn)}

    program: list[Instruction] = []
    inp, wgt, acc = _Slots(s), _Slots(s), _Slots(s)
    outer, inner = ((range(0, m, tm), range(0, n, tn)) if plan.order == "mn"
                    else (range(0, n, tn), range(0, m, tm)))
    tile = 0
    for a in outer:
        for b in inner:
            m0, n0 = (a, b) if plan.order == "mn" else (b, a)
            m1, n1 = min(m, m0 + tm), min(n, n0 + tn)
            out, _ = acc.get(("out", tile))
            tile += 1
            program.append(Load("acc", out, "bias", (0, m1 - m0), (n0, n1), "row",
                                4 * (n1 - n0)))
            program.append(Load("scl", out, "scale", (0, 1), (n0, n1), "row", 4 * (n1 - n0)))
            for k0 in range(0, k, tk):
                k1 = min(k, k0 + tk)
                i_slot, i_new = inp.get((m0, k0))
                if i_new:
                    program.append(Load("inp", i_slot, "x", (m0, m1), (k0, k1), view,
                                        input_bytes(m0, m1, k0, k1)))
                w_slot, w_new = wgt.get((k0, n0))
                if w_new:
                    program.append(Load("wgt", w_slot, "w", (k0, k1), (n0, n1), "matrix",
                                        (k1 - k0) * (n1 - n0)))
                program.append(Gemm(i_slot, w_slot, out, m1 - m0, k1 - k0, n1 - n0))
            program.append(Alu(out, out, m1 - m0, n1 - n0, zy, lo, hi))
            program.append(Store(out, "y", (m0, m1), (n0, n1), (m1 - m0) * (n1 - n0)))

    info = {"gemm": [m, k, n], "macs": m * k * n, "tile": [tm, tk, tn], "order": plan.order,
            "output_tiles": tile, "estimate_cycles": round(plan.estimate)}
    return _stream(spec, layer, tensors, buffers, program, constants, info)


def _im2col_tensors(layer: QConv2d | QPool, pad_value: int, matrix: tuple[int, int],
                    channels: int) -> dict[str, TensorDecl]:
    """The input ``x`` a layer's loads gather as im2col rows (its NCHW tensor, padding read
    as ``pad_value``, patch matrix ``matrix``) and the output ``y`` its stores write as NHWC
    rows of ``channels``, which the host reads back as NCHW."""
    geometry = {"input_shape": list(layer.input_shape), "kernel": list(layer.kernel),
                "strides": list(layer.strides), "pads": list(layer.pads),
                "dilations": list(layer.dilations), "pad_value": pad_value,
                "matrix": list(matrix)}
    return {"x": TensorDecl("x", tuple(layer.input_shape), layer.x.dtype, "input",
                            flip_sign=layer.x.dtype == "uint8", im2col=geometry,
                            logical_shape=tuple(layer.input_shape), layout="nchw"),
            "y": TensorDecl("y", (matrix[0], channels), layer.y.dtype, "output",
                            logical_shape=tuple(layer.output_shape), layout="nhwc")}


def _stream(spec: AccelSpec, layer: Layer, tensors: dict[str, TensorDecl],
            buffers: dict[str, BufferDecl], program: list[Instruction],
            constants: dict[str, np.ndarray], info: dict) -> Stream:
    """The layer's stream: dependency tokens derived, the facts every layer reports added to
    ``info``, validated."""
    info = {"kind": layer.kind, "op_type": layer.op_type, "dataflow": spec.dataflow, **info,
            "input_dtype": layer.x.dtype, "output_dtype": layer.y.dtype,
            "activation": layer.activation}
    stream = Stream(name=layer.name, accel=spec.to_dict(), tensors=tensors, buffers=buffers,
                    instructions=insert_dependences(program), constants=constants, info=info)
    validate(stream)
    return stream


# -- pooling ----------------------------------------------------------------------------------

def _fits_pool(spec: AccelSpec, tm: int, tc: int, window: int) -> bool:
    """Whether a pooling tile of ``tm`` output pixels x ``tc`` channels fits: its input rows
    (``tc * window`` int8 values each) in the input scratchpad, its maxima in the
    accumulator, in every slot."""
    cap, s = _capacity(spec), spec.slots
    return s * 4 * tm * tc <= cap["acc"] and s * tm * tc * window <= cap.get("inp",
                                                                             cap.get("shared"))


def plan_pool(spec: AccelSpec, layer: QPool) -> tuple[int, int]:
    """``(tm, tc)``: output pixels and channels per pooling tile. Every channel when a tile
    of at least one array height of pixels holds them (else channels in multiples of the
    array's width), and the pixels split into the tile count, among 1, 2, 4 and 8 times the
    fewest, with the lowest :func:`_estimate_pool`."""
    m, window, c = layer.pool_shape
    tc = c
    while tc > spec.cols and not _fits_pool(spec, min(m, spec.rows), tc, window):
        tc = max(spec.cols, (tc // 2) // spec.cols * spec.cols)
    while tc > 1 and not _fits_pool(spec, 1, tc, window):
        tc //= 2
    lo, hi = 1, m
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _fits_pool(spec, mid, tc, window) else (lo, mid - 1)
    fewest = ceil(m / lo)
    options = {ceil(m / (fewest * d)) for d in (1, 2, 4, 8)}
    return min(options, key=lambda tm: (_estimate_pool(spec, layer, tm, tc), -tm)), tc


def _estimate_pool(spec: AccelSpec, layer: QPool, tm: int, tc: int) -> float:
    """Cycles of a pooling tiling, as :mod:`.cost` times its queues (a guide, not the
    cost model)."""
    m, window, c = layer.pool_shape
    tiles = ceil(m / tm) * ceil(c / tc)
    bw, lat = spec.dram_bytes_per_cycle, spec.dram_latency_cycles
    pixels = float(np.prod(layer.input_shape)) / max(1, m * c * window)  # DRAM per element
    load = tiles * lat + min(1.0, pixels) * m * c * window / bw
    compute = tiles * (ceil(tm * tc / spec.cols) * (window + 1))
    store = tiles * lat + m * c / bw
    if spec.double_buffer:
        return max(load, compute, store) + lat + tm * tc * window / bw
    return load + compute + store


def _lower_pool(spec: AccelSpec, layer: QPool) -> Stream:
    """:func:`lower` of a max-pooling layer (already checked by :func:`supports`): per tile
    of output pixels and channels, the load unit gathers the windows (an im2col load, padding
    read as the input type's minimum), ``POOL`` takes each window's maximum into the
    accumulator (less the input's zero point), the ALU rescales it (``rescale``: the QDQ
    graph's dequantize then quantize, with the ReLU's clamp) and the store queue writes the
    int8 tile as NHWC rows."""
    m, window, c = layer.pool_shape
    tm, tc = plan_pool(spec, layer)
    s = spec.slots
    lo, hi = layer.output_range()
    tensors = {**_im2col_tensors(layer, layer.pad_value(), (m, c * window), c),
               "scale": TensorDecl("scale", (2,), "float32", "const")}
    constants = {"scale": np.array([layer.x.scale, layer.y.scale], np.float32)}
    buffers = {"inp": BufferDecl(s, tm * tc * window), "wgt": BufferDecl(1, 0),
               "acc": BufferDecl(s, 4 * tm * tc), "scl": BufferDecl(1, 8)}
    program: list[Instruction] = [Load("scl", 0, "scale", (0, 1), (0, 2), "row", 8)]
    inp, acc = _Slots(s), _Slots(s)
    tile = 0
    for m0 in range(0, m, tm):
        for c0 in range(0, c, tc):
            m1, c1 = min(m, m0 + tm), min(c, c0 + tc)
            i_slot, _ = inp.get(tile)
            out, _ = acc.get(tile)
            tile += 1
            program.append(Load("inp", i_slot, "x", (m0, m1), (c0 * window, c1 * window),
                                "im2col", _im2col_bytes(layer, m0, m1, c0 * window,
                                                        c1 * window)))
            program.append(Pool(i_slot, out, m1 - m0, c1 - c0, window, _operand_zero(layer)))
            program.append(Alu(out, 0, m1 - m0, c1 - c0, int(layer.y.zero_point), lo, hi,
                               op="rescale"))
            program.append(Store(out, "y", (m0, m1), (c0, c1), (m1 - m0) * (c1 - c0)))
    info = {"pool": [m, window, c], "tile": [tm, tc], "output_tiles": tile,
            "estimate_cycles": round(_estimate_pool(spec, layer, tm, tc))}
    return _stream(spec, layer, tensors, buffers, program, constants, info)
