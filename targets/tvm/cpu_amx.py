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
from tvm.script import tirx as T

from mmcompile.targets.tvm.int8 import AMX_COLS, AMX_DEPTH, AMX_ROWS, BLOCK, STEP
from mmcompile.targets.tvm.schedule_util import with_functions

DOT, ZERO, STORE = "mmcompile_amx_dot_32x32x64", "mmcompile_amx_zero_32x32", \
    "mmcompile_amx_store_32x32"
_TILE_CALLS = ("llvm.x86.tdpbusd", "llvm.x86.tilezero")


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
