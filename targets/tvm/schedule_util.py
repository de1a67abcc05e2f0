"""Helpers shared by the CPU schedule rules."""

from __future__ import annotations

from tvm import tirx
from tvm.target.codegen import llvm_get_vector_width


def extent(sch, loop) -> int | None:
    """The loop's constant extent, or None when symbolic."""
    value = sch.get(loop).extent
    return int(value) if isinstance(value, tirx.IntImm) else None


def lanes_for(target) -> int:
    """float32 lanes per vector register for the target's mcpu: 16 with AVX-512, 8 with AVX2."""
    try:
        return max(4, llvm_get_vector_width(target) // 32)
    except Exception:
        return 8


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


def _write_shape(sch, block_rv) -> list[int | None]:
    buffer = sch.get(block_rv).writes[0].buffer
    return [int(d) if isinstance(d, tirx.IntImm) else None for d in buffer.shape]


def within_reduction(sch, main_rv, others) -> bool:
    """Whether every block scheduled under the reduction's tiles writes, dim by dim, no more
    than the reduction does. An epilogue that grows the tensor (Pad after a Linear) would be
    computed only where the reduction's tiles reach, leaving the rest uninitialised."""
    ref = _write_shape(sch, main_rv)
    for block_rv in others:
        shape = _write_shape(sch, block_rv)
        if len(shape) != len(ref) or any(a is None or b is None or a > b
                                         for a, b in zip(shape, ref)):
            return False
    return True
