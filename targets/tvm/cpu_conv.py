"""Cache-blocked CPU schedule for 2-D convolutions (NCHW data, pre-packed HWIO weights).

:class:`~.cpu_matmul.BlockedMatmul` treats a convolution as a matmul: each parallel tile is
a few output pixels by 16 output channels, and its whole reduction (input channels x kernel
window) streams that channel slice of the weights once per tile. Its inner loop is a clean
8-accumulator FMA kernel, yet it reached only ~50% of the FMA peak on the 2-core AVX2
machine: the weights of a tile do not stay in L1 (a 16-channel slice of HWIO weights is
strided by the full channel count, 256 B on 64 channels, so it occupies a quarter of L1's
sets), and the zero-padded input is written whole by a separate loop, then read back from L2.

This rule uses the loop structure MetaSchedule's multi-level tiling found for the same
kernels ("SSRSRS": spatial tiles, a reduction chunk, spatial sub-tiles, the rest of the
reduction, the register tile), with its tile sizes chosen from the shapes instead of
measured:

- register tile: 4 output channels x 2 output rows x one vector of output columns (8
  accumulators; per step 2 input vector loads, 4 weight broadcasts);
- the reduction split into chunks of up to 16 input channels, times the kernel rows, outside
  the sub-tiles: a chunk's weights (16 x kw x 16 channels, ~3 KB) stay in L1 while every
  sub-tile of the block uses them;
- each parallel task (16 output channels x 4 rows) pads the input rows it reads itself, so
  they are in cache when the convolution reads them;
- TVM's auto-unroll (64 steps) over the task.

Measured (2 threads, znver3, kernel alone, median ratio to BlockedMatmul in the same run):
late fusion's 32->64 3x3 on 32x32 0.70 (0.36 -> 0.23-0.25 ms; MetaSchedule's tuned record
0.22-0.24 ms), 64->128 3x3 on 16x16 0.72, its 3->32 first layer 0.61; AV-MNIST's 16->32 5x5
on 56x56 0.75; MM-IMDb's stride-2 first layer 0.59.

Vector axis. The register tile above vectorizes the output columns; the alternative
vectorizes the packed output channels (one input pixel broadcast per step, weight vectors
loaded), with a register tile of rows x columns x channel vectors (:func:`_channel_tile`),
the same chunked reduction and per-task padding. With as many accumulators as fit, the
channel vector wins on every deep convolution (reduction >= 64) measured: whole models
AV-MNIST 0.95x (batch 1 and 8), late fusion 0.90x / 0.94x against column vectors for the
convolutions whose width allowed them (late fusion's 64->128 on 16x16 0.83-0.87x alone,
AV-MNIST's 16->32 5x5 on 56x56 0.92-0.94x). A column vector also gathers every other input
pixel on a strided convolution (MM-IMDb's stride-2 32->64 on 48x48: channels 0.38-0.42x of
columns), and needs a width that is a multiple of the vector length (28, 14 and 7 on
AV-MNIST are not). So convolutions over several input channels vectorize the channels,
first layers (3 x 3 x 3) included since the rows x columns x vectors tile (MM-IMDb's
stride-2 3->32 0.58-0.60x of columns, late fusion's 3->32 0.79-0.89x); single-channel ones
with a small window (AV-MNIST's 1->16 5x5 spectrogram layer: channels 1.8-2.7x slower) keep
the column vector where the width allows; the rest (channel counts that fit neither tile) are
left to BlockedMatmul. Batched inputs: the batch joins the parallel loop.

Padding once per input row. A task pads the input rows it reads, so every task that reads
the same rows pads them again. Tasks were (channel group, row block): each of MM-IMDb's 8
channel groups of its 64->128 stride-2 conv padded the same 64 x 9 x 25 rows (scalar, with a
bounds test per element). Now a task loops over the channel groups itself and the parallel
loop splits them only as far as ``MIN_TASKS`` needs (batch x row blocks are usually enough).
MM-IMDb batch 8 kernels 0.86-0.92x; whole models (one process, interleaved, with the
first-layer change above) MM-IMDb 0.93x / 0.93x (batch 1 / 8), late fusion 0.97x / 0.97x,
AV-MNIST 0.95x / 0.98x.

A max pool grouped with the convolution (:mod:`.fuse_pool`) is computed by each task from the
rows it has just produced when they hold whole pooling windows (an even number of rows per
task for 2x2 windows), else in one parallel pass after the tasks.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from mmcompile.targets.tvm.cpu_matmul import (WEIGHT_VECTOR_MIN_DEPTH, _covers, chain_pass,
                                              _index_vars, _largest_divisor, _neighbours,
                                              _reduction, _vector_dim_last,
                                              _vectorize_innermost, pool_pass)
from mmcompile.targets.tvm.schedule_util import (ACCUMULATOR_SCOPE, VectorRule, coefficient,
                                                 extent, within_reduction)

REG_CHANNELS, REG_ROWS = 4, 2  # register tile: 4 x 2 vectors = 8 of AVX2's 16 registers
SUB_CHANNELS, SUB_ROWS = 4, 2  # sub-tiles per task, at most (a task: 16 channels x 4 rows)
CHUNK = 16  # input channels per reduction chunk, at most
TASK_ROWS = 4  # output rows per parallel task when vectorizing the channels
MIN_TASKS = 8  # parallel tasks wanted (4 per core here); fewer channel groups per task pad less
MAX_ACCUMULATORS, MAX_COLUMNS = 12, 6  # channel-vector register tile: 12 of 16 AVX2 registers
UNROLL = 64


def _roles(sch, block_rv):
    """``(batch, channel, row, column, in_channel, kh, kw)`` loops of an NCHW convolution
    over HWIO weights (batch None at batch 1 and in_channel None for a single input channel:
    unit loops are normalized away), or None for any other reduction."""
    block = sch.get(block_rv)
    loops = sch.get_loops(block_rv)
    kinds = "".join("S" if iv.iter_type == tirx.IterVar.DataPar else "R"
                    for iv in block.iter_vars)
    if kinds not in ("SSSRRR", "SSSSRRR", "SSSRR", "SSSSRR") or len(loops) != len(kinds):
        return None
    n_reduce = kinds.count("R")
    ivars = [iv.var for iv in block.iter_vars]
    spatial, reduce_ = ivars[:-n_reduce], ivars[-n_reduce:]
    output = block.writes[0].source
    reads = [r for r in block.reads if not r.source.same_as(output)]
    weight = [r for r in reads if spatial[-1] not in _index_vars(r.region)]
    data = [r for r in reads if spatial[-1] in _index_vars(r.region)]
    if len(weight) != 1 or len(data) != 1:
        return None
    channel = spatial[-3]
    weight_vars = _index_vars(weight[0].region)
    data_vars = _index_vars(data[0].region)
    # HWIO: the weights index the output channel (last) and the window; the data does not
    # index the output channel (no depthwise / grouped convolution)
    last = weight[0].region[-1].min
    if channel not in tirx.analysis.undefined_vars(last) or channel in data_vars \
            or not all(r in weight_vars and r in data_vars for r in reduce_):
        return None
    column_last = data[0].region[-1].min
    if spatial[-1] not in tirx.analysis.undefined_vars(column_last):
        return None
    batch = loops[0] if len(spatial) == 4 else None
    oc, oh, ow = loops[len(spatial) - 3:len(spatial)]
    ic = loops[-3] if n_reduce == 3 else None
    return batch, oc, oh, ow, ic, loops[-2], loops[-1]


def _row_stride(sch, block_rv) -> int | None:
    """A pool's stride along the rows: the coefficient of its output row in the row index
    of what it reads."""
    block = sch.get(block_rv)
    row = [iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar][-2]
    if len(block.reads) != 1:
        return None
    return coefficient(block.reads[0].region[-2].min, row)


def _schedule_pool(sch, pool_rv, task, task_rows):
    """The pool computed by each task from the rows it has just produced (still in cache),
    when the task's rows hold whole pooling windows; else one parallel pass after the tasks.

    Whole windows only: a task of all 7 rows of a 7x7 map looks like it covers its pool's 3
    rows, yet pooling under it wrote wrong values (max abs error 48 on AV-MNIST's 32->64
    conv with 7-row tasks)."""
    stride = _row_stride(sch, pool_rv)
    if not stride or task_rows % stride:
        pool_pass(sch, pool_rv)
        return
    sch.reverse_compute_at(pool_rv, task)


def _window(sch, roles) -> int:
    return (extent(sch, roles[-2]) or 1) * (extent(sch, roles[-1]) or 1)


def _chunks(sch, ic):
    """The input-channel loop split into ``([outer], [chunk])``; ``([], [])`` without one."""
    if ic is None:
        return [], []
    outer, inner = sch.split(ic, [None, _largest_divisor(extent(sch, ic), CHUNK)])
    return [outer], [inner]


def _tile_columns(sch, block_rv, roles, lanes):
    """Vector along the output columns, for single-channel inputs; register tile 4 channels x 2
    rows (8 x 1 for an odd row count). Returns ``(task loop, accumulator block, outer
    reduction loop, rows per task)``."""
    batch, oc, oh, ow, ic, kh, kw = roles
    channels, rows = extent(sch, oc), extent(sch, oh)
    reg_rows = REG_ROWS if rows % REG_ROWS == 0 else 1
    reg_channels = REG_CHANNELS * REG_ROWS // reg_rows
    if channels % reg_channels:
        return None
    sub_channels = _largest_divisor(channels // reg_channels, SUB_CHANNELS)
    sub_rows = _largest_divisor(rows // reg_rows, SUB_ROWS)
    oc0, oc2, oc3 = sch.split(oc, [None, sub_channels, reg_channels])
    oh0, oh2, oh3 = sch.split(oh, [None, sub_rows, reg_rows])
    ow2, ow3 = sch.split(ow, [None, lanes])
    ic0, ic1 = _chunks(sch, ic)
    sch.reorder(oc0, oh0, *ic0, kh, oc2, oh2, ow2, *ic1, kw, oc3, oh3, ow3)
    task = sch.fuse(*([batch] if batch is not None else []), oc0, oh0)
    sch.parallel(task)  # before decompose_reduction, which otherwise rejects the schedule
    acc = sch.cache_write(block_rv, 0, ACCUMULATOR_SCOPE)  # the task's outputs, in L1
    sch.reverse_compute_at(acc, task)
    sch.vectorize(ow3)
    sch.unroll(oh3)
    sch.unroll(oc3)
    sch.annotate(task, "pragma_auto_unroll_max_step", UNROLL)
    sch.annotate(task, "pragma_unroll_explicit", 1)
    return task, acc, (ic0 or [kh])[0], sub_rows * reg_rows


def _channel_tile(task_rows: int, cols: int, vectors: int) -> tuple[int, int, int]:
    """``(rows, columns, vectors)`` of the channel-vector register tile: as many accumulators
    as fit (at most ``MAX_ACCUMULATORS``: more spill), from divisors only (a predicated tail
    leaves registers); ties go to 2 vectors, then to more columns.

    Only the columns were tiled before: widths 14 and 7 got 2 x 2 and 1 x 2 accumulators,
    too few to hide the FMA latency (8 independent ones needed on 2 FMA pipes x 4 cycles).
    With rows (AV-MNIST batch 8, 2 threads, kernel time): 16->32 5x5 on 14x14 0.65x,
    64->64 3x3 on 14x14 0.76x, 32->64 3x3 on 7x7 0.79x; 14 accumulators (7 x 2) or 16
    measured 1.6-2.7x slower.
    """
    options = [(r, c, v) for r in range(1, task_rows + 1) if task_rows % r == 0
               for c in range(1, min(cols, MAX_COLUMNS) + 1) if cols % c == 0
               for v in (1, 2, 4) if vectors % v == 0 and r * c * v <= MAX_ACCUMULATORS]
    return max(options, key=lambda t: (t[0] * t[1] * t[2], t[2] == 2, t[1]))


def _tile_channels(sch, block_rv, roles, lanes):
    """Vector along the (packed) output channels; register tile from :func:`_channel_tile`,
    the same chunked reduction as :func:`_tile_columns`. A task is (batch, row block, a share
    of the channel groups: all of them when there are ``MIN_TASKS`` tasks without splitting),
    and pads its input rows once for its channel groups."""
    batch, oc, oh, ow, ic, kh, kw = roles
    channels, rows, cols = (extent(sch, loop) for loop in (oc, oh, ow))
    task_rows = _largest_divisor(rows, TASK_ROWS)
    reg_rows, reg_cols, nj = _channel_tile(task_rows, cols, channels // lanes)
    channel_var = sch.get(block_rv).iter_vars[-6].var
    groups = channels // (nj * lanes)  # channel groups of one register tile's vectors
    outer = (extent(sch, batch) if batch is not None else 1) * (rows // task_rows)
    par = next(g for g in range(1, groups + 1)
               if groups % g == 0 and (outer * g >= MIN_TASKS or g == groups))
    oc0, oc2, oc3 = sch.split(oc, [None, nj, lanes])
    oh0, oh1, oh2 = sch.split(oh, [None, task_rows // reg_rows, reg_rows])
    ow0, ow1 = sch.split(ow, [None, reg_cols])
    ic0, ic1 = _chunks(sch, ic)
    oc_task, oc1 = sch.split(oc0, [par, None])
    sch.reorder(oc_task, oh0, oc1, *ic0, kh, oh1, ow0, *ic1, kw, oh2, ow1, oc2, oc3)
    task = sch.fuse(*([batch] if batch is not None else []), oc_task, oh0)
    sch.parallel(task)
    acc = sch.cache_write(block_rv, 0, ACCUMULATOR_SCOPE)
    _vector_dim_last(sch, block_rv, channel_var)
    sch.reverse_compute_at(acc, oc1)
    sch.vectorize(oc3)
    sch.unroll(oc2)
    sch.unroll(ow1)
    sch.unroll(oh2)
    return task, acc, (ic0 or [kh])[0], task_rows


def _epilogues(sch, epilogues, lanes):
    """``epilogues`` folded into the accumulator's write-back, or, for a chain that does not
    fold (a value read twice: SiLU's ``x * sigmoid(x)``), as :func:`~.cpu_matmul.chain_pass`
    computes it: before, such convolutions fell to BlockedMatmul (YOLO-style Conv + SiLU)."""
    trial = sch.copy()
    try:
        for block_rv in reversed(epilogues):
            trial.reverse_compute_inline(block_rv)
        return trial
    except Exception:  # tvm's ScheduleError: not foldable
        pass
    passed = chain_pass(sch, epilogues, lanes)
    if passed is None:
        raise ValueError("the epilogue chain neither folds nor inlines into one pass")
    return passed


class BlockedConv2d(VectorRule):
    """NCHW x HWIO convolution with injective producers (padding) and epilogues."""

    narrower = True  # channel counts that fill only narrower vectors (see VectorRule)

    @staticmethod
    def _schedule(func, lanes):
        sch = s_tir.Schedule(func)
        infos, main, pool = _reduction(sch)
        if main is None:
            return None
        roles = _roles(sch, main.block_rv)
        if roles is None:
            return None
        batch, oc, oh, ow, ic, kh, kw = roles
        channels, rows, cols = (extent(sch, loop) for loop in (oc, oh, ow))
        depth = extent(sch, ic) if ic is not None else 1
        if None in (channels, rows, cols, depth):
            return None
        neighbours = _neighbours(sch, infos, main.block_rv)
        if neighbours is None:
            return None
        producers, epilogues = neighbours
        if not all(_covers(sch, main.block_rv, b) for b in epilogues):
            return None  # a slice of the output: BlockedMatmul runs it after its tiles
        # several input channels (or a large window): vectorize the channels (see the module
        # docstring); a single input channel: the columns where the width allows
        by_channels = channels % lanes == 0 and (
            ic is not None or _window(sch, roles) >= WEIGHT_VECTOR_MIN_DEPTH)
        if by_channels:
            tiled = _tile_channels(sch, main.block_rv, roles, lanes)
        elif cols % lanes == 0:
            tiled = _tile_columns(sch, main.block_rv, roles, lanes)
        else:
            tiled = None
        if tiled is None:
            return None
        task, acc, first_reduce, task_rows = tiled
        sch.decompose_reduction(main.block_rv, first_reduce)
        if not within_reduction(sch, main.block_rv, epilogues):
            return None
        for block_rv in producers:  # this task's padded rows, right before it reads them
            sch.compute_at(block_rv, task)
            _vectorize_innermost(sch, block_rv, lanes)
        sch = _epilogues(sch, epilogues, lanes)
        _vectorize_innermost(sch, acc, lanes)
        if pool is not None:
            _schedule_pool(sch, pool.block_rv, task, task_rows)
        return sch
