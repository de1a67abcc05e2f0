"""Row reductions (softmax, layer norm over the last axis) with vector partial sums.

TVM's kernels for these reduce each row with one scalar chain: the max, then the sum of
exponentials (softmax), or the sum and the sum of squares (layer norm), each a serial
dependency of one add or max per element (3-4 cycles each), while the elementwise steps
around them are vectorized. dlight's ``cpu.Reduction`` rule keeps the chains scalar: ``rfactor``
needs the reduction to be the first child of its loop, which ``compute_at`` under the row loop
breaks (its docstring says so). So the reductions are written with the split already in
the compute: a first block keeps one partial per vector lane (``lane_*``: a spatial lane axis
inside a reduction over the row's chunks, vectorized), a second adds (or takes the max of)
the lanes. A row whose length is not a multiple of the lanes reads its tail through a
last chunk of ``LANES`` elements that overlaps the one before it (the overlap masked out of
sums): no bounds test, no read past the row.

:class:`RowReduction` schedules these functions: rows in parallel, every block computed under
the row loop, the lane axis of each partial reduction innermost and vectorized, and each
elementwise step over a row vectorized whole when its length is not a multiple of the lanes.

Measured (znver3, 2 threads, kernel alone, against TVM's topi kernels under dlight's rule in
the same run): layer norm [8, 50, 128] 0.15x, [8, 65, 64] 0.20x, [8, 4, 65, 65] 0.15x;
softmax [8, 4, 50, 50] 0.34x, [8, 4, 65, 65] 0.60x, [8, 50, 128] 0.72x. Whole models (one
process, interleaved, against the same compiler without this rewrite): MOSEI-TFN 0.89x /
0.82x (batch 1 / 8), CLIP 0.97x / 0.90x, Whisper 0.95x / 0.91x, MM-IMDb 0.97x / 0.97x.

The lanes are then combined as a balanced tree, and the softmax multiplies by the row's
reciprocal instead of dividing each element (Emerald Rapids, 2 threads, one-op models, saved
artifacts alternating in one process): softmax [8, 4, 50, 50] 0.83x, [8, 8, 65, 65] 0.81x,
[1, 8, 65, 65] 0.89x; onnxruntime's was still 1.4-2x faster on those before the change.

A mean over trailing axes (a global average pool over NCHW maps, ``R.mean`` over the last
axes) is the same partial sum over each row's contiguous elements (:func:`row_mean`), rows
in parallel. TVM's kernel vectorized the channels, each vector a gather of elements one plane
apart, serially: MobileNetV3's squeeze-excitation pools (2 threads, kernel alone) [1, 240,
10, 10] 6.5 -> 1.2 us, [1, 16, 40, 40] 7.8 -> 1.0 us; mobilenet_text 0.96x at batch 1 and
0.93x at batch 8 (saved artifacts alternating in one process, outputs within 3e-8).
"""

from __future__ import annotations

import operator
from functools import partial

import numpy as np
import tvm
from tvm import s_tir, te, tirx, topi

from mmcompile.targets.tvm.rewrite import rewrite_calls
from mmcompile.targets.tvm.schedule_util import (VectorRule, extent, injective_tail,
                                                 vectorize_reduction)

LANES = 8  # partials per row by default: one AVX2 vector of float32
PARTIAL = "lane_"  # name prefix of the partial-reduction blocks
MEAN = "row_mean"  # name of row_mean's last block (no element axis inside its rows)
MAX_WIDE = 256  # longest row vectorized whole (see _vectorize)


def _lane_reduce(x, lead, n, value, combine, neutral, name, lanes, idempotent=False):
    """``[*lead, lanes]`` partials: lane ``j`` combines ``value(x[..., k * lanes + j])`` over
    the row's chunks ``k``. A row of ``n >= lanes`` that is not a multiple of the lanes ends
    with a chunk of its last ``lanes`` elements (in bounds, no branch), whose lanes that
    overlap the chunk before it contribute ``neutral`` unless ``combine`` is idempotent (max)."""
    full, tail = divmod(n, lanes)
    k = te.reduce_axis((0, full + (tail > 0)), name="k")

    def partial(*index):
        row, lane = index[:-1], index[-1]
        if not tail:
            return combine(value(x[(*row, k * lanes + lane)]), axis=k)
        term = value(x[(*row, tirx.min(k * lanes, n - lanes) + lane)])
        if not idempotent:
            term = tirx.Select(tirx.all(k == full, lane < lanes - tail), neutral, term)
        return combine(term, axis=k)
    return te.compute((*lead, lanes), partial, name=PARTIAL + name)


def _over_lanes(partials, lead, combine, name):
    """The lanes combined as a balanced tree (``combine``: ``tirx.max`` or ``operator.add``):
    a chain over 16 lanes was 15 dependent scalar operations (~60 cycles) per row and per
    reduction, on rows of 50-65 elements more than the vectorized work."""
    def tree(row, lo, hi):
        if hi - lo == 1:
            return partials[(*row, lo)]
        mid = (lo + hi) // 2
        return combine(tree(row, lo, mid), tree(row, mid, hi))
    return te.compute(lead, lambda *row: tree(row, 0, int(partials.shape[-1])), name=name)


def row_softmax(x, _axis=-1, fast_exp: bool = True, lanes: int = LANES):
    """Softmax over the last axis (``topi.fast_exp`` unless ``fast_exp`` is off, see
    :mod:`.fast_math`), rows at least ``lanes`` long."""
    *lead, n = (int(d) for d in x.shape)
    lowest = tirx.min_value(x.dtype)
    partial_max = _lane_reduce(x, lead, n, lambda v: v, te.max, lowest, "max", lanes,
                               idempotent=True)
    row_max = _over_lanes(partial_max, lead, tirx.max, "row_max")
    shifted = te.compute(x.shape, lambda *i: x[i] - row_max[i[:-1]], name="shifted")
    exp = (topi.fast_exp if fast_exp else topi.exp)(shifted)
    partial_sum = _lane_reduce(exp, lead, n, lambda v: v, te.sum,
                               tirx.const(0.0, x.dtype), "sum", lanes)
    total = _over_lanes(partial_sum, lead, operator.add, "row_sum")
    # times the reciprocal, as onnxruntime's softmax does: a vector division costs ~16 cycles
    inverse = te.compute(lead, lambda *row: tirx.const(1.0, x.dtype) / total[row],
                         name="row_inverse")
    return te.compute(x.shape, lambda *i: exp[i] * inverse[i[:-1]], name="softmax")


def row_layer_norm(x, gamma, beta, _axes, epsilon, *_flags, lanes: int = LANES):
    """Layer norm over the last axis: ``(x - mean) / sqrt(var + eps) * gamma + beta``, with
    ``var = E[x^2] - mean^2`` (one pass, as ``topi.nn.layer_norm`` computes it)."""
    *lead, n = (int(d) for d in x.shape)
    zero = tirx.const(0.0, x.dtype)
    sums = _over_lanes(_lane_reduce(x, lead, n, lambda v: v, te.sum, zero, "sum", lanes),
                       lead, operator.add, "row_sum")
    squares = _over_lanes(_lane_reduce(x, lead, n, lambda v: v * v, te.sum, zero, "sumsq",
                                       lanes), lead, operator.add, "row_sumsq")
    scale = tirx.const(1.0 / n, x.dtype)
    eps = tirx.const(float(epsilon), x.dtype)

    def normalize(*i):
        row = i[:-1]
        mean = sums[row] * scale
        inv = tirx.rsqrt(squares[row] * scale - mean * mean + eps)
        return (x[i] - mean) * inv * gamma[i[-1]] + beta[i[-1]]
    return te.compute(x.shape, normalize, name="layer_norm")


def row_mean(x, axes, keepdims, lanes: int = LANES):
    """Mean over the trailing axes (a global average pool over an NCHW map): each row's
    elements are contiguous, so the lane partials read whole vectors. TVM's kernel for it
    vectorized the channels instead, every vector a gather of 16 elements a plane apart,
    and ran serially (MobileNetV3's squeeze-excitation pools, [1, 240, 10, 10]: 6.5 us)."""
    shape = [int(d) for d in x.shape]
    first = len(shape) - len(axes)
    lead, plane = shape[:first], shape[first:]
    n = int(np.prod(plane))
    flat = _Flat(x, plane) if len(plane) > 1 else x
    total = _over_lanes(_lane_reduce(flat, lead, n, lambda v: v, te.sum,
                                     tirx.const(0.0, x.dtype), "sum", lanes),
                        lead, operator.add, "row_sum")
    scale = tirx.const(1.0 / n, x.dtype)
    if not keepdims:
        return te.compute(lead, lambda *row: total[row] * scale, name=MEAN)
    return te.compute((*lead, *[1] * len(plane)),
                      lambda *i: total[i[:first]] * scale, name=MEAN)


class _Flat:
    """``x`` indexed as if its trailing ``plane`` axes were one (``x[(*row, p)]``): the
    reads stay on ``x`` (no reshaped copy), and a row-major plane's flattened index is ``p``
    again once TVM simplifies the division and modulo."""

    def __init__(self, x, plane):
        self.x, self.plane = x, plane

    def __getitem__(self, index):
        *row, p = index
        inner = []
        for size in reversed(self.plane):
            inner.append(tirx.floormod(p, size))
            p = tirx.floordiv(p, size)
        return self.x[(*row, *reversed(inner))]


def _trailing_axes(ty, axes, _keepdims, *, lanes) -> bool:
    """A static shape reduced over its trailing axes (at least one kept in front), whose
    rows (their product) are at least ``lanes`` long."""
    shape = getattr(ty, "shape", None)
    if shape is None or axes is None or not all(isinstance(d, tirx.IntImm) for d in shape):
        return False
    rank = len(shape)
    reduced = sorted(int(a) % rank for a in axes)
    if not reduced or reduced != list(range(rank - len(reduced), rank)) or reduced[0] == 0:
        return False
    return int(np.prod([int(shape[a]) for a in reduced])) >= lanes


def _last_axis(ty, axes, *, lanes) -> bool:
    """A static shape of rows at least ``lanes`` long, reduced over its last axis only."""
    shape = getattr(ty, "shape", None)
    if shape is None or not all(isinstance(d, tirx.IntImm) for d in shape) or len(shape) < 2 \
            or int(shape[-1]) < lanes:
        return False
    axes = [int(a) for a in (axes if isinstance(axes, (list, tuple, tvm.ir.Array)) else [axes])]
    return [a % len(shape) for a in axes] == [len(shape) - 1]


def _layer_norm_applies(ty, axes, _epsilon, center, scale, *, lanes) -> bool:
    return _last_axis(ty, axes, lanes=lanes) and bool(center) and bool(scale)


@tvm.transform.module_pass(opt_level=0, name="mmcompile.RowReductions")
class RowReductions:
    """Rewrite float32 softmax and layer norm over the last axis of a static shape to
    :func:`row_softmax` / :func:`row_layer_norm` (before ``FastMath``, which would take the
    softmax)."""

    def __init__(self, fast_exp: bool = True, lanes: int = LANES):
        self.fast_exp, self.lanes = fast_exp, lanes

    def transform_module(self, mod, _ctx):
        lanes = self.lanes
        return rewrite_calls(mod, {
            "relax.nn.softmax": (partial(row_softmax, fast_exp=self.fast_exp, lanes=lanes),
                                 ("axis",), partial(_last_axis, lanes=lanes)),
            "relax.nn.layer_norm": (partial(row_layer_norm, lanes=lanes),
                                    ("axes", "epsilon", "center", "scale"),
                                    partial(_layer_norm_applies, lanes=lanes)),
            "relax.mean": (partial(row_mean, lanes=lanes), ("axis", "keepdims"),
                           partial(_trailing_axes, lanes=lanes))})


class RowReduction(VectorRule):
    """Functions built by :func:`row_softmax` / :func:`row_layer_norm` (and whatever
    elementwise ops ``FuseOps`` grouped with them)."""

    @staticmethod
    def _schedule(func, lanes):
        sch = s_tir.Schedule(func)
        found = injective_tail(sch)
        if found is None:
            return None
        infos, names = found
        if not any(name.startswith(PARTIAL) for name in names):
            return None
        last = infos[-1].block_rv
        loops = sch.get_loops(last)
        # One value per row (a mean, and whatever elementwise ops FuseOps put after it: the
        # expanded layer norm's var = mean(x * x) - mean(x)^2, sqrt): every loop is a row loop.
        # Taken for an element loop, the row loop was vectorized with the lane partials'
        # buffers inside it (code generation failed: "VectorizeLoop before LiftStorageAlloc").
        mean = MEAN in names
        row_loops = (loops if mean else loops[:-1]) or loops[:1]
        rows = sch.fuse(*row_loops) if len(row_loops) > 1 else row_loops[0]
        sch.parallel(rows)
        if not mean and len(loops) > 1:
            _vectorize(sch, last, lanes)
        for info in reversed(infos[:-1]):
            sch.compute_at(info.block_rv, rows, preserve_unit_loops=True)
        for info, name in zip(infos[:-1], names):
            if name.startswith(PARTIAL):  # [.., lane, chunk] -> [.., chunk, lane], lanes vector
                vectorize_reduction(sch, info.block_rv, *sch.get_loops(info.block_rv)[-2:])
            elif info.is_injective():
                _vectorize(sch, info.block_rv, lanes)
            else:  # the reduction over the lanes: short, unrolled
                sch.unroll(sch.get_loops(info.block_rv)[-1])
        return sch


def _vectorize(sch, block_rv, lanes):
    inner = sch.get_loops(block_rv)[-1]
    n = extent(sch, inner)
    if n is None or n < 4:
        return
    # A split loop whose length is not a multiple of the lanes gets a predicate, which
    # scalarizes it (the fast exp over rows of 65: softmax 2.7x slower than TVM's); a whole
    # row as one wide vector is legalized by LLVM into full vectors and a short tail.
    if n > lanes and (n % lanes == 0 or n > MAX_WIDE):
        inner = sch.split(inner, [None, lanes])[1]
    sch.vectorize(inner)
