"""Int8 contractions on AMX tiles (Intel Sapphire Rapids and later): the schedule of an AMX
kernel of :mod:`.int8` and its tensor intrinsics.

An AMX core holds eight tile registers of 16 rows x 64 bytes; ``tdpbusd`` adds a uint8
``16 x 64`` tile times an int8 ``16 x 64`` weight tile (16 groups of 4 reduction steps x 16
columns, the vpdpbusd layout :func:`~.int8.pack_weights` already writes) into a ``16 x 16``
int32 tile: 16384 multiply-adds, against 64 for a ``vpdpbusd``. A register block here is
2 x 2 accumulator tiles (32 rows x 32 columns) fed by two activation and two weight tiles:

- the sum's loops are split into ``32 x 32`` blocks, parallel, each over the reduction in
  steps of 64 bytes; a step is one :data:`DOT` (four tile loads, four ``tdpbusd``), the
  block's start :data:`ZERO` (``tilezero``), its end :data:`STORE` (``tilestored64`` into the
  int32 sum), then the block's epilogue where the output is a box per block (a matmul's
  ``[rows, N]``), else the epilogue is a pass of its own;
- the accumulators stay in tile registers between those intrinsics (their TIR buffer is a
  stand-in nothing reads): the tensor intrinsics name registers 0-7 directly;
- a thread must load the tile configuration (``ldtilecfg``: every tile 16 x 64 bytes) before
  its first tile instruction; :func:`configure_tiles` puts it at the start of each parallel
  task, which runs a contiguous range of blocks (loading it per block cost ~500 cycles each:
  a 520 x 128 x 512 matmul took 161 instead of 115 us on one core);
- the process must have asked Linux for tile state first
  (:func:`~.executable.enable_amx`; :func:`~.int8.has_amx` asks before choosing AMX, and
  loading an artifact whose manifest says AMX asks again).
"""

from __future__ import annotations

import functools

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad  # what a BufferLoad is in TVM 0.27
from tvm.script import tirx as T

from mmcompile.targets.tvm.int8 import AMX_COLS, AMX_DEPTH, AMX_ROWS, BLOCK, STEP
from mmcompile.targets.tvm.schedule_util import coefficient, fill_and_copy, with_functions

DOT, ZERO, STORE = "mmcompile_amx_dot_32x32x64", "mmcompile_amx_zero_32x32", \
    "mmcompile_amx_store_32x32"
VECTOR_BYTES = 64  # an AVX-512 vector: one tile row
_TILE_CALLS = ("llvm.x86.tdpbusd", "llvm.x86.tdpbsud", "llvm.x86.tilezero")


def _intrin(name: str, *args):
    return T.call_llvm_intrin("void", name, *args)


@functools.cache
def register_intrinsics() -> None:
    """Register the three tensor intrinsics once (their TVMScript is parsed on first use)."""
    rows, cols, depth = AMX_ROWS, AMX_COLS // BLOCK, AMX_DEPTH // STEP

    @T.prim_func(s_tir=True)
    def zero_desc(C: T.Buffer((rows, cols, BLOCK), "int32", offset_factor=1,
                              strides=[T.int32(), T.int32(), 1],
                              scope="local")):
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:rows, 0:cols, 0:BLOCK])
            for i, j, c in T.grid(rows, cols, BLOCK):
                with T.sblock("init"):
                    vi, vj, vl = T.axis.remap("SSS", [i, j, c])
                    C[vi, vj, vl] = 0

    @T.prim_func(s_tir=True)
    def zero_impl(C: T.Buffer((rows, cols, BLOCK), "int32", offset_factor=1,
                              strides=[T.int32(), T.int32(), 1],
                              scope="local")):
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:rows, 0:cols, 0:BLOCK])
            T.evaluate(_intrin("llvm.x86.tilezero", T.uint8(0)))
            T.evaluate(_intrin("llvm.x86.tilezero", T.uint8(1)))
            T.evaluate(_intrin("llvm.x86.tilezero", T.uint8(2)))
            T.evaluate(_intrin("llvm.x86.tilezero", T.uint8(3)))

    @T.prim_func(s_tir=True)
    def dot_desc(A: T.Buffer((rows, AMX_DEPTH), "uint8", offset_factor=1, strides=[T.int32(), 1]),
                 B: T.Buffer((cols, depth, BLOCK, STEP), "int8", offset_factor=1,
                             strides=[T.int32(), BLOCK * STEP, STEP, 1]),
                 C: T.Buffer((rows, cols, BLOCK), "int32", offset_factor=1,
                              strides=[T.int32(), T.int32(), 1],
                             scope="local")):
        with T.sblock("root"):
            T.reads(C[0:rows, 0:cols, 0:BLOCK], A[0:rows, 0:AMX_DEPTH],
                    B[0:cols, 0:depth, 0:BLOCK, 0:STEP])
            T.writes(C[0:rows, 0:cols, 0:BLOCK])
            for i, jb, jl, kq, kr in T.grid(rows, cols, BLOCK, depth, STEP):
                with T.sblock("update"):
                    vi, vjb, vjl, vkq, vkr = T.axis.remap("SSSRR", [i, jb, jl, kq, kr])
                    C[vi, vjb, vjl] = C[vi, vjb, vjl] + \
                        T.Cast("int32", A[vi, vkq * STEP + vkr]) * \
                        T.Cast("int32", B[vjb, vkq, vjl, vkr])

    @T.prim_func(s_tir=True)
    def dot_impl(A: T.Buffer((rows, AMX_DEPTH), "uint8", offset_factor=1, strides=[T.int32(), 1]),
                 B: T.Buffer((cols, depth, BLOCK, STEP), "int8", offset_factor=1,
                             strides=[T.int32(), BLOCK * STEP, STEP, 1]),
                 C: T.Buffer((rows, cols, BLOCK), "int32", offset_factor=1,
                              strides=[T.int32(), T.int32(), 1],
                             scope="local")):
        with T.sblock("root"):
            T.reads(C[0:rows, 0:cols, 0:BLOCK], A[0:rows, 0:AMX_DEPTH],
                    B[0:cols, 0:depth, 0:BLOCK, 0:STEP])
            T.writes(C[0:rows, 0:cols, 0:BLOCK])
            # tiles 4, 5: rows 0-15 and 16-31; 6, 7: the two 16-column weight panels
            T.evaluate(_intrin("llvm.x86.tileloadd64", T.uint8(4), T.address_of(A[0, 0]),
                               T.Cast("int64", A.strides[0])))
            T.evaluate(_intrin("llvm.x86.tileloadd64", T.uint8(5),
                               T.address_of(A[16, 0]),
                               T.Cast("int64", A.strides[0])))
            T.evaluate(_intrin("llvm.x86.tileloadd64", T.uint8(6), T.address_of(B[0, 0, 0, 0]),
                               T.int64(BLOCK * STEP)))
            T.evaluate(_intrin("llvm.x86.tileloadd64", T.uint8(7),
                               T.address_of(B[1, 0, 0, 0]), T.int64(BLOCK * STEP)))
            T.evaluate(_intrin("llvm.x86.tdpbusd", T.uint8(0), T.uint8(4), T.uint8(6)))
            T.evaluate(_intrin("llvm.x86.tdpbusd", T.uint8(1), T.uint8(4), T.uint8(7)))
            T.evaluate(_intrin("llvm.x86.tdpbusd", T.uint8(2), T.uint8(5), T.uint8(6)))
            T.evaluate(_intrin("llvm.x86.tdpbusd", T.uint8(3), T.uint8(5), T.uint8(7)))

    @T.prim_func(s_tir=True)
    def store_desc(S: T.Buffer((rows, cols, BLOCK), "int32", offset_factor=1,
                              strides=[T.int32(), T.int32(), 1],
                               scope="local"),
                   D: T.Buffer((rows, cols, BLOCK), "int32", offset_factor=1,
                              strides=[T.int32(), T.int32(), 1])):
        with T.sblock("root"):
            T.reads(S[0:rows, 0:cols, 0:BLOCK])
            T.writes(D[0:rows, 0:cols, 0:BLOCK])
            for i, j, c in T.grid(rows, cols, BLOCK):
                with T.sblock("store"):
                    vi, vj, vl = T.axis.remap("SSS", [i, j, c])
                    D[vi, vj, vl] = S[vi, vj, vl]

    @T.prim_func(s_tir=True)
    def store_impl(S: T.Buffer((rows, cols, BLOCK), "int32", offset_factor=1,
                              strides=[T.int32(), T.int32(), 1],
                               scope="local"),
                   D: T.Buffer((rows, cols, BLOCK), "int32", offset_factor=1,
                              strides=[T.int32(), T.int32(), 1])):
        with T.sblock("root"):
            T.reads(S[0:rows, 0:cols, 0:BLOCK])
            T.writes(D[0:rows, 0:cols, 0:BLOCK])
            T.evaluate(_intrin("llvm.x86.tilestored64", T.uint8(0), T.address_of(D[0, 0, 0]),
                               T.Cast("int64", D.strides[0] * 4)))
            T.evaluate(_intrin("llvm.x86.tilestored64", T.uint8(1),
                               T.address_of(D[0, 1, 0]),
                               T.Cast("int64", D.strides[0] * 4)))
            T.evaluate(_intrin("llvm.x86.tilestored64", T.uint8(2),
                               T.address_of(D[16, 0, 0]),
                               T.Cast("int64", D.strides[0] * 4)))
            T.evaluate(_intrin("llvm.x86.tilestored64", T.uint8(3),
                               T.address_of(D[16, 1, 0]),
                               T.Cast("int64", D.strides[0] * 4)))

    s_tir.TensorIntrin.register(ZERO, zero_desc, zero_impl, override=True)
    s_tir.TensorIntrin.register(DOT, dot_desc, dot_impl, override=True)
    s_tir.TensorIntrin.register(STORE, store_desc, store_impl, override=True)


@functools.cache
def register_conv_intrinsics(row_tiles: int) -> tuple[str, str, str]:
    """The tensor intrinsics of an AMX convolution (:func:`~.int8._amx_conv2d`) whose
    register block is ``row_tiles`` output rows of ``32 / row_tiles`` pixels (2 x 2 tiles:
    two 16-channel weight tiles, two 16-pixel activation tiles); their names."""
    rows, pixels = row_tiles, AMX_COLS // row_tiles
    names = tuple(f"mmcompile_amx_conv{rows}_{n}" for n in ("dot", "zero", "store"))
    # tile (2 a + b): channel tile a times pixel tile b; pixel tile b is output row b of a
    # two-row block, else pixels 16 b of the row
    at = ((lambda b: (b, 0)) if rows == 2 else (lambda b: (0, 16 * b)))

    def acc(scope):
        return T.Buffer((rows, 2, BLOCK, pixels), "int32", offset_factor=1,
                        strides=[T.int32(), T.int32(), T.int32(), 1], scope=scope)
    weights = T.Buffer((2, BLOCK, 16, STEP), "int8", offset_factor=1,
                       strides=[T.int32(), 16 * STEP, STEP, 1])
    pixels_ = T.Buffer((rows, 16, pixels, STEP), "uint8", offset_factor=1,
                       strides=[T.int32(), T.int32(), STEP, 1])

    @T.prim_func(s_tir=True)
    def dot_desc2(A: weights, B: pixels_, C: acc("local")):
        with T.sblock("root"):
            T.reads(C[0:rows, 0:2, 0:BLOCK, 0:pixels], B[0:rows, 0:16, 0:pixels, 0:STEP],
                    A[0:2, 0:BLOCK, 0:16, 0:STEP])
            T.writes(C[0:rows, 0:2, 0:BLOCK, 0:pixels])
            for y, nb, nl, z, r, j in T.grid(rows, 2, BLOCK, pixels, 16, STEP):
                with T.sblock("update"):
                    vy, vnb, vnl, vz, vr, vj = T.axis.remap("SSSSRR", [y, nb, nl, z, r, j])
                    C[vy, vnb, vnl, vz] = C[vy, vnb, vnl, vz] + \
                        T.Cast("int32", B[vy, vr, vz, vj]) * T.Cast("int32", A[vnb, vnl, vr, vj])

    # one output row a block: no row loop (a unit loop is not one the block sees)
    @T.prim_func(s_tir=True)
    def dot_desc1(A: weights, B: pixels_, C: acc("local")):
        with T.sblock("root"):
            T.reads(C[0:rows, 0:2, 0:BLOCK, 0:pixels], B[0:rows, 0:16, 0:pixels, 0:STEP],
                    A[0:2, 0:BLOCK, 0:16, 0:STEP])
            T.writes(C[0:rows, 0:2, 0:BLOCK, 0:pixels])
            for nb, nl, z, r, j in T.grid(2, BLOCK, pixels, 16, STEP):
                with T.sblock("update"):
                    vnb, vnl, vz, vr, vj = T.axis.remap("SSSRR", [nb, nl, z, r, j])
                    C[0, vnb, vnl, vz] = C[0, vnb, vnl, vz] + \
                        T.Cast("int32", B[0, vr, vz, vj]) * T.Cast("int32", A[vnb, vnl, vr, vj])
    dot_desc = dot_desc2 if rows == 2 else dot_desc1

    @T.prim_func(s_tir=True)
    def dot_impl(A: weights, B: pixels_, C: acc("local")):
        with T.sblock("root"):
            T.reads(C[0:rows, 0:2, 0:BLOCK, 0:pixels], B[0:rows, 0:16, 0:pixels, 0:STEP],
                    A[0:2, 0:BLOCK, 0:16, 0:STEP])
            T.writes(C[0:rows, 0:2, 0:BLOCK, 0:pixels])
            # tiles 4, 5: the two weight tiles; 6, 7: the two pixel tiles
            T.evaluate(_intrin("llvm.x86.tileloadd64", T.uint8(4), T.address_of(A[0, 0, 0, 0]),
                               T.int64(16 * STEP)))
            T.evaluate(_intrin("llvm.x86.tileloadd64", T.uint8(5), T.address_of(A[1, 0, 0, 0]),
                               T.int64(16 * STEP)))
            T.evaluate(_intrin("llvm.x86.tileloadd64", T.uint8(6),
                               T.address_of(B[at(0)[0], 0, at(0)[1], 0]),
                               T.Cast("int64", B.strides[1])))
            T.evaluate(_intrin("llvm.x86.tileloadd64", T.uint8(7),
                               T.address_of(B[at(1)[0], 0, at(1)[1], 0]),
                               T.Cast("int64", B.strides[1])))
            T.evaluate(_intrin("llvm.x86.tdpbsud", T.uint8(0), T.uint8(4), T.uint8(6)))
            T.evaluate(_intrin("llvm.x86.tdpbsud", T.uint8(1), T.uint8(4), T.uint8(7)))
            T.evaluate(_intrin("llvm.x86.tdpbsud", T.uint8(2), T.uint8(5), T.uint8(6)))
            T.evaluate(_intrin("llvm.x86.tdpbsud", T.uint8(3), T.uint8(5), T.uint8(7)))

    @T.prim_func(s_tir=True)
    def zero_desc2(C: acc("local")):
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:rows, 0:2, 0:BLOCK, 0:pixels])
            for y, nb, nl, z in T.grid(rows, 2, BLOCK, pixels):
                with T.sblock("init"):
                    vy, vnb, vnl, vz = T.axis.remap("SSSS", [y, nb, nl, z])
                    C[vy, vnb, vnl, vz] = 0

    @T.prim_func(s_tir=True)
    def zero_desc1(C: acc("local")):
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:rows, 0:2, 0:BLOCK, 0:pixels])
            for nb, nl, z in T.grid(2, BLOCK, pixels):
                with T.sblock("init"):
                    vnb, vnl, vz = T.axis.remap("SSS", [nb, nl, z])
                    C[0, vnb, vnl, vz] = 0
    zero_desc = zero_desc2 if rows == 2 else zero_desc1

    @T.prim_func(s_tir=True)
    def zero_impl(C: acc("local")):
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:rows, 0:2, 0:BLOCK, 0:pixels])
            T.evaluate(_intrin("llvm.x86.tilezero", T.uint8(0)))
            T.evaluate(_intrin("llvm.x86.tilezero", T.uint8(1)))
            T.evaluate(_intrin("llvm.x86.tilezero", T.uint8(2)))
            T.evaluate(_intrin("llvm.x86.tilezero", T.uint8(3)))

    @T.prim_func(s_tir=True)
    def store_desc2(S: acc("local"), D: acc("global")):
        with T.sblock("root"):
            T.reads(S[0:rows, 0:2, 0:BLOCK, 0:pixels])
            T.writes(D[0:rows, 0:2, 0:BLOCK, 0:pixels])
            for y, nb, nl, z in T.grid(rows, 2, BLOCK, pixels):
                with T.sblock("store"):
                    vy, vnb, vnl, vz = T.axis.remap("SSSS", [y, nb, nl, z])
                    D[vy, vnb, vnl, vz] = S[vy, vnb, vnl, vz]

    @T.prim_func(s_tir=True)
    def store_desc1(S: acc("local"), D: acc("global")):
        with T.sblock("root"):
            T.reads(S[0:rows, 0:2, 0:BLOCK, 0:pixels])
            T.writes(D[0:rows, 0:2, 0:BLOCK, 0:pixels])
            for nb, nl, z in T.grid(2, BLOCK, pixels):
                with T.sblock("store"):
                    vnb, vnl, vz = T.axis.remap("SSS", [nb, nl, z])
                    D[0, vnb, vnl, vz] = S[0, vnb, vnl, vz]
    store_desc = store_desc2 if rows == 2 else store_desc1

    @T.prim_func(s_tir=True)
    def store_impl(S: acc("local"), D: acc("global")):
        with T.sblock("root"):
            T.reads(S[0:rows, 0:2, 0:BLOCK, 0:pixels])
            T.writes(D[0:rows, 0:2, 0:BLOCK, 0:pixels])
            T.evaluate(_intrin("llvm.x86.tilestored64", T.uint8(0),
                               T.address_of(D[at(0)[0], 0, 0, at(0)[1]]),
                               T.Cast("int64", D.strides[2] * 4)))
            T.evaluate(_intrin("llvm.x86.tilestored64", T.uint8(1),
                               T.address_of(D[at(1)[0], 0, 0, at(1)[1]]),
                               T.Cast("int64", D.strides[2] * 4)))
            T.evaluate(_intrin("llvm.x86.tilestored64", T.uint8(2),
                               T.address_of(D[at(0)[0], 1, 0, at(0)[1]]),
                               T.Cast("int64", D.strides[2] * 4)))
            T.evaluate(_intrin("llvm.x86.tilestored64", T.uint8(3),
                               T.address_of(D[at(1)[0], 1, 0, at(1)[1]]),
                               T.Cast("int64", D.strides[2] * 4)))

    for name, desc, impl in zip(names, (dot_desc, zero_desc, store_desc),
                                (dot_impl, zero_impl, store_impl)):
        s_tir.TensorIntrin.register(name, desc, impl, override=True)
    return names


def schedule_conv_staging(sch, pixels, rows) -> None:
    """The AMX convolution's two staging passes (:func:`~.int8._amx_conv2d`), each parallel
    over its rows: the padded input, 4 channels of a pixel contiguous (the border filled
    apart, so that the copy has no condition and LLVM vectorizes it along the pixels, the 4
    channels' stores interleaved); the tile rows, copies of 16-pixel runs, one vector of
    64 bytes each where the stride is 1 (else left to LLVM)."""
    for block in fill_and_copy(sch, pixels):
        *outer, _, channel = sch.get_loops(block)
        sch.parallel(sch.fuse(*outer))
        sch.unroll(channel)
    *outer, pixel, channel = sch.get_loops(rows)
    sch.parallel(sch.fuse(*outer))
    run = sch.fuse(pixel, channel)
    size = int(sch.get(run).extent)
    if size % VECTOR_BYTES == 0 and _contiguous(sch, rows):
        sch.vectorize(sch.split(run, [None, VECTOR_BYTES])[1])


def _contiguous(sch, rows) -> bool:
    """Whether the tile-row block ``rows`` copies runs of consecutive staged bytes: its
    pixel index (the block's next-to-last variable) has coefficient 1 (stride 1)."""
    block = sch.get(rows)
    pixel = block.iter_vars[-2].var
    loads = []

    def visit(load, mutator):
        loads.append(load)
        return mutator.default_mutate(load)
    tvm_ffi.structural_mutate(block.body, [(TensorLoad, visit)])
    return bool(loads) and all(coefficient(load.indices[-2], pixel) == 1 for load in loads)


def schedule_conv_sum(sch, acc, target, epilogue=None) -> None:
    """Tile, parallelize and tensorize the AMX convolution's sum block ``acc`` (``[batch,
    output rows, channel blocks, 16, pixels]`` over (kernel row, reduction rows / 16, 16, 4),
    :func:`~.int8._amx_conv2d`): register blocks of ``row_tiles`` output rows x 32 channels
    x ``32 / row_tiles`` pixels, parallel tasks of contiguous blocks (:func:`configure_tiles`
    loads the configuration once per task); ``epilogue`` (the block writing the NCHW output),
    when given, runs per register block after its store, vectorized along the pixels."""
    b, y, nb, nl, z, rh, rq, rr, rj = sch.get_loops(acc)
    pixels = int(sch.get(acc).writes[0].source.shape[-1])
    rows_per = 2 if pixels % AMX_COLS and pixels % (AMX_COLS // 2) == 0 else 1
    if rows_per == 1 and pixels % AMX_COLS:
        raise ValueError(f"{pixels} pixels: not a multiple of a register block's")
    dot, zero, store = register_conv_intrinsics(rows_per)
    yo, yi = sch.split(y, [None, rows_per])
    nbo, nbi = sch.split(nb, [None, 2])
    inner = 4 if rows_per == 2 else 3  # loops of a tile store (a unit row loop is dropped)
    zo, zi = sch.split(z, [None, AMX_COLS // rows_per])
    outer = [b, yo, nbo, zo]
    # the parallel tasks split one of the block loops exactly (a split of their fused loop
    # no longer blockizes in TVM 0.27), output rows first: each a contiguous range of blocks
    threads = int(target.attrs.get("num-cores", 0)) or 1
    for loop in (yo, nbo, b, zo):
        if (tasks := _tasks(int(sch.get(loop).extent), threads)) is not None:
            task, rest = sch.split(loop, [tasks, None])
            outer = [task, *(rest if lp is loop else lp for lp in outer)]
            break
    sch.reorder(*outer, rh, rq, yi, nbi, nl, zi, rr, rj)
    tile = sch.cache_write(acc, 0, "local")  # stands for the tile registers: never accessed
    sch.reverse_compute_at(tile, outer[-1])
    sch.parallel(outer[0])
    if epilogue is not None:  # per block: while its sums are in L1
        sch.reverse_compute_at(epilogue, outer[-1])
        sch.vectorize(sch.get_loops(epilogue)[-1])
    init = sch.decompose_reduction(acc, rh)
    sch.tensorize(yi if rows_per == 2 else nbi, dot)
    sch.tensorize(sch.get_loops(init)[-inner], zero)
    sch.tensorize(sch.get_loops(tile)[-inner], store)


def _tasks(blocks: int, threads: int) -> int | None:
    """How many parallel tasks to split ``blocks`` register blocks into: the smallest divisor
    of ``blocks`` not below ``threads`` (each task loads the tile configuration once; an
    exact split keeps the tensorized blocks' bindings affine); None without one."""
    return next((d for d in range(max(threads, 1), blocks + 1) if blocks % d == 0), None)


def schedule_sum(sch, acc, target, epilogue=None) -> None:
    """Tile, parallelize and tensorize the AMX sum block ``acc`` (``[rows, N/16, 16]`` over
    ``(K/4, 4)``, :func:`~.int8._amx_sum`); its int32 result lands in ``acc``'s buffer, and
    ``epilogue`` (a block writing ``[rows, N]`` from it), when given, runs per register
    block right after the block's store, vectorized along its 32 columns.

    The parallel tasks split the row blocks (else the column blocks) exactly, each a
    contiguous range of register blocks: :func:`configure_tiles` loads the configuration at
    the start of each."""
    register_intrinsics()
    row, panel, lane, quad, step = sch.get_loops(acc)
    io, ii = sch.split(row, [None, AMX_ROWS])
    jo, ji = sch.split(panel, [None, AMX_COLS // BLOCK])
    ko, ki = sch.split(quad, [None, AMX_DEPTH // STEP])
    threads = int(target.attrs.get("num-cores", 0)) or 1
    rows, cols = (int(sch.get(loop).extent) for loop in (io, jo))
    if (tasks := _tasks(rows, threads)) is not None:
        task, io = sch.split(io, [tasks, None])
        outer = [task, io, jo]
    elif (tasks := _tasks(cols, threads)) is not None:
        task, jo = sch.split(jo, [tasks, None])
        outer = [task, io, jo]
    else:  # (unreachable: ``rows`` divides itself) one task per row block
        task, outer = io, [io, jo]
    sch.reorder(*outer, ko, ii, ji, lane, ki, step)
    tile = sch.cache_write(acc, 0, "local")  # stands for the tile registers: never accessed
    sch.reverse_compute_at(tile, outer[-1])
    sch.parallel(task)
    if epilogue is not None:  # per block: while its sums are in L1
        sch.reverse_compute_at(epilogue, outer[-1])
        _, lanes = sch.split(sch.get_loops(epilogue)[-1], [None, BLOCK])
        sch.vectorize(lanes)
    init = sch.decompose_reduction(acc, ko)
    sch.tensorize(ii, DOT)
    sch.tensorize(sch.get_loops(init)[-3], ZERO)
    sch.tensorize(sch.get_loops(tile)[-3], STORE)


def _configuration():
    """Statements that load the tile configuration: palette 1, tiles 0-7 of 16 rows x 64
    bytes (the 64-byte layout: palette, start row, 14 reserved bytes, 16 two-byte row
    widths, 16 row counts). Fresh buffers on every call (each use needs its own)."""
    width, rows = AMX_DEPTH, AMX_ROWS // 2
    widths = sum(width << (16 * t) for t in range(4))
    counts = sum(rows << (8 * t) for t in range(8))

    @T.prim_func
    def configure():
        cfg = T.alloc_buffer((8,), "uint64", scope="local")
        cfg[0] = T.uint64(1)
        cfg[1] = T.uint64(0)
        cfg[2] = T.uint64(widths)
        cfg[3] = T.uint64(widths)
        cfg[4] = T.uint64(0)
        cfg[5] = T.uint64(0)
        cfg[6] = T.uint64(counts)
        cfg[7] = T.uint64(0)
        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", cfg.access_ptr("r")))
    return list(configure.body.seq)


@functools.cache
def _tile_ids() -> frozenset[int]:
    from tvm.target import codegen
    return frozenset(int(codegen.llvm_lookup_intrinsic_id(n)) for n in _TILE_CALLS)


def _uses_tiles(stmt) -> bool:
    """Whether ``stmt`` runs a tile multiply-add or zeroes a tile."""
    ids, found = _tile_ids(), []

    def visit(call, mutator):
        if (getattr(call.op, "name", "") == "tirx.call_llvm_intrin" and call.args
                and isinstance(call.args[0], tirx.IntImm) and int(call.args[0]) in ids):
            found.append(call)
        return mutator.default_mutate(call)
    tvm_ffi.structural_mutate(stmt, [(tvm.ir.Call, visit)])
    return bool(found)


def configure_tiles(mod):
    """``mod`` (a copy, when anything changes) with the tile configuration loaded at the
    start of every parallel task, and the tiles released at its end, in each function that
    runs AMX tile instructions."""
    def visit(loop, mutator):
        if loop.kind != tirx.ForKind.PARALLEL or not _uses_tiles(loop.body):
            return mutator.default_mutate(loop)
        release = tirx.Evaluate(T.call_llvm_intrin("void", "llvm.x86.tilerelease"))
        body = tirx.SeqStmt([*_configuration(), loop.body, release])
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body,
                        loop.thread_binding, loop.annotations)

    changed = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and _uses_tiles(func.body):
            changed[gv] = func.with_body(tvm_ffi.structural_mutate(func.body,
                                                                   [(tirx.For, visit)]))
    return with_functions(mod, changed)
