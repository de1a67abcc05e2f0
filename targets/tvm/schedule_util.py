"""Helpers shared by the CPU schedule rules."""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target.codegen import target_has_features


# Scope of the register tiles' accumulator buffers (``cache_write``). TVM 0.27 lowers a
# "local" allocation inside a parallel loop to TVMBackendAllocWorkspace / FreeWorkspace calls
# (the runtime's workspace pool: a lock-free list walk plus thread-local lookups) on every
# iteration; only "global" allocations under 1 KB become stack allocas (LowerTVMBuiltin).
# A matmul's per-tile accumulators (at most 12 vectors) are far below that. Measured
# (znver3, 2 threads, one process, interleaved, this scope against "local"): Winograd's
# batched matmul 0.19 -> 0.11 ms (a quarter of its time had been the pool); whole models
# CLIP 0.93x / 0.92x (batch 1 / 8), Whisper 0.90x / 0.88x, MM-IMDb 0.92x / 0.93x, MOSEI-TFN
# 0.92x / 0.78x, late fusion 0.90x / 0.95x, AV-MNIST 0.98x / 1.00x.
ACCUMULATOR_SCOPE = "global"


def extent(sch, loop) -> int | None:
    """The loop's constant extent, or None when symbolic."""
    value = sch.get(loop).extent
    return int(value) if isinstance(value, tirx.IntImm) else None


def lanes_for(target) -> int:
    """float32 lanes per vector register for the target's mcpu: 16 with AVX-512, 8 with AVX/AVX2,
    else 4 (SSE, NEON).

    Read off the CPU's features, not ``llvm_get_vector_width``: this wheel's LLVM answers 512
    for every x86 CPU (znver3 and haswell included), and 16-lane tiles on an AVX2 machine split
    each vector in two and spill the accumulators (AV-MNIST's 16->32 5x5 convolution: 1.76 ms
    with 16 lanes, 1.0 ms with 8, on znver3).
    """
    for feature, lanes in (("avx512f", 16), ("avx", 8)):
        if has_features(target, feature):
            return lanes
    return 4


def has_features(target, *features: str) -> bool:
    """Whether an LLVM CPU ``target`` has every one of ``features`` (LLVM's names: ``avx2``,
    ``avx512vnni``); False for other targets and for a CPU whose LLVM backend knows no such
    feature (not x86)."""
    if target.kind.name != "llvm":
        return False
    try:
        return all(target_has_features(f, target) for f in features)
    except Exception:  # not an x86 target: LLVM knows no such feature
        return False


def with_functions(mod, updates: dict):
    """``mod`` with the functions in ``updates`` (global var -> function) replaced: a copy
    when there are any, else ``mod`` itself."""
    if not updates:
        return mod
    mod = mod.clone()
    for gv, func in updates.items():
        mod.update_func(gv, func)
    return mod


def coefficient(expr, var) -> int | None:
    """The integer coefficient of ``var`` in an affine index ``expr`` (None: not affine)."""
    if expr.same_as(var):
        return 1
    if var not in tirx.analysis.undefined_vars(expr):
        return 0
    if isinstance(expr, (tirx.Add, tirx.Sub)):
        a, b = coefficient(expr.a, var), coefficient(expr.b, var)
        if a is None or b is None:
            return None
        return a + b if isinstance(expr, tirx.Add) else a - b
    if isinstance(expr, tirx.Mul):
        for factor, other in ((expr.a, expr.b), (expr.b, expr.a)):
            if isinstance(factor, tirx.IntImm):
                c = coefficient(other, var)
                return None if c is None else c * int(factor)
    return None


def parallel_spatial(sch, block_rv, lanes: int) -> None:
    """Fuse all loops of a purely spatial block, parallelize, vectorize the inner lanes."""
    fused = sch.fuse(*sch.get_loops(block_rv))
    n = extent(sch, fused)
    if n and n % lanes == 0 and n >= 4 * lanes:
        outer, vec = sch.split(fused, [None, lanes])
        sch.parallel(outer)
        sch.vectorize(vec)
    else:
        sch.parallel(fused)


def vectorized_copy(sch, block_rv, lanes: int) -> None:
    """A purely spatial block (a concatenation, split, resize, transpose, elementwise op):
    vectorized along its innermost axis, the outer axes fused and parallel.

    The vector is the innermost axis in the widest of ``lanes``, ``lanes / 2``, ``lanes / 4``
    (at least 4) that divides it; else the two innermost axes fused, when ``lanes`` divides
    their product; else none (LLVM's loop vectorizer gets the innermost loop). Fusing every
    axis into one vectorized loop instead gives each lane its own division and modulo per
    index, and a condition per lane where a concatenation selects its input by channel: LLVM
    scalarizes both. Measured on YOLO-audio's kernels (znver5, 1 thread): a 3-way channel
    concatenation of 32x20x20 maps 27.6 -> 2.9 us, a 2-way split of 32x40x40 45 -> 1.7 us,
    a 2x nearest upsample of 128x10x10 concatenated with 64x20x20 107 -> 2.4 us.
    """
    loops = sch.get_loops(block_rv)
    sizes = [extent(sch, loop) for loop in loops]
    if not loops or None in sizes:
        parallel_spatial(sch, block_rv, lanes)
        return
    inner, width = 1, next((w for w in (lanes, lanes // 2, lanes // 4)
                            if w >= 4 and sizes[-1] % w == 0), None)
    if width is not None and _transposed_copy(sch, block_rv, loops, sizes, width):
        return
    if width is None and len(loops) > 1 and (sizes[-1] * sizes[-2]) % lanes == 0:
        inner, width = 2, lanes
    _vectors_over_tail(sch, loops, sizes, inner, width)


def _vectors_over_tail(sch, loops, sizes, inner: int, width: int | None) -> None:
    """The ``inner`` innermost of ``loops`` fused and split into vectors of ``width`` (None:
    the row stays whole, for LLVM's loop vectorizer), the outer loops fused and parallel; with
    fewer than 4 outer iterations the vector steps join the parallel loop."""
    steps = sch.fuse(*loops[-inner:]) if inner > 1 else loops[-1]
    if width is not None:
        steps, lane = sch.split(steps, [None, width])
        sch.vectorize(lane)
    outer = list(loops[:-inner])
    if np.prod(sizes[:-inner]) < 4:  # too few rows to share: share the vectors
        outer.append(steps)
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


# Rows of a transposing copy's tile: the input lines a tile reads stay in L1 while it
# writes them out as columns.
TRANSPOSE_TILE = 8


def _read_stride(read, var) -> int | None:
    """The element stride (row-major) along ``var`` of the buffer region ``read``, or None
    where an index is not affine in it or the buffer's shape is symbolic."""
    dims = read.source.shape
    if not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    step, total = 1, 0
    for r, d in zip(reversed(read.region), reversed(dims)):
        c = coefficient(r.min, var)
        if c is None:
            return None
        total += c * step
        step *= int(d)
    return total


def _transposed_copy(sch, block_rv, loops, sizes, width: int) -> bool:
    """A copy whose output's innermost axis walks its input with a stride (a transpose of
    the last two axes: Magika's [508, 512] -> [512, 508] after its convolution's GEMM) is
    tiled: ``TRANSPOSE_TILE`` rows of the axis the input is contiguous along by a vector of
    ``width`` of the output's, so the input lines a tile gathers from are read from L1 for
    every row. Untiled, each output row walked a whole input column (508 lines, 2 KB apart)
    and the next row read the same lines again from L2: 0.73 ms for 260 K floats (one
    thread, znver3), 0.24 ms tiled. Returns whether it applied (one read buffer, affine
    indices)."""
    block = sch.get(block_rv)
    ivars = [iv.var for iv in block.iter_vars]
    if len(ivars) != len(loops) or len(loops) < 2 or len(block.reads) != 1:
        return False
    read = block.reads[0]
    if _read_stride(read, ivars[-1]) in (None, 0, 1):
        return False
    row = next((i for i in range(len(loops) - 1) if _read_stride(read, ivars[i]) == 1), None)
    if row is None or sizes[row] % TRANSPOSE_TILE:
        return False
    ro, ri = sch.split(loops[row], [None, TRANSPOSE_TILE])
    co, ci = sch.split(loops[-1], [None, width])
    others = [loop for i, loop in enumerate(loops[:-1]) if i != row]
    sch.reorder(*others, ro, co, ri, ci)
    sch.parallel(sch.fuse(*others, ro) if others else ro)
    sch.unroll(ri)
    sch.vectorize(ci)
    return True


def parallel_rows(sch, block_rv, lanes: int) -> None:
    """A spatial block whose innermost extent is not a multiple of ``lanes``: the outer loops
    fused and parallel, the innermost left to LLVM's loop vectorizer (a plain copy or fill,
    which it vectorizes with a scalar tail), or vectorized whole when it fits in a vector.
    Fusing it too would vectorize across rows, and each lane's indices would then be divided
    and reduced modulo the row length: LLVM scalarizes that into a gather."""
    loops = sch.get_loops(block_rv)
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]))
    n = extent(sch, loops[-1])
    if n and n < lanes and n % 4 == 0:
        sch.vectorize(loops[-1])


def fill_and_copy(sch, block_rv, loop=None) -> list:
    """A zero padding block split into a fill of the border value and a copy of the input
    (``decompose_padding``; the fill covers what ``loop``, by default the block's outermost,
    iterates over, and is placed before it): ``[fill, copy]``; ``[block_rv]`` for any other
    block."""
    loops = sch.get_loops(block_rv)
    at = loop if loop is not None else (loops[0] if loops else None)
    try:
        if at is not None and sch.can_decompose_padding(block_rv, at):
            return [sch.decompose_padding(block_rv, at), block_rv]
    except Exception:  # not a padding pattern TVM recognises: schedule it as it is
        pass
    return [block_rv]


def parallel_pass(sch, block_rv, lanes: int) -> None:
    """A spatial block (a reduction's producer, or an epilogue left out of its tiles) in its
    own parallel pass. A zero padding (``if_then_else`` on the indices, what TVM legalizes
    ``Pad`` and a convolution's padding to) is split into a fill of the border value and a
    copy of the input without a condition (``decompose_padding``), so both vectorize; a
    lane-dependent condition scalarizes the whole loop, with a division per index per element
    (PaddleOCR's classifier spent ~70% of its time padding for its depthwise 5x5
    convolutions).
    """
    for rv in fill_and_copy(sch, block_rv):
        inner = extent(sch, sch.get_loops(rv)[-1])
        if inner is not None and inner % lanes:
            if not contiguous_rows(sch, rv, lanes):
                parallel_rows(sch, rv, lanes)
        else:
            parallel_spatial(sch, rv, lanes)


def contiguous_rows(sch, block_rv, lanes: int) -> bool:
    """A spatial block whose rows are not whole vectors (an NCHW map of 20 x 20, 10 x 10)
    vectorized across rows where that stays contiguous: the fewest innermost axes whose
    product ``lanes`` divides are fused and vectorized, when every buffer the block touches is
    either read along them in the output's own row-major order or not indexed by them at all
    (a per-channel bias). Then each vector is one contiguous load or store per buffer and no
    lane divides an index (the concern of :func:`parallel_rows`). Returns whether it applied.

    Per row instead, LLVM vectorized 20 elements as a vector and a scalar tail of 4, and the
    fast sigmoid of SiLU ran mostly scalar: YOLO-audio's 1x1 convolutions with SiLU on 20 x 20
    maps cost 2-3x those without it (40 vs 14 us, kernel alone, 2 threads).
    """
    block = sch.get(block_rv)
    loops = sch.get_loops(block_rv)
    sizes = [extent(sch, loop) for loop in loops]
    ivars = [iv.var for iv in block.iter_vars]
    if len(ivars) != len(loops) or None in sizes or len(block.writes) != 1:
        return False
    tail = next((k for k in range(2, len(loops) + 1) if np.prod(sizes[-k:]) % lanes == 0), None)
    if tail is None:
        return False
    row_major = [int(np.prod(sizes[len(sizes) - tail + i + 1:])) for i in range(tail)]

    def strides(region):
        return [_read_stride(region, v) for v in ivars[-tail:]]

    if strides(block.writes[0]) != row_major \
            or any(strides(r) not in (row_major, [0] * tail) for r in block.reads):
        return False
    _vectors_over_tail(sch, loops, sizes, tail, lanes)
    return True


def injective_tail(sch):
    """``(blocks, names)`` of a function whose last block is injective (a reduction kernel
    with its elementwise ops), normalized; None for any other function."""
    infos = normalize_prim_func(sch)
    if infos is None or not infos[-1].is_injective():
        return None
    return infos, [sch.get(b.block_rv).name_hint for b in infos]


def vectorize_reduction(sch, block_rv, spatial, reduce_loop) -> None:
    """A reduction block's loops ``[spatial, reduce_loop]`` turned to ``[reduce_loop,
    spatial]`` with ``spatial`` vectorized: a vector of partial results, each step one vector
    operation; the initialization split off and vectorized too."""
    sch.reorder(reduce_loop, spatial)
    sch.vectorize(spatial)  # before decompose_reduction, which otherwise rejects it
    init = sch.decompose_reduction(block_rv, reduce_loop)
    sch.vectorize(sch.get_loops(init)[-1])


def _write_shape(sch, block_rv) -> list[int | None]:
    written = sch.get(block_rv).writes[0].source  # TVM 0.27: a TensorRegion's buffer is .source
    return [int(d) if isinstance(d, tirx.IntImm) else None for d in written.shape]


def within_reduction(sch, main_rv, others) -> bool:
    """Whether every block scheduled under the reduction's tiles writes no more elements than
    the reduction does. An epilogue that grows the tensor (Pad after a Linear) would be
    computed only where the reduction's tiles reach, leaving the rest uninitialised; reshapes,
    transposes and elementwise epilogues keep the size and are fine."""
    def size(block_rv) -> int | None:
        shape = _write_shape(sch, block_rv)
        return None if any(d is None for d in shape) else int(np.prod(shape, dtype=np.int64))

    limit = size(main_rv)
    return limit is not None and all((s := size(rv)) is not None and s <= limit for rv in others)


def first_growing(sch, main_rv, epilogues) -> int:
    """The index of the first of ``epilogues`` that writes more elements than the reduction
    (a squeeze-excitation gate, (1, C, 1, 1), multiplied into its (1, C, H, W) feature map);
    ``len(epilogues)`` when none does. Those from it on cannot run under the reduction's tiles
    (:func:`within_reduction`) but can after them."""
    return next((i for i, rv in enumerate(epilogues) if not within_reduction(sch, main_rv, [rv])),
                len(epilogues))


def inline_side_blocks(sch, main_rv, epilogues) -> list | None:
    """The ``epilogues`` that read the reduction's result (through the ones before them),
    after inlining the others into the blocks that read them; None when one cannot be
    inlined.

    Those others are injective chains over other inputs that FuseOps put into the same
    kernel, the second operand of a residual add (``relu(conv(x) + b) + relu(y + b2)``:
    CenterFace's neck). Left as they were, no blocked rule took the kernel and dlight's
    generic reduction rule computed one output element per task (24 MACs each); inlined,
    each is recomputed where its consumer reads it, an elementwise expression."""
    kept, side = _downstream_split(sch, main_rv, epilogues)
    for block_rv in reversed(side):  # consumers first: a chain folds into its reader
        try:
            sch.compute_inline(block_rv)
        except Exception:  # a side block that writes a function output, say
            return None
    return kept


def _downstream_split(sch, main_rv, epilogues) -> tuple[list, list]:
    """``epilogues`` (in the function's topological order) split into those that read the
    reduction's result, directly or through the ones before them, and the others."""
    downstream = [w.source for w in sch.get(main_rv).writes]
    kept, side = [], []
    for block_rv in epilogues:
        block = sch.get(block_rv)
        if any(r.source.same_as(b) for r in block.reads for b in downstream):
            downstream.extend(w.source for w in block.writes)
            kept.append(block_rv)
        else:
            side.append(block_rv)
    return kept, side


def all_downstream(sch, main_rv, epilogues) -> bool:
    """Whether every epilogue reads (through the ones before it) the reduction's result.

    An epilogue that does not (``var * var`` of another input in an expanded LayerNorm,
    fused after the mean) cannot be confined to one tile: computed under the tile loop it
    covers every row, and the blocks after it read rows that other tiles have not written
    yet (NaN in onnx's layer_normalization_*_expanded tests once AVX2 tiles split the rows).
    """
    return not _downstream_split(sch, main_rv, epilogues)[1]


class VectorRule(dl.ScheduleRule):
    """A CPU rule whose ``_schedule(func, lanes)`` returns a schedule, or None (or raises)
    when the function does not fit it: the next rule then tries.

    With ``narrower`` set, a function that does not fit whole vectors of the CPU's width is
    tried again with half and a quarter of it (down to 4 lanes): a convolution with 200
    output channels does not fill 16-lane AVX-512 vectors but fills 8-lane ones. Without
    that, such kernels fell through to dlight's generic reduction rule: a 96x3 convolution
    over 20 channels to 200 (an EEG model) took 130 ms, against onnxruntime's 2 ms for the
    whole model."""

    narrower = False

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        widest = lanes_for(target)
        for lanes in (widest, widest // 2, widest // 4) if self.narrower else (widest,):
            if lanes < 4:
                break
            try:
                sch = self._schedule(func, lanes)
            except Exception:  # the rule does not fit this function: let the next one try
                sch = None
            if sch is not None:
                return sch
        return None

    @staticmethod
    def _schedule(func, lanes):
        raise NotImplementedError
