"""Helpers shared by the CPU schedule rules."""

from __future__ import annotations

import numpy as np
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
