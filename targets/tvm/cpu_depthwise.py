"""CPU schedule for depthwise NCHW convolutions: one channel plane per task, padded in L1, the
kernel window unrolled.

A depthwise convolution (one filter per channel, ``groups == channels``) is a reduction over
the kernel window only: 9 or 25 multiply-adds per output. :class:`~.cpu_matmul.BlockedMatmul`
took it as a matmul whose rows are output channels of one pixel each: its zero padding was a
separate pass over the whole input (a fill and a copy, written to memory and read back), the
window a loop of ``kh x kw`` steps, each loading its input vector again, and the HardSwish
after it computed per element in the write-back.

Here each parallel task is one ``(image, channel)`` plane:

- the task pads its own plane (a fill and a vector copy, ``14 x 14`` floats for a 10x10 map:
  in L1 when the convolution reads it);
- a register tile of up to ``MAX_ACCUMULATORS`` vectors: a few output rows by the output
  width (a width up to three vectors is taken whole, as one vector and a partial one for
  10 or 20 columns; wider maps split into a divisor of it);
- the window unrolled (up to ``UNROLL_TAPS`` taps): each input row a tile reads is loaded
  once per column offset and feeds every output row it reaches (LLVM removes the repeated
  loads), where the loop reloaded it for every tap;
- the bias and activation folded into the accumulator write-back, vectorized.

A stride-2 convolution reads its padded plane with even and odd columns stored apart
(:func:`~.cpu_matmul._deinterleave`), so its vector loads stay contiguous.

Measured (kernels alone, znver3 AVX2, 1 thread, BlockedMatmul -> this rule; onnxruntime's
Conv + HardSwish as a one-op model, NCHWc reorders included): mobilenet_text's 5x5 on
[8, 240, 10, 10] 665 -> 399 us (onnxruntime 475), on [8, 576, 5, 5] 397 -> 271 us (373).
Whole models (same process, alternating, 2 threads): mobilenet_text 1.04x faster at batch 1,
1.15x at batch 8, PaddleOCR's classifier 1.12x, its detector 1.06x; in one bench run against
the previous commit, mobilenet_text went from 1.28x / 1.32x onnxruntime's latency to 1.12x /
1.06x (batch 1 / 8). Not measured on AVX-512, whose 32 registers would take larger tiles than
``MAX_ACCUMULATORS``.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from mmcompile.targets.tvm.cpu_matmul import (_deinterleave, _inline_plain_copy,
                                              _largest_divisor, _neighbours, _reduction,
                                              schedule_epilogues)
from mmcompile.targets.tvm.schedule_util import (ACCUMULATOR_SCOPE, VectorRule, coefficient,
                                                 extent, fill_and_copy)

MAX_ACCUMULATORS = 12  # of AVX2's 16 vector registers; the rest hold an input and a weight
UNROLL_TAPS = 25  # kernel windows up to 5x5 are unrolled whole; larger ones along kw only
# Vectors per tile row on maps wider than three vectors (a divisor of the width's vectors, at
# most this many). PaddleOCR's detector, kernels alone, 1 thread, znver3, tiles of 2 -> 4
# vectors: 3x3 on [1, 16, 160, 320] 453 -> 410 us, on [1, 48, 80, 160] 328 -> 298 us
# (BlockedMatmul 810 / 625 us); 5 vectors (a whole 40-wide row) was slower than either.
WIDE_VECTORS = 4
KINDS = ("SSSSRR", "SSSRR")  # [n, c, h, w, kh, kw]; at batch 1 without n


def _depthwise_reads(block, ivars):
    """``(data, weight)`` regions of a depthwise convolution block over ``[n, c, h, w, kh,
    kw]`` (``n`` None at batch 1, where the loop is gone): the data read at ``[n, c, h*sh +
    kh*dh, w*sw + kw*dw]``, the weights at ``[c, 0, kh, kw]``; None for any other block."""
    n, c, h, w, kh, kw = ivars
    written = block.writes[0].source
    reads = [r for r in block.reads if not r.source.same_as(written)]
    if len(reads) != 2 or any(len(r.region) != 4 for r in reads):
        return None
    data = next((r for r in reads if coefficient(r.region[2].min, h)), None)
    weight = next((r for r in reads if r is not data), None)
    if data is None or weight is None:
        return None
    batch = data.region[0].min
    if not ((batch.same_as(n) if n is not None else isinstance(batch, tirx.IntImm))
            and data.region[1].min.same_as(c) and weight.region[0].min.same_as(c)
            and weight.region[2].min.same_as(kh) and weight.region[3].min.same_as(kw)):
        return None
    if coefficient(data.region[2].min, kh) is None or coefficient(data.region[3].min, kw) is None:
        return None
    return data, weight


def _tile(width: int, height: int, lanes: int) -> tuple[int, int]:
    """``(columns, rows)`` of the register tile for an output plane ``height x width``."""
    if width <= 3 * lanes:
        columns = width
    elif width % lanes == 0:
        columns = lanes * _largest_divisor(width // lanes, WIDE_VECTORS)
    else:
        columns = _largest_divisor(width, 2 * lanes)
    vectors = -(-columns // lanes)
    return columns, _largest_divisor(height, max(1, MAX_ACCUMULATORS // vectors))


class DepthwisePlanes(VectorRule):
    """Depthwise NCHW convolutions (and their elementwise epilogues), a plane per task."""

    @staticmethod
    def _schedule(func, lanes):
        sch = s_tir.Schedule(func)
        infos, main, pool = _reduction(sch)
        if main is None or pool is not None or "".join(main.dom_kind()) not in KINDS:
            return None
        block = sch.get(main.block_rv)
        ivars = [iv.var for iv in block.iter_vars]
        if len(ivars) == 5:  # batch 1: no batch loop
            ivars = [None, *ivars]
        reads = _depthwise_reads(block, ivars)
        if reads is None:
            return None
        stride = coefficient(reads[0].region[3].min, ivars[3])
        neighbours = _neighbours(sch, infos, main.block_rv)
        if neighbours is None:
            return None
        producers, epilogues = neighbours
        producers = [rv for rv in producers if not _inline_plain_copy(sch, rv)]
        if len(producers) > 1 or stride not in (1, 2):
            return None
        if stride == 2 and not (producers and _deinterleave(sch, main.block_rv, producers[0],
                                                              ivars[3])):
            return None  # a stride-2 read from an unpadded input: each vector a gather
        loops = sch.get_loops(main.block_rv)
        *planes, h, w, kh, kw = loops
        height, width = extent(sch, h), extent(sch, w)
        taps = (extent(sch, kh) or 0) * (extent(sch, kw) or 0)
        if height is None or width is None or not taps:
            return None
        columns, rows = _tile(width, height, lanes)
        if columns < 4:
            return None  # narrower maps: the channels-last form (ChannelsLastDepthwise)
        plane = sch.fuse(*planes) if len(planes) > 1 else planes[0]
        ho, hi = sch.split(h, [None, rows])
        if columns == width:
            tile, wi = ho, w
            sch.reorder(plane, ho, kh, kw, hi, wi)
        else:
            tile, wi = sch.split(w, [None, columns])
            sch.reorder(plane, ho, tile, kh, kw, hi, wi)
        sch.parallel(plane)
        acc = sch.cache_write(main.block_rv, 0, ACCUMULATOR_SCOPE)
        sch.reverse_compute_at(acc, tile)
        sch.vectorize(wi)
        sch.unroll(hi)
        sch.unroll(kw)
        if taps <= UNROLL_TAPS:
            sch.unroll(kh)
        sch.decompose_reduction(main.block_rv, kh)
        for block_rv in producers:
            _padded_per_plane(sch, block_rv, plane, lanes, stride == 2)
        sch = schedule_epilogues(sch, main.block_rv, acc, epilogues, tile, lanes)
        sch.vectorize(sch.get_loops(acc)[-1])
        return sch


def _padded_per_plane(sch, block_rv, plane, lanes: int, deinterleaved: bool) -> None:
    """The zero padding computed by each task for its own plane, row by row: a fill of the row
    and a copy of its input (the fill of a whole plane first, then the copies, wrote large
    planes twice through L2: 3x3 on [1, 32, 160, 320], stride 2, 432 -> 392 us; on
    [8, 576, 5, 5] 0.66 -> 0.49x of BlockedMatmul). Rows up to three vectors wide are
    vectorized, wider ones left to LLVM's loop vectorizer; deinterleaved rows (stride 2) in
    unrolled pairs, as :func:`~.cpu_matmul._deinterleaved_pass` does (a vector store would be
    a scatter)."""
    sch.compute_at(block_rv, plane)
    # decomposed at the columns: each row is filled, then copied, while in L1
    for rv in fill_and_copy(sch, block_rv, sch.get_loops(block_rv)[-1]):
        inner = sch.get_loops(rv)[-1]
        size = extent(sch, inner)
        if size is None:
            continue
        if deinterleaved:
            if size % 2 == 0:
                sch.unroll(sch.split(inner, [None, 2])[1])
        elif size <= 3 * lanes:
            sch.vectorize(inner)
