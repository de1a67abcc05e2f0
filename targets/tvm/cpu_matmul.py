"""Register-blocked CPU schedule for one reduction block (matmul, batched matmul, conv).

The micro-kernel is the outer product every BLAS uses: an ``mi x (nj * lanes)`` tile of the
output lives in a ``local`` accumulator (``cache_write``) that LLVM keeps in vector registers,
and each reduction step does ``nj`` vector loads of the operand that varies along the vector
axis plus ``mi`` scalar broadcasts of the other one. Which loop is blocked is read off the
buffer accesses, not the op name: the vector axis is the innermost spatial loop, the row axis
is the innermost spatial loop that only the broadcast operands index (``i`` for a matmul, the
output channel for an NCHW convolution, where blocking ``oh`` would re-load the input).

Details that each mattered on the CLIP / late-fusion examples (AVX-512, 2 threads):

- Row tile = the largest divisor of the row extent up to 8 (65 tokens -> 5): no predicates,
  so the tile stays in registers. The previous rule used 4 or else 1 (no blocking at 65 rows).
- Vector axes that are not a multiple of the lanes (attention scores, 65 keys) are padded with
  ``pad_einsum`` instead of a predicated tail, which LLVM scalarizes: 432 us -> 32 us.
- Producers (the zero-padding of a convolution) stay a separate parallel loop: inlined, the
  ``if_then_else`` sits in the innermost loop and blocks vectorization (12.9 ms -> 0.48 ms).
- Epilogues (bias, activation) are computed per tile under the same parallel loop.

Kernel timings (2 threads, before -> after): [65,128]x[128,128] 50 -> 12 us;
Q@K^T [4,65,32]x[4,32,65] 569 -> 32 us; conv 64->128 3x3 on 16x16 9 ms -> 0.48 ms.
"""

from __future__ import annotations

import numpy as np
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad  # what a BufferLoad is in TVM 0.27
from tvm.s_tir.dlight.analysis import normalize_prim_func

from mmcompile.targets.tvm.schedule_util import (ACCUMULATOR_SCOPE, VectorRule, coefficient,
                                                 extent, fill_and_copy, first_growing,
                                                 inline_side_blocks, parallel_pass)


def _index_vars(region) -> set:
    return {v for r in region for v in tirx.analysis.undefined_vars(r.min)}


def _largest_divisor(n: int, limit: int) -> int:
    return next((t for t in range(limit, 1, -1) if n % t == 0), 1)


def _reduction(sch):
    """``(infos, main, pool)``: the function's blocks but the pool, its reduction and, when it
    ends in a second reduction over the first one's result (a max pool grouped with its
    convolution by :func:`~.fuse_pool.FuseConvPool`), that block (else None); all None when
    the function is neither."""
    infos = normalize_prim_func(sch)
    if infos is None:
        return None, None, None
    reductions = [b for b in infos if not b.is_injective()]
    if any("O" in b.dom_kind() for b in reductions):
        return None, None, None
    if len(reductions) == 1:
        return infos, reductions[0], None
    if len(reductions) == 2 and reductions[1] is infos[-1]:
        return infos[:-1], reductions[0], reductions[1]
    return None, None, None


def pool_pass(sch, pool_rv) -> None:
    """A pool left after the reduction's tiles: one parallel pass over its output rows."""
    loops = sch.get_loops(pool_rv)
    kinds = [iv.iter_type for iv in sch.get(pool_rv).iter_vars]
    spatial = [loop for loop, kind in zip(loops, kinds) if kind == tirx.IterVar.DataPar]
    sch.parallel(sch.fuse(*spatial[:-1]))


def _neighbours(sch, infos, main_rv):
    """The reduction's ``(producers, epilogues)`` among ``infos``, in the function's order,
    blocks over other inputs inlined into the epilogues that read them
    (:func:`~.schedule_util.inline_side_blocks`), or None when that fails."""
    block = sch.get(main_rv)
    others = [b.block_rv for b in infos if not sch.get(b.block_rv).same_as(block)]
    producers = [rv for rv in others if _is_producer(sch, rv, main_rv)]
    epilogues = inline_side_blocks(sch, main_rv, [rv for rv in others if rv not in producers])
    return None if epilogues is None else (producers, epilogues)


def _narrow_integers(sch, block_rv) -> bool:
    """Whether ``block_rv`` reduces into 8- or 16-bit integers (a max pool of a quantized
    tensor): vectors of a few such lanes gather byte by byte (``vpinsrb``) and pass through
    the stack (late fusion's int8 audio pools: 50 us against 5 for the float ones)."""
    dtype = sch.get(block_rv).writes[0].source.dtype
    return dtype.type_code in (0, 1) and dtype.bits < 32  # int / uint


class BlockedMatmul(VectorRule):
    """One reduction block with injective producers/epilogues, register-blocked."""

    narrower = True  # channel counts that fill only narrower vectors (see VectorRule)

    @staticmethod
    def _schedule(func, lanes):
        sch = s_tir.Schedule(func)
        infos, main, pool = _reduction(sch)
        if main is None or _narrow_integers(sch, main.block_rv):
            return None
        kinds = main.dom_kind()
        spatial = [i for i, k in enumerate(kinds) if k == "S"]
        reduce_ = [i for i, k in enumerate(kinds) if k == "R"]
        if not spatial or not reduce_:
            return None
        vec = _vector_axis(sch, main.block_rv, spatial, lanes)
        cols = extent(sch, sch.get_loops(main.block_rv)[vec])
        if cols is None:
            return None
        pad = [1] * len(kinds)
        if vec == spatial[-1] and cols % lanes and cols > lanes:
            pad[vec] = lanes
        row = _row_axis(sch, main.block_rv, spatial, vec)
        rows = extent(sch, sch.get_loops(main.block_rv)[row]) if row is not None else 1
        if rows is None:
            return None
        if row is not None:
            pad[row] = row_padding(rows, row_limit(-(-cols // pad[vec]) * pad[vec], lanes))
        if any(f > 1 for f in pad):
            try:  # einsum only (matmul); a convolution keeps the predicated tail
                sch.pad_einsum(main.block_rv, pad)
                infos, main, pool = _reduction(sch)
            except Exception:
                pass
        neighbours = _neighbours(sch, infos, main.block_rv)
        if neighbours is None:
            return None
        producers, epilogues = neighbours
        producers = [rv for rv in producers if not _inline_plain_copy(sch, rv)]
        block = sch.get(main.block_rv)
        loops = sch.get_loops(main.block_rv)
        ivars = [iv.var for iv in block.iter_vars]
        cols = extent(sch, loops[vec])
        rest = [i for i in spatial if i != vec]
        rows = extent(sch, loops[row]) if row is not None else 1
        if rows is None:
            return None
        # A width that is not whole vectors is one partial vector (up to two) or a divisor.
        width = cols if cols <= 2 * lanes else _largest_divisor(cols, lanes)
        if cols % lanes and width < 4:
            return None  # no predicated tail: LLVM scalarizes it, the accumulator leaves registers
        reduce_loops = [loops[i] for i in reduce_]
        small_planes = _small_planes(sch, loops, spatial, vec)  # before the loops are split
        ii = mi = None
        others = [loops[i] for i in rest]
        if row is not None:
            limit = row_limit(cols, lanes)
            group = _row_group(sch, main.block_rv, loops, spatial, vec, row, limit)
            others = [loops[i] for i in rest if i not in group]
            if len(group) > 1:  # [n, o, h, w] -> [o, n * h * w]: the rows are every pixel
                mi = _box_rows([extent(sch, loops[i]) for i in group], limit)
                sch.reorder(*others, *[loops[i] for i in group], loops[vec])
                row_loop = sch.fuse(*[loops[i] for i in group])
            else:
                row_loop = loops[row]
                mi = _largest_divisor(rows, limit)
            io, ii = sch.split(row_loop, [None, mi])
        # Weights larger than L2: each task's column panel is streamed once per row tile, so
        # the panels go outermost (one stays in L2 while the tasks sweep the rows) and, where
        # the rows give tiles of 4 or fewer, tiles are 4 vectors wide (AVX-512's registers
        # hold 16 accumulators and the operands): the panel is reused by 4 rows x 64 columns.
        # magika's [5, 1] convolution over 256 -> 512 channels (2.6 MB of weights, 508 rows):
        # 2.7 -> 2.1-2.3 ms on 2 threads, AVX-512 (onnxruntime 1.4).
        large = _weight_bytes(sch, main.block_rv, vec, spatial) > PANEL_OUTER_BYTES
        if cols % lanes == 0:
            nj = 2 if cols % (2 * lanes) == 0 else 1
            # An odd number of vectors (240, 144, 48 channels on AVX-512) took tiles one vector
            # wide: a load and a broadcast per FMA or two. Three vectors wide, up to 24
            # accumulators, stay within AVX-512's 32 registers. mobilenet_text's 1x1
            # convolutions, batch 8, 1 thread, kernel alone: 40 -> 240 on 10x10 177 -> 122 us,
            # 144 -> 48 89 -> 63 us, 120 -> 48 69 -> 49 us, 48 -> 144 112 -> 82 us.
            # AVX2's 16 registers take three vectors by 3 rows or five by 2 (row_limit; 4 rows
            # of three spilled accumulators in the reduction loop: 1.5x slower). Same layers,
            # znver3, same-process A/B of the kernels: 240 -> 40 on 10x10 332 -> 288 us (five
            # wide), 72 -> 24 on 20x20 212 -> 177 us, 88 -> 24 266 -> 239 us (three wide).
            if nj == 1:  # mi <= row_limit already keeps the accumulators in registers
                nj = next((n for n in ((3,) if lanes >= 16 else (3, 5))
                           if cols % (n * lanes) == 0), 1)
            if large and lanes >= 16 and cols % (4 * lanes) == 0 and mi is not None and mi <= 4:
                nj = 4
            jo, jn, ji = sch.split(loops[vec], [None, nj, lanes])
        else:
            jo, jn, ji = sch.split(loops[vec], [None, 1, width])
        if row is None:
            sch.reorder(*others, jo, *reduce_loops, jn, ji)
            outer = sch.fuse(*others, jo) if others else jo
        elif small_planes:
            # vectors along the channels of an NCHW output with small planes: a task writes its
            # channels' rows one element apart, and tasks of one channel tile but other rows
            # write the same cache lines (a 5x5 plane is 100 bytes). With the channel tiles
            # outermost the threads share none: mobilenet_text's 96 -> 576 on 5x5, kernel
            # alone, 48.5 us on 2 threads (25.7 on one) -> 14.1; the model at batch 1
            # 0.96-0.97x (saved artifacts alternating in one process)
            sch.reorder(jo, *others, io, *reduce_loops, ii, jn, ji)
            outer = sch.fuse(jo, *others, io)
        else:
            tasks = (jo, io) if large else (io, jo)
            sch.reorder(*others, *tasks, *reduce_loops, ii, jn, ji)
            outer = sch.fuse(*others, *tasks)
        sch.parallel(outer)  # before decompose_reduction, which otherwise rejects the schedule
        acc = sch.cache_write(main.block_rv, 0, ACCUMULATOR_SCOPE)
        _vector_dim_last(sch, main.block_rv, ivars[vec])
        sch.reverse_compute_at(acc, outer)
        sch.vectorize(ji)
        sch.unroll(jn)
        if ii is not None:
            sch.unroll(ii)
        sch.decompose_reduction(main.block_rv, reduce_loops[0])
        for block_rv in producers:
            if _deinterleave(sch, main.block_rv, block_rv, ivars[vec]):
                _deinterleaved_pass(sch, block_rv)  # stride 2 along the vector
            else:
                parallel_pass(sch, block_rv, lanes)
        sch = schedule_epilogues(sch, main.block_rv, acc, epilogues, outer, lanes)
        _vectorize_innermost(sch, acc, lanes)
        unroll_write_back(sch, acc, outer)
        if pool is not None:
            pool_pass(sch, pool.block_rv)
        return sch


PLANE_BYTES = 1024  # an output plane this small is shared by the row tasks' cache lines


def _small_planes(sch, loops, spatial, vec) -> bool:
    """Whether the vector axis is not the output's innermost, the spatial extents after it
    (an NCHW output's plane) hold at most :data:`PLANE_BYTES` of float32, and no batch
    before it splits the tasks already (late fusion at batch 8: 1.02-1.03x slower with the
    channel tiles outermost)."""
    after = [extent(sch, loops[i]) for i in spatial if i > vec]
    before = [extent(sch, loops[i]) for i in spatial if i < vec]
    return (bool(after) and None not in after and 4 * int(np.prod(after)) <= PLANE_BYTES
            and None not in before and int(np.prod(before)) == 1)


def schedule_epilogues(sch, main_rv, acc_rv, epilogues, tile, lanes: int):
    """Schedule the elementwise ``epilogues`` of the reduction ``main_rv`` whose register
    tiles are written back by ``acc_rv`` under the loop ``tile``; returns the schedule (a
    copy of ``sch`` when the chain was folded).

    Short chains (bias, relu) go into the accumulator write-back: no full-size temporaries.
    Longer ones (fast_exp's stages) are computed per tile instead: inlining them copies the
    producer expression into every use (quick_gelu: 0.25 -> 6 ms). A block that keeps only
    part of the product (a slice down to one column), and what follows it, runs after the
    tiles: inlined, it wrote every column of a tile into the one kept (a conv1d sliced to
    [..., :1] was off by the whole range of its output); computed per tile, every tile wrote
    the kept column from the one tile that computes it, before that tile ran. So does an
    epilogue that writes more than the product (a squeeze-excitation gate times its feature
    map): under the tiles it would be written only where they reach. Before, such kernels
    fell to dlight's generic Reduction rule (MobileNetV3's SE expand convolutions, with the
    broadcast Mul fused in)."""
    cut = next((i for i, b in enumerate(epilogues) if not _covers(sch, main_rv, b)),
               len(epilogues))
    cut = min(cut, first_growing(sch, main_rv, epilogues))
    per_tile, after = epilogues[:cut], epilogues[cut:]
    folded = None if after else _folded_epilogue(sch, acc_rv, per_tile)
    if folded is None and per_tile and not after and not _vectorizes_per_tile(
            sch, per_tile[0], tile, lanes):
        folded = chain_pass(sch, per_tile, lanes)
    if folded is not None:
        sch = folded
    else:
        for block_rv in per_tile:  # producers first, or each tile recomputes the chain
            sch.reverse_compute_at(block_rv, tile)
            _vectorize_innermost(sch, block_rv, lanes)
    for block_rv in after:
        parallel_pass(sch, block_rv, lanes)
    return sch


# Longest epilogue expression (TVMScript characters) folded into the accumulator write-back.
# HardSwish after a bias is ~400; fast_exp's stages folded into each other grow without
# bound, each stage copying the one before into every use.
EPILOGUE_TEXT_LIMIT = 1500
# Longest chain (TVMScript characters) inlined into one pass after the tiles (chain_pass):
# SiLU after a bias is ~5100; a chain whose blocks each read the one before twice doubles at
# every block (seven: ~116000).
CHAIN_PASS_TEXT_LIMIT = 16000


def _folded_epilogue(sch, acc_rv, chain):
    """A copy of ``sch`` with the elementwise ``chain`` after the reduction computed in its
    accumulator write-back, or None when it does not fold (a block read by more than the next
    one cannot be inlined backwards: the middle of the chain is inlined forwards first) or a
    chain of more than 3 blocks folds into an expression longer than
    :data:`EPILOGUE_TEXT_LIMIT`.

    Left per tile, each op of the chain made a pass over the tile through a full-size
    intermediate buffer, unvectorized (MobileNetV3's HardSwish after its bias is 6 blocks).
    Folded, in mobilenet_text at batch 8, 1 thread (znver5): the three 96 -> 576 1x1
    convolutions on 5x5 maps 511 -> 419 us, 24 -> 96 on 20x20 274 -> 197 us, 48 -> 288 on
    10x10 238 -> 195 us; 40 -> 240 on 10x10 (tiles of 5 pixels) 315 -> 345 us; the model
    ~3% faster."""
    if len(chain) <= 3:  # short chains (bias, relu) always fold, backwards
        for block_rv in reversed(chain):
            sch.reverse_compute_inline(block_rv)
        return sch
    trial = sch.copy()
    try:
        for block_rv in chain[1:-1]:
            trial.compute_inline(block_rv)
        for block_rv in (chain[-1], chain[0]):
            trial.reverse_compute_inline(block_rv)
    except Exception:  # not foldable: the caller computes the chain per tile
        return None
    if len(str(trial.get(acc_rv).body)) > EPILOGUE_TEXT_LIMIT:
        return None
    return trial


def _vectorizes_per_tile(sch, block_rv, tile, lanes) -> bool:
    """Whether ``block_rv`` computed under ``tile`` has an innermost loop that
    :func:`_vectorize_innermost` vectorizes."""
    trial = sch.copy()
    trial.reverse_compute_at(block_rv, tile)
    return _vectorizable(extent(trial, trial.get_loops(block_rv)[-1]), lanes)


def chain_pass(sch, chain, lanes):
    """A copy of ``sch`` with the elementwise ``chain`` after a reduction inlined into its last
    block, computed in one vectorized parallel pass over the output after the tiles; None when
    the chain does not inline so.

    For long chains (SiLU after a bias: six blocks, fast_exp's included) that do not fold
    into the write-back, computed per tile where the tile's innermost axis is not a vector
    (5 output pixels of an NCHW output), each block was a scalar loop through a full-size
    temporary. YOLO-style Conv + SiLU, one thread, onnxruntime in the same process (before ->
    after, this and BlockedConv2d taking such chains): 3 -> 16 3x3 stride 2 on 160x160
    312 -> 187 us (onnxruntime 158), 16 -> 32 stride 2 on 80x80 354 -> 235 (217), 64 -> 64
    1x1 on 20x20 158 -> 88 (78). (The first block is not moved into the write-back: TVM 0.27
    lets that happen while a later block still reads the reduction's output, which then has
    no producer.)"""
    trial = sch.copy()
    try:
        for block_rv in chain[:-1]:
            trial.compute_inline(block_rv)
    except Exception:  # a block read outside the chain: leave it per tile
        return None
    if len(str(trial.get(chain[-1]).body)) > CHAIN_PASS_TEXT_LIMIT:
        return None  # an expression that grows with every block (each reads the last twice)
    parallel_pass(trial, chain[-1], lanes)
    return trial


def _inline_plain_copy(sch, block_rv) -> bool:
    """Inline a producer that copies its input unchanged (the "padding" of a convolution
    without padding, a 1x1 one): the reduction reads the input itself. As its own pass the
    copy cost as much as the convolution where rows are narrower than a vector (MobileNetV3's
    240 -> 40 1x1 convolution on 10x10 maps, batch 8, 1 thread: 266 -> 141 us). True when
    inlined."""
    body = sch.get(block_rv).body
    if not isinstance(body, tirx.BufferStore) or not isinstance(body.value, TensorLoad):
        return False
    load = body.value
    if not tvm_ffi.structural_equal(list(load.indices), list(body.indices)) \
            or not tvm_ffi.structural_equal(list(load.source.shape), list(body.buffer.shape)):
        return False
    try:
        sch.compute_inline(block_rv)
    except Exception:  # not inlinable here (read by more than the reduction): keep the pass
        return False
    return True


def _deinterleave(sch, main_rv, producer_rv, var) -> bool:
    """Whether the reduction reads ``producer_rv``'s buffer (a convolution's padding) with
    stride 2 along the vector axis ``var``; if so, that buffer is now stored with its last
    axis split into even and odd columns (``[..., W] -> [..., 2, W / 2]``), which makes each
    of the reduction's vector loads contiguous instead of a gather."""
    buffer = sch.get(producer_rv).writes[0].source
    width = buffer.shape[-1]
    if not isinstance(width, tirx.IntImm) or int(width) % 2:
        return False
    for read in sch.get(main_rv).reads:
        if read.source.same_as(buffer) and coefficient(read.region[-1].min, var) == 2:
            sch.transform_layout(producer_rv, ("write", 0),
                                 lambda *i: [*i[:-1], i[-1] % 2, i[-1] // 2])
            return True
    return False


def _deinterleaved_pass(sch, block_rv) -> None:
    """A producer stored even / odd columns apart (:func:`_deinterleave`), in its own parallel
    pass: the padding split into a fill and a copy (as :func:`~.schedule_util.parallel_pass`),
    each over rows in parallel, the columns in unrolled pairs and left to LLVM's vectorizer,
    which loads whole vectors and separates the pairs with shuffles. Vectorized by TVM, each
    lane's store (or, the other way round, load) would be a scatter (gather).

    Stride-2 depthwise convolutions, alone, 2 threads, AVX-512: 5x5 on [1, 16, 80, 160]
    134 -> 55 us, 3x3 on [10, 96, 16, 16] 86 -> 58 us (onnxruntime 37)."""
    for rv in fill_and_copy(sch, block_rv):
        loops = sch.get_loops(rv)
        if len(loops) > 1:
            sch.parallel(sch.fuse(*loops[:-1]))
        columns = extent(sch, loops[-1])
        if columns and columns % 2 == 0:
            sch.unroll(sch.split(loops[-1], [None, 2])[1])


def _broadcast_axes(sch, block_rv, spatial, vec) -> list[int]:
    """The spatial axes, but ``vec``, that only the broadcast operands index (those that do
    not vary along the vector axis), outermost first."""
    block = sch.get(block_rv)
    ivars = [iv.var for iv in block.iter_vars]
    accesses = [_index_vars(r.region) for r in block.reads]
    broadcast = [vs for vs in accesses if ivars[vec] not in vs]
    vector = [vs for vs in accesses if ivars[vec] in vs]
    return [i for i in spatial if i != vec
            and any(ivars[i] in vs for vs in broadcast)
            and not any(ivars[i] in vs for vs in vector)]


def _row_axis(sch, block_rv, spatial, vec) -> int | None:
    """The row axis of the register tile: the innermost spatial loop that only the broadcast
    operands index (``i`` of a matmul, the output channel of an NCHW convolution), else the
    innermost spatial loop but the vector one; None for a matrix-vector product (batch 1: its
    unit row loop is normalized away), whose tiles are columns only."""
    axes = _broadcast_axes(sch, block_rv, spatial, vec)
    rest = [i for i in spatial if i != vec]
    return axes[-1] if axes else (rest[-1] if rest else None)


# Weights above this size take their column panels outermost (see BlockedMatmul): about a
# core's L2.
PANEL_OUTER_BYTES = 1 << 20


def _weight_bytes(sch, block_rv, vec, spatial) -> int:
    """The bytes of the weights: the buffers the block reads along the vector axis ``vec``
    that no other spatial axis indexes (a matmul's ``[K, N]``, a packed convolution's
    ``HWIO``; not a convolution's input when its width is the vector axis)."""
    ivars = [iv.var for iv in sch.get(block_rv).iter_vars]
    total = 0
    for read in sch.get(block_rv).reads:
        used = _index_vars(read.region)
        buffer = read.source
        if (ivars[vec] not in used or any(ivars[i] in used for i in spatial if i != vec)
                or not all(isinstance(d, tirx.IntImm) for d in buffer.shape)):
            continue
        total += int(np.prod([int(d) for d in buffer.shape])) * buffer.dtype.bits // 8
    return total


def _row_group(sch, block_rv, loops, spatial, vec, row, limit) -> list[int]:
    """The spatial axes fused into the register tile's rows: ``[row]`` alone when its extent
    has a divisor of at least half the tile (``limit``), else every spatial axis that only
    the broadcast operands index (a convolution's batch, height and width: a 1x1
    convolution on 2x2 maps otherwise gets tiles of 2 rows, one vector load per FMA).
    ``loops``: the block's loops as normalized, one per iteration variable."""
    group = _broadcast_axes(sch, block_rv, spatial, vec)
    sizes = [extent(sch, loops[i]) for i in group]
    if row not in group or len(group) < 2 or None in sizes:
        return [row]
    alone = _largest_divisor(extent(sch, loops[row]), limit)
    if alone >= limit // 2 or _box_rows(sizes, limit) <= alone:
        return [row]
    return group


def _box_rows(sizes: list[int], limit: int) -> int:
    """The most rows, up to ``limit``, of a tile of the fused loop over ``sizes`` (outermost
    first) that is a box of the unfused ones: a whole number of the inner axes times a divisor
    of the next. Any other tile spans a ragged region that TVM over-approximates, and the
    write-back would then store accumulators the tile never computed."""
    best, inner = 1, 1
    for size in reversed(sizes):
        best = max([best] + [inner * d for d in range(1, size + 1)
                             if size % d == 0 and inner * d <= limit])
        inner *= size
        if inner > limit:
            break
    return best


def _covers(sch, main_rv, block_rv) -> bool:
    """Whether ``block_rv`` can be inlined into the write-back of the reduction ``main_rv``:
    not when it keeps a single index of an axis the product has several of (a slice down to
    one column drops that loop, and the inlined write-back then stored every column of the
    tile into the one kept). Slices that keep several (``pad_einsum``'s un-padding) inline
    as before."""
    def shape(rv) -> list[int] | None:
        dims = sch.get(rv).writes[0].source.shape
        if not all(isinstance(d, tirx.IntImm) for d in dims):
            return None
        return [int(d) for d in dims]

    main, other = shape(main_rv), shape(block_rv)
    if main is None or other is None:
        return False
    if len(main) != len(other):
        return int(np.prod(main)) == int(np.prod(other))
    return not any(o == 1 < m for m, o in zip(main, other))

def row_limit(cols: int, lanes: int) -> int:
    """Rows of the register tile at most: ``2 x rows`` accumulators of two vectors where the
    columns take two (AVX-512's 32 vector registers, AVX2's 16), 8 of one vector; on AVX2,
    columns of three or five vectors take tiles that wide, of 3 or 2 rows (9 or 10
    accumulators, the weights' vectors and a broadcast)."""
    if cols % (2 * lanes) == 0:
        return 8 if lanes >= 16 else 6
    if lanes < 16 and cols % lanes == 0:  # 3 or 5 vectors wide: 9 or 10 accumulators
        return 3 if cols % (3 * lanes) == 0 else 2 if cols % (5 * lanes) == 0 else 8
    return 8


# Padding rows up to a whole register tile may add at most this share of work.
ROW_PAD_WASTE = 0.125


def row_padding(rows: int, limit: int) -> int:
    """The row count to pad to a multiple of (1: none). The tile takes the largest divisor of
    the rows up to ``limit``, with no predicate; rows with no divisor near it (a prime: 59
    output columns of a convolution lowered to a matmul, ViT's 197 tokens) would get a tile
    of one row, one accumulator streaming the whole weight panel per row: [59, 5760] x
    [5760, 200] took 3.2 ms, 1.1 ms padded to 64 rows (onnxruntime 0.74 ms). A tile of one
    row is never "near enough": on AVX2 the three- and five-vector tiles have limits of 3 and
    2, where 1 passed ``limit // 2``: the same matmul 6.5 -> 4.0 ms at 59 rows, [197, 256] x
    [256, 40] 0.22 -> 0.16 ms (one thread, znver3; CLIP, whose 65-row kernels now pad to 66,
    0.98-1.00x in a same-process A/B)."""
    if rows <= limit or _largest_divisor(rows, limit) >= max(2, limit // 2):
        return 1
    padded = -(-rows // limit) * limit
    return limit if (padded - rows) <= ROW_PAD_WASTE * rows else 1


def _unit_stride(region, var) -> bool:
    """``var`` indexes only the last dimension of ``region``, with coefficient 1."""
    *outer, last = region
    if any(var in tirx.analysis.undefined_vars(r.min) for r in outer):
        return False
    return coefficient(last.min, var) == 1


# Below this reduction depth a convolution keeps its output width as the vector axis: each
# output-channel tile is written back to NCHW with strided stores, which a short reduction
# (a 3-channel first layer: 27) does not amortise.
WEIGHT_VECTOR_MIN_DEPTH = 64


def _vector_axis(sch, block_rv, spatial, lanes) -> int:
    """The spatial axis to vectorize: one whose extent is a multiple of the vector length and
    that every operand it indexes reads contiguously, innermost first; the innermost spatial
    axis when none qualifies.

    Preferred among those, for reductions at least ``WEIGHT_VECTOR_MIN_DEPTH`` deep: an axis
    whose operands no other spatial axis indexes (the weights: a matmul's columns, a packed
    convolution's output channels). A convolution vectorized along its output width instead
    loads one input vector and broadcasts a weight per output channel: 9 loads per 8 FMAs on
    AVX2, against 6 per 8 along the channels. Measured on znver3, 2 threads, kernel alone:
    AV-MNIST's 16->32 5x5 convolution 1.05 -> 0.70-0.80 ms, late fusion's 32->64 3x3
    0.47 -> 0.36-0.42 ms.
    """
    block = sch.get(block_rv)
    loops = sch.get_loops(block_rv)
    ivars = [iv.var for iv in block.iter_vars]
    depth = 1
    for i, iv in enumerate(block.iter_vars):
        if i not in spatial:
            size = iv.dom.extent
            depth *= int(size) if isinstance(size, tirx.IntImm) else WEIGHT_VECTOR_MIN_DEPTH

    def fits(i: int, weights_only: bool) -> bool:
        n = extent(sch, loops[i])
        if not n or n % lanes:
            return False
        using = [r.region for r in block.reads if ivars[i] in _index_vars(r.region)]
        if not using or not all(_unit_stride(region, ivars[i]) for region in using):
            return False
        return not weights_only or not any(ivars[j] in _index_vars(region) for region in using
                                           for j in spatial if j != i)

    passes = (True, False) if depth >= WEIGHT_VECTOR_MIN_DEPTH else (False,)
    for weights_only in passes:
        for i in reversed(spatial):
            if fits(i, weights_only):
                return i
    return spatial[-1]


def _vector_dim_last(sch, block_rv, var) -> None:
    """Lay the block's (local accumulator) output out with ``var``'s dimension last, so one
    vector of the tile is contiguous and stays in a register (vectorizing the output channels
    of an NCHW accumulator would otherwise make every lane a strided access)."""
    region = sch.get(block_rv).writes[0].region
    dims = [i for i, r in enumerate(region) if var in tirx.analysis.undefined_vars(r.min)]
    if len(dims) != 1 or dims[0] == len(region) - 1:
        return
    k = dims[0]
    sch.transform_layout(block_rv, ("write", 0),
                         lambda *idx: [*idx[:k], *idx[k + 1:], idx[k]])


def _is_producer(sch, block_rv, main_rv) -> bool:
    main_reads = [r.source for r in sch.get(main_rv).reads]
    return any(w.source.same_as(r) for w in sch.get(block_rv).writes for r in main_reads)


def _vectorizable(n: int | None, lanes: int) -> bool:
    """Whether :func:`_vectorize_innermost` vectorizes an innermost loop of extent ``n``."""
    return bool(n) and (n % lanes == 0 or (n <= lanes and n % 4 == 0))


def unroll_write_back(sch, acc_rv, tile) -> None:
    """Unroll the serial loops of the register tile's write-back ``acc_rv`` under ``tile``.

    The tile is a small array that LLVM keeps in vector registers only when every access has
    a constant index. A write-back loop it does not unroll itself (one whose body, the folded
    epilogue, is long: a quantize / dequantize pair) indexes the tile with a variable, so the
    whole tile stays in memory and every FMA of the reduction loads and stores its
    accumulator through the stack. Such code is also at the mercy of the stack's alignment:
    the same kernel took 240 us JIT-compiled and 580 us from the exported library. CLIP's
    attention scores with their quantize / dequantize epilogue (8x4x65x32 @ 8x4x32x65, one
    thread, from the library): 520 -> 208 us together with :mod:`.vector_tails`.

    Only a write-back of whole vectors (a vectorized innermost loop) of at most
    :data:`MAX_UNROLLED_VECTORS` vectors: a scalar one (an NCHW output whose tile runs along
    the channels) LLVM already handles, and unrolled it only grows."""
    loops = sch.get_loops(acc_rv)
    at = next((i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(tile))), None)
    if at is None or sch.get(loops[-1]).kind != tirx.ForKind.VECTORIZED:
        return
    serial = [loop for loop in loops[at + 1:-1] if sch.get(loop).kind == tirx.ForKind.SERIAL]
    sizes = [extent(sch, loop) for loop in serial]
    if None in sizes or int(np.prod(sizes)) > MAX_UNROLLED_VECTORS:
        return
    for loop in serial:
        sch.unroll(loop)


# Most vectors of a register tile's write-back unrolled (AVX-512 tiles are up to 8 x 4).
MAX_UNROLLED_VECTORS = 32


def _vectorize_innermost(sch, block_rv, lanes):
    inner = sch.get_loops(block_rv)[-1]
    n = extent(sch, inner)
    if not _vectorizable(n, lanes):
        return
    if n > lanes:
        _, v = sch.split(inner, [None, lanes])
        sch.vectorize(v)
    else:
        sch.vectorize(inner)
