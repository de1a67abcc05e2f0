"""The schedule rule for the int8 kernels of :mod:`.int8`, and the tensor intrinsics it uses.

:class:`Int8Contraction` takes a function holding one int8 contraction (found by its block
names) and whatever ``FuseOps`` grouped around it: input producers are inlined into the
staging (uint8; int16 without VNNI), the int32 sum is register-blocked (at most 12
accumulators of 16 lanes with VNNI, 4 with AVX2) and tensorized, and the epilogue runs per
tile where a tile is a box of the output. An AMX kernel (its sum block named
:data:`~.int8.AMX_SUM_BLOCK`) is tiled and tensorized by :mod:`.cpu_amx` instead.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.script import tirx as T

from mmcompile.targets.tvm.cpu_matmul import _largest_divisor
from mmcompile.targets.tvm import cpu_amx
from mmcompile.targets.tvm.int8 import (AMX_CONV_BLOCK, AMX_SUM_BLOCK, BLOCK, STAGE_BLOCK,
                                        STEM_BLOCK, SUM_BLOCK, has_avx2, has_vnni,
                                        register_tile, step_for)
from mmcompile.targets.tvm.schedule_util import (ACCUMULATOR_SCOPE, extent, fill_and_copy,
                                                 lanes_for, parallel_spatial)

# A tile's epilogue writes each of its channels into another plane of an NCHW output; planes
# whose starts are congruent modulo 4 KB fall in one L1 set, which holds L1_WAYS lines.
L1_WAYS = 8  # Zen 3/4, Skylake to Ice Lake; newer cores have 12
SET_SPAN = 4096

VNNI_INTRIN = "mmcompile_dot_16x4_u8i8i32_vnni"
PIXELS_INTRIN = "mmcompile_dot_16x4_pixels_vnni"  # 16 pixels' lanes, the 4 weights broadcast
AVX2_INTRIN = "mmcompile_dot_16x2_i16i16i32_avx2"


def _dot_desc(step: int, dtype: str, weight_dtype: str):
    """What a 16-column block computes: ``C[i] += sum_k A[k] * B[i, k]`` over ``step``
    ``dtype`` activations and ``weight_dtype`` weights (uint8 x int8 for vpdpbusd, int16 x
    int16 for vpmaddwd)."""
    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((step,), dtype, offset_factor=1),
             B: T.Buffer((16, step), weight_dtype, offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:step], B[0:16, 0:step])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, step):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")
    return desc


@functools.cache
def register_intrinsics() -> None:
    """Register both tensor intrinsics, once, when an int8 kernel is first scheduled: parsing
    their TVMScript took 0.6 s of every compiling process's first compile, float models
    included."""
    @T.prim_func(s_tir=True)
    def _dot_vnni(A: T.Buffer((4,), "uint8", offset_factor=1),
                  B: T.Buffer((16, 4), "int8", offset_factor=1),
                  C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        # TVM's own dot_16x4_vnni passes int32x16 operands, which this wheel's LLVM rejects
        # (vpdpbusd.512 takes <64 x i8> since LLVM 20); the bytes are the same.
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"),
                                          16), dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"), dtype="int32x16")


    s_tir.TensorIntrin.register(VNNI_INTRIN, _dot_desc(4, "uint8", "int8"), _dot_vnni,
                                override=True)

    @T.prim_func(s_tir=True)
    def _pixels_desc(A: T.Buffer((16, 4), "uint8", offset_factor=1),
                     B: T.Buffer((4,), "int8", offset_factor=1),
                     C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:16, 0:4], B[0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vk], "int32")

    @T.prim_func(s_tir=True)
    def _pixels_vnni(A: T.Buffer((16, 4), "uint8", offset_factor=1),
                     B: T.Buffer((4,), "int8", offset_factor=1),
                     C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        # the roles of _dot_vnni swapped: 16 pixels x 4 bytes loaded, 4 weights broadcast
        with T.sblock("root"):
            T.reads(C[0:16], A[0:16, 0:4], B[0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(A.vload([0, 0], dtype="uint8x64"), dtype="int8x64"),
                T.reinterpret(T.broadcast(T.reinterpret(B.vload([0], "int8x4"), dtype="int32"),
                                          16), dtype="int8x64"), dtype="int32x16")

    s_tir.TensorIntrin.register(PIXELS_INTRIN, _pixels_desc, _pixels_vnni, override=True)


    @T.prim_func(s_tir=True)
    def _dot2_avx2(A: T.Buffer((2,), "int16", offset_factor=1),
                   B: T.Buffer((16, 2), "int16", offset_factor=1),
                   C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        # two vpmaddwd: 8 columns x 2 steps each, on activations staged as int16 (exact:
        # no saturation); the pair is one int32 broadcast from memory
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            # (the broadcast pair written inline twice: bound to a name, TVMScript makes it a
            # local buffer, which LLVM left on the stack, a store and reload per instruction)
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), 8),
                              dtype="int16x16"),
                B.vload([0, 0], dtype="int16x16"), dtype="int32x8")
            C[T.ramp(T.int32(8), 1, 8)] = C.vload([8], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), 8),
                              dtype="int16x16"),
                B.vload([8, 0], dtype="int16x16"), dtype="int32x8")


    s_tir.TensorIntrin.register(AVX2_INTRIN, _dot_desc(2, "int16", "int16"), _dot2_avx2,
                                override=True)


def _stage_loops(sch, data) -> None:
    """The staging block: parallel over all its loops but the innermost, or, for a
    convolution's NHWC staging, but the last two (one loop over pixels and their channels:
    fused with the rows, each pixel's few channels paid a division and a modulo per index,
    a quarter of a 3-channel stem's time)."""
    loops = sch.get_loops(data)
    outer = loops[:-2] if len(loops) >= 4 else loops[:-1]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def tile_box(out: list[int], acc_shape: list[int]) -> int | None:
    """The output columns when an epilogue writing ``out`` writes the contraction's own
    layout, ``[rows..., N]`` (a matmul, its last row axis possibly padded in the sum) or
    ``[batch, N, rows...]`` (a convolution; a conv1d without its unit row axis), with ``N``
    at most the sum's padded width; else None. Then a tile of the sum is a box of the output
    and the epilogue can run per tile. A reshape fused after the sum (heads split off the
    columns) would make a tile's output a non-box region, which TVM over-approximates: the
    extra elements would read accumulators of tiles not summed yet."""
    *rows, width = acc_shape
    if (len(out) == len(acc_shape) and out[:-2] == rows[:-1] and out[-2] < rows[-1]
            and out[-1] <= width):
        return out[-1]  # a matmul whose rows were padded (int8._int8_matmul)
    count = int(np.prod(rows)) if rows else 1
    total = int(np.prod(out))
    if total % count or total // count > width:
        return None
    cols = total // count
    layouts = [[*rows, cols], [rows[0], cols, *rows[1:]],
               [rows[0], cols, *(d for d in rows[1:] if d != 1)]]
    return cols if out in layouts else None


def aliased_planes(out: list[int], acc_shape: list[int], itemsize: int,
                   tile_channels: int) -> bool:
    """Whether an epilogue per tile writing ``out`` (a convolution's NCHW output, items of
    ``itemsize`` bytes) puts more lines of one tile in an L1 set than the set holds: planes
    whose size is a multiple of 4 KB (64x64 uint8) all start in the same set, and a tile
    writes ``tile_channels`` of them per pixel. Late fusion's 3 -> 32 stem on 8x64x64 ran 2x
    slower per tile than as a pass over the whole output after the tiles (1.81 vs 0.92 ms,
    2 threads); 32x32 planes (8 lines a set for 32 channels) ran the same either way, and the
    other sizes measured faster per tile (0.74-0.97 of the pass)."""
    spatial = [d for d in acc_shape[1:-1] if d != 1]
    if len(out) < 3 or [d for d in out[2:] if d != 1] != spatial or out[1] > acc_shape[-1]:
        return False
    plane = int(np.prod(out[2:])) * itemsize
    offsets = SET_SPAN // math.gcd(plane, SET_SPAN)
    return -(-min(tile_channels, out[1]) // offsets) > L1_WAYS


def _computed_once(sch, block, tiles, padding: float) -> bool:
    """After ``reverse_compute_at(block, tiles)``: whether the tiles together cover no more
    elements than ``block`` writes, times the sum's ``padding`` (its elements per output
    element: the last column and row tiles reach into padded columns and rows, under a
    predicate): a second guard against a non-box tile."""
    loops = sch.get_loops(block)
    if not loops or not sch.get(loops[0]).same_as(sch.get(tiles)):
        return False
    per_tile = 1
    for loop in loops[1:]:
        size = extent(sch, loop)
        if size is None:
            return False
        per_tile *= size
    total = int(np.prod([int(d) for d in sch.get(block).writes[0].source.shape]))
    return per_tile * extent(sch, tiles) <= total * padding


STEM_ACCUMULATORS = 12  # vectors of 16 int32 in a stem's register tile (768 bytes)


def _schedule_stem(sch, padded, runs, acc, epilogue, lanes: int) -> None:
    """A stem convolution (:func:`~.int8._int8_stem`): the padding a fill and a vectorized
    copy, the tap runs parallel over rows with the 4 taps' stores interleaved (LLVM
    vectorizes along the pixels); the sum in register tiles of output channels x 16-pixel
    vectors (at most :data:`STEM_ACCUMULATORS`), parallel over tiles, one ``vpdpbusd`` per
    16 pixels x 4 taps; the epilogue per tile, along the pixels as vectors."""
    for block in fill_and_copy(sch, padded):
        parallel_spatial(sch, block, lanes)
    *outer, _, tap = sch.get_loops(runs)
    sch.parallel(sch.fuse(*outer))
    sch.unroll(tap)
    batch, channel, row, pixel, rh, rq, rj = sch.get_loops(acc)
    vectors = extent(sch, pixel) // BLOCK
    across = _largest_divisor(vectors, 4)
    down = _largest_divisor(extent(sch, channel), STEM_ACCUMULATORS // across)
    pixel, lane = sch.split(pixel, [None, BLOCK])
    pixel, vector = sch.split(pixel, [None, across])
    channel, tile_channel = sch.split(channel, [None, down])
    sch.reorder(batch, row, channel, pixel, rh, rq, tile_channel, vector, lane, rj)
    tiles = sch.fuse(batch, row, channel, pixel)
    tile_acc = sch.cache_write(acc, 0, ACCUMULATOR_SCOPE)
    sch.reverse_compute_at(tile_acc, tiles)
    sch.vectorize(sch.get_loops(tile_acc)[-1])
    sch.parallel(tiles)
    init = sch.decompose_reduction(acc, rh)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(lane, PIXELS_INTRIN)
    sch.unroll(tile_channel)
    sch.unroll(vector)
    if len(epilogue) == 1:
        sch.reverse_compute_at(epilogue[0], tiles)
        inner = sch.get_loops(epilogue[0])[-1]
        if (size := extent(sch, inner)) and size > BLOCK:
            inner = sch.split(inner, [None, BLOCK])[1]
        sch.vectorize(inner)
    else:
        for block in epilogue:
            parallel_spatial(sch, block, lanes)


class Int8Contraction(dl.ScheduleRule):
    """Schedules a function holding one int8 contraction of :mod:`.int8` (and whatever
    ``FuseOps`` put around it): producers inlined into the staging block (uint8; int16
    without VNNI), which runs as its own parallel loop; the int32 sum register-blocked
    (``rows x cols`` blocks of 16 columns, parallel over tiles, one ``vpdpbusd`` per 16 x 4
    block with VNNI, two ``vpmaddwd`` per 16 x 2 with AVX2); the epilogue (scale, bias,
    activation, requantize) inlined into one block computed per tile (:func:`tile_box`),
    else its own loop."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self._schedule(func, target)
        except Exception:  # not ours, or a shape this rule cannot tile: the next rule tries
            return None

    @staticmethod
    def _schedule(func, target, per_tile: bool = True):
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        names = [sch.get(b).name_hint for b in blocks]
        accs = [i for i, n in enumerate(names) if n.startswith(SUM_BLOCK)]
        stages = [i for i, n in enumerate(names) if n.startswith(STAGE_BLOCK)]
        amx_conv = len(accs) == 1 and names[accs[0]].startswith(AMX_CONV_BLOCK)
        stem = len(accs) == 1 and names[accs[0]].startswith(STEM_BLOCK)
        if len(accs) != 1 or len(stages) != 1 + (amx_conv or stem) or stages[-1] > accs[0]:
            return None
        acc, data = blocks[accs[0]], blocks[stages[0]]
        acc_shape = [int(d) for d in sch.get(acc).writes[0].source.shape]
        for block in blocks[:stages[0]]:
            sch.compute_inline(block)  # quantize / reshape of the input: into the staging
        epilogue = blocks[accs[0] + 1:]
        for block in epilogue[:-1]:
            with contextlib.suppress(Exception):
                sch.compute_inline(block)
        vnni = has_vnni(target)
        intrin = VNNI_INTRIN if vnni else AVX2_INTRIN if has_avx2(target) else None
        if intrin is not None:
            register_intrinsics()
        rest = [b for b in sch.get_child_blocks(get_root_block(sch))
                if not sch.get(b).name_hint.startswith((STAGE_BLOCK, SUM_BLOCK))]
        if stem:  # VNNI only (int8.use_stem): its intrinsics are registered above
            _schedule_stem(sch, data, blocks[stages[1]], acc, rest, lanes_for(target))
            return sch
        if amx_conv:
            cpu_amx.schedule_conv_staging(sch, data, blocks[stages[1]])
        else:
            _stage_loops(sch, data)
        if sch.get(acc).name_hint.startswith((AMX_SUM_BLOCK, AMX_CONV_BLOCK)):  # .cpu_amx
            per_block = len(rest) == 1 and \
                len(sch.get(rest[0]).writes[0].source.shape) in ((3, 4) if amx_conv else (2,))
            schedule = cpu_amx.schedule_conv_sum if amx_conv else cpu_amx.schedule_sum
            schedule(sch, acc, target, rest[0] if per_block else None)
            if not per_block:
                for block in rest:
                    parallel_spatial(sch, block, lanes_for(target))
            return sch
        # the sum: [outer spatial..., row, col] x [outer reduction..., channel or k]
        kinds = [int(v.iter_type) for v in sch.get(acc).iter_vars]
        loops = sch.get_loops(acc)
        spatial = [lp for lp, kind in zip(loops, kinds) if kind == 0]
        reduce_ = [lp for lp, kind in zip(loops, kinds) if kind != 0]
        *outer, row, col = spatial
        *reduce_outer, red = reduce_
        # accumulators: rows x cols vectors of 16 int32. AVX-512: 32 registers, at most 12
        # accumulators (768 bytes: the tile buffer must stay under TVM's 1 KB stack-alloca
        # limit, see schedule_util); AVX2: 16 registers of half the width, at most 4 blocks
        # (8 registers) beside the weights and the broadcast
        limit, tile_cols = register_tile(extent(sch, col) // BLOCK, vnni)
        tile_rows = _largest_divisor(extent(sch, row), limit)
        io, ii = sch.split(row, [None, tile_rows])
        jo, jj, ji = sch.split(col, [None, tile_cols, BLOCK])
        ko, ki = sch.split(red, [None, step_for(vnni)])
        sch.reorder(*outer, io, jo, *reduce_outer, ko, ii, jj, ji, ki)
        # a tile's accumulators in a small buffer LLVM keeps in registers (schedule_util)
        tile_acc = sch.cache_write(acc, 0, ACCUMULATOR_SCOPE)
        sch.reverse_compute_at(tile_acc, jo)
        sch.vectorize(sch.get_loops(tile_acc)[-1])
        tiles = sch.fuse(*outer, io, jo)
        sch.parallel(tiles)
        if intrin is None:  # (a loop over the update block cannot be vectorized once decomposed)
            sch.reorder(ki, ji)
            sch.vectorize(ji)
            sch.unroll(ki)
        init = sch.decompose_reduction(acc, (reduce_outer or [ko])[0])
        sch.vectorize(sch.get_loops(init)[-1])
        if intrin is not None:
            sch.tensorize(ji, intrin)
        sch.unroll(ii)
        sch.unroll(jj)
        if per_tile:  # the epilogue per tile, while its accumulators are in cache
            try:
                written = sch.get(rest[0]).writes[0].source if len(rest) == 1 else None
                out = [int(d) for d in written.shape] if written is not None else []
                cols = tile_box(out, acc_shape) if out else None
                if cols and not aliased_planes(out, acc_shape, written.dtype.bits // 8,
                                               tile_cols * BLOCK):
                    sch.reverse_compute_at(rest[0], tiles)
                    if _computed_once(sch, rest[0], tiles, np.prod(acc_shape) / np.prod(out)):
                        return sch
            except Exception:  # noqa: BLE001 (any schedule error: schedule it apart)
                pass
            return Int8Contraction._schedule(func, target, per_tile=False)
        for block in rest:
            parallel_spatial(sch, block, lanes_for(target))
        return sch
