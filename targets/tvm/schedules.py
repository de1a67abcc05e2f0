"""CPU schedules for the loop code TVM generates, applied without tuning.

TVM's ``zero`` pipeline emits serial, unvectorized loops, and TVM 0.27 ships only two dlight
CPU rules (``GEMV``, ``Reduction``). :func:`cpu_rules` lists, first match wins:

- :class:`~.cpu_int8.Int8Contraction`: the int8 kernels of QDQ matmuls / convolutions
  (:mod:`.int8`), tensorized with vpdpbusd / vpmaddwd.
- :class:`~.winograd.WinogradTransform`: the data and output transforms of Winograd
  convolutions (tiles in parallel, channels vectorized).
- :class:`~.rows.RowReduction`: softmax / layer norm rows with vector partial sums.
- :class:`~.column_softmax.ColumnSoftmax`: softmax over another axis, vectorized across the
  last one.
- :class:`~.cpu_depthwise.DepthwisePlanes`: depthwise NCHW convolutions, a channel plane
  per task, padded in L1, the kernel window unrolled.
- :class:`~.cpu_conv.BlockedConv2d`: cache-blocked 2-D convolution (NCHW x packed HWIO), and
  the max pool grouped with it (:mod:`.fuse_pool`), computed per task.
- :class:`~.cpu_matmul.BlockedMatmul`: register-blocked matmul / batched matmul / conv.
- :class:`MatmulLike`: the older unblocked tiling, for reductions BlockedMatmul declines.
- ``dl.cpu.GEMV``, ``dl.cpu.Reduction`` (the other reductions: softmax over another axis, ...).
- :class:`Fallback`: everything else: spatial blocks vectorized along their inner axis
  (:func:`~.schedule_util.vectorized_copy`), outer loops fused and parallel.

Each is wrapped in :class:`SerialIfSmall`, which drops ``parallel`` from kernels below
``SERIAL_BELOW`` iterations (most of a batch-1 transformer's ~100 kernels).

Measured on the CLIP / late-fusion examples, 1 thread, CPU time, ratio to onnxruntime
(1 intra-op thread) in the same run: MatmulLike alone 4.9x / 8x; with BlockedMatmul and the
fast-math rewrite (:mod:`.fast_math`) 0.96x / 1.26x at batch 1, 1.11x / 1.59x at batch 8.
"""

from __future__ import annotations

import math

import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func

from mmcompile.targets.tvm.schedule_util import (all_downstream, extent, lanes_for,
                                                 vectorized_copy, within_reduction)


def _split_loops(sch, block, dom_kind):
    loops = sch.get_loops(block)
    spatial = [loop for loop, kind in zip(loops, dom_kind) if kind == "S"]
    reduce_ = [loop for loop, kind in zip(loops, dom_kind) if kind == "R"]
    return spatial, reduce_


class _CpuRule(dl.ScheduleRule):
    """A rule for LLVM PrimFuncs whose ``_schedule(func, target)`` returns a schedule, or
    None (or raises) when the function is not one it takes: then the next rule tries."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self._schedule(func, target)
        except Exception:  # this rule does not fit: let the next one try
            return None


def _one_reduction(func):
    """``(schedule, blocks, the reduction)`` of a function whose blocks, once dlight inlined
    what it could, are one reduction (no opaque iterators) and injective ones; else None."""
    sch = s_tir.Schedule(func)
    infos = dl.try_inline(sch, normalize_prim_func(sch))
    reductions = [b for b in infos if not b.is_injective()]
    if len(reductions) != 1 or "O" in reductions[0].dom_kind():
        return None
    return sch, infos, reductions[0]


class MatmulLike(_CpuRule):
    """One reduction block and injective epilogues: tiled, vectorized, parallel."""

    @staticmethod
    def _schedule(func, target):
        found = _one_reduction(func)
        if found is None:
            return None
        sch, infos, main = found
        spatial, reduce_ = _split_loops(sch, main.block_rv, main.dom_kind())
        if len(spatial) < 2 or not reduce_:
            return None
        lanes = lanes_for(target)
        cols, rows = extent(sch, spatial[-1]), extent(sch, spatial[-2])
        if cols is None or rows is None or cols % lanes:
            return None
        row_tile = 4 if rows % 4 == 0 else 1
        jo, ji = sch.split(spatial[-1], [None, lanes])
        io, ii = sch.split(spatial[-2], [None, row_tile])
        sch.reorder(*spatial[:-2], io, jo, *reduce_, ii, ji)
        outer = sch.fuse(*spatial[:-2], io)
        sch.parallel(outer)  # before decompose_reduction, which otherwise rejects the schedule
        sch.vectorize(ji)
        sch.unroll(ii)
        sch.decompose_reduction(main.block_rv, reduce_[0])
        epilogues = [b.block_rv for b in infos if b is not main]
        if not within_reduction(sch, main.block_rv, epilogues) \
                or not all_downstream(sch, main.block_rv, epilogues):
            return None
        for block_rv in epilogues:
            sch.reverse_compute_at(block_rv, outer)
            inner = sch.get_loops(block_rv)[-1]
            size = extent(sch, inner)
            if size and size % lanes == 0:
                _, vec = sch.split(inner, [None, lanes])
                sch.vectorize(vec)
        return sch


class WindowReduction(_CpuRule):
    """A pooling over a small window (at most :data:`WINDOW` elements) and its injective
    epilogue: rows in parallel, each a loop along the innermost spatial axis with the window
    unrolled inside, which LLVM vectorizes (a strided window's loads as interleaved ones);
    the epilogue vectorized after the row. dlight's Reduction rule computed one output per
    parallel iteration: AV-MNIST int8 at batch 8, its max pool over 8 x 16 x 112 x 112
    uint8 (with the dequantize, ReLU and quantize after it) took 1.04 ms, now 0.15 ms
    (TVM vectorizing the pool along the outputs instead, the window outside: 0.48 ms)."""

    @staticmethod
    def _schedule(func, target):
        found = _one_reduction(func)
        if found is None:
            return None
        sch, infos, main = found
        rule = sch.get(main.block_rv).annotations.get("schedule_rule")
        if rule is None or not str(rule).startswith("meta_schedule.pool"):
            return None  # TOPI's pools carry this annotation
        spatial, reduce_ = _split_loops(sch, main.block_rv, main.dom_kind())
        sizes = [extent(sch, loop) for loop in reduce_]
        if len(spatial) < 2 or not reduce_ or None in sizes or math.prod(sizes) > WINDOW:
            return None
        itemsize = sch.get(main.block_rv).writes[0].source.dtype.bits // 8
        lanes = lanes_for(target) * 4 // itemsize  # a vector register of the output type
        epilogues = [b.block_rv for b in infos if b is not main]
        if not within_reduction(sch, main.block_rv, epilogues) \
                or not all_downstream(sch, main.block_rv, epilogues):
            return None
        sch.reorder(*spatial, *reduce_)
        rows = sch.fuse(*spatial[:-1])
        sch.parallel(rows)
        for loop in reduce_:
            sch.unroll(loop)
        sch.decompose_reduction(main.block_rv, reduce_[0])
        for block_rv in epilogues:
            sch.reverse_compute_at(block_rv, rows)
            inner = sch.get_loops(block_rv)[-1]
            if (size := extent(sch, inner)) and size > lanes:
                inner = sch.split(inner, [None, lanes])[1]
            sch.vectorize(inner)
        return sch


WINDOW = 64  # the largest window WindowReduction takes (an 8 x 8 pool)


class Fallback(_CpuRule):
    """Any block: fuse the spatial loops, parallelize, vectorize the purely spatial ones."""

    @staticmethod
    def _schedule(func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = dl.try_inline(sch, infos)
        lanes = lanes_for(target)
        for block in infos:
            if not sch.get_loops(block.block_rv) or "O" in block.dom_kind():
                continue
            spatial, reduce_ = _split_loops(sch, block.block_rv, block.dom_kind())
            if not spatial:
                continue
            if not reduce_:
                vectorized_copy(sch, block.block_rv, lanes)
                continue
            sch.reorder(*spatial, *reduce_)
            sch.parallel(sch.fuse(*spatial))
        return sch


# Below this many loop iterations (summed over blocks) a kernel runs serially: waking TVM's
# thread pool and its static-partition barrier costs more than it saves, and on a loaded
# machine a descheduled worker stalls the whole kernel.
SERIAL_BELOW = 1 << 15


def _work(func) -> int | None:
    try:
        infos = normalize_prim_func(s_tir.Schedule(func))
    except Exception:
        return None
    if not infos:
        return None
    total = 0
    for info in infos:
        n = 1
        for it in info.iters:
            # TVM 0.27's dlight gives extents as ints (older ones: IntImm); reading only
            # IntImm made every kernel "unknown" and none ran serially
            dom = int(it.dom.value) if isinstance(it.dom, tirx.IntImm) else it.dom
            if not isinstance(dom, int):
                return None
            n *= dom
        total += n
    return total


def has_reduction(func) -> bool:
    """Whether a PrimFunc has a block with a reduction iterator."""
    found = []
    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, lambda block: found.append(any(
        iv.iter_type == tirx.IterVar.CommReduce for iv in block.iter_vars))))
    return any(found)


class SerialIfSmall(dl.ScheduleRule):
    """Run ``rule``; for kernels under ``min_work`` iterations replay its trace minus
    ``parallel``. A rule for reductions (``reduces``) is not tried on a function without
    one: most kernels are elementwise or layout copies, which otherwise went through every
    rule to reach :class:`Fallback` (each try analyses and schedules a copy of the function;
    CLIP int8 at batch 8: 2.1 s of its 3.2 s in the rules were such misses)."""

    def __init__(self, rule, min_work: int = SERIAL_BELOW, reduces: bool = False):
        self.rule, self.min_work, self.reduces = rule, min_work, reduces

    def apply(self, func, target, tunable):
        if self.reduces and isinstance(func, tirx.PrimFunc) and not has_reduction(func):
            return None
        try:
            sch = self.rule.apply(func, target, tunable)
        except Exception:  # dlight's own rules assert on shapes they do not handle (a full
            return None    # reduction to a scalar): let the next rule try
        if sch is None or isinstance(sch, list):
            return sch
        work = _work(func)
        if work is None or work >= self.min_work:
            return sch
        insts = [i for i in sch.trace.insts if i.kind.name != "Parallel"]
        serial = s_tir.Schedule(func)
        try:
            s_tir.schedule.Trace(insts, {}).apply_to_schedule(serial, remove_postproc=False)
        except Exception:
            return sch
        return serial


def cpu_rules(serial_below: int = SERIAL_BELOW) -> list:
    """The CPU rules in priority order (first that applies wins)."""
    from mmcompile.targets.tvm.column_softmax import ColumnSoftmax
    from mmcompile.targets.tvm.cpu_conv import BlockedConv2d
    from mmcompile.targets.tvm.cpu_depthwise import DepthwisePlanes
    from mmcompile.targets.tvm.cpu_int8 import Int8Contraction
    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    from mmcompile.targets.tvm.rows import RowReduction
    from mmcompile.targets.tvm.winograd import WinogradTransform
    rules = [(Int8Contraction(), True), (WinogradTransform(), False), (RowReduction(), True),
             (ColumnSoftmax(), True), (DepthwisePlanes(), True), (BlockedConv2d(), True),
             (BlockedMatmul(), True), (MatmulLike(), True), (WindowReduction(), True),
             (dl.cpu.GEMV(), True), (dl.cpu.Reduction(), True), (Fallback(), False)]
    # (rule, whether it schedules reductions only); serial_below=0: never serial
    return [SerialIfSmall(r, serial_below, reduces=reduces) for r, reduces in rules]


def schedule_cpu(mod, target, serial_below: int = SERIAL_BELOW):
    """Apply the CPU rules to every PrimFunc of ``mod`` (after the ``zero`` pipeline), then
    give guarded vector loops a whole-vector branch (:mod:`.vector_tails`)."""
    from mmcompile.targets.tvm.cpu_amx import configure_tiles
    from mmcompile.targets.tvm.vector_tails import split_guarded_vectors
    with target:
        return configure_tiles(split_guarded_vectors(
            dl.ApplyDefaultSchedule(*cpu_rules(serial_below))(mod)))


def schedule_cuda(mod, target):
    """dlight's GPU rules: every kernel needs thread bindings; Fallback must come last."""
    with target:
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
