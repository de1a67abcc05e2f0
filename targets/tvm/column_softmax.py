"""Softmax over an axis that is not the last: reduced down the columns, vectorized across them.

YOLOv8's box head (every ultralytics export) takes a softmax over the 16 bins of its
distribution-focal-loss regression, axis 1 of ``[1, 16, 4, anchors]``. TVM's kernel and
dlight's ``cpu.Reduction`` rule parallelize it over the 16 x 4 output rows, and each task then
recomputes the max, the exponentials and the sum of its whole column set: 16x the work, with
the column reductions scalar (YOLOv8n at 320x320: 12% of its time in this one kernel).

Here the reductions are written over the softmax axis with the last axis kept outside them
(:func:`column_softmax`), and :class:`ColumnSoftmax` schedules the function as columns of
that axis: tasks are (leading rows, a chunk of the last axis), and each task computes the max,
the exponentials, the sum and the quotient of its chunk, the chunk vectorized (a divisor of
the last axis up to :data:`MAX_CHUNK` wide: LLVM splits a wide vector into full ones and a
short tail, where a split with a predicate would be scalarized).
"""

from __future__ import annotations

from functools import partial

import tvm
from tvm import s_tir, te, tirx, topi

from mmcompile.targets.tvm.rewrite import rewrite_calls
from mmcompile.targets.tvm.schedule_util import (VectorRule, extent, injective_tail,
                                                 vectorize_reduction)

MAX_CHUNK = 64  # widest chunk of the last axis per task
MIN_COLUMNS = 8  # last axes shorter than this are left to the other rules
COLUMN = "column_"  # name prefix of the column reductions


def column_softmax(x, axis: int, fast_exp: bool = True):
    """Softmax of ``x`` over ``axis`` (not the last), the reductions over that axis only."""
    shape = [int(d) for d in x.shape]
    a = axis % len(shape)
    kept = shape[:a] + shape[a + 1:]

    def along(index, k):  # an element of ``x``'s shape from a reduced index and the axis'
        return (*index[:a], k, *index[a:])

    def reduced(index):  # the reduced index of an element of ``x``'s shape
        return (*index[:a], *index[a + 1:])

    k = te.reduce_axis((0, shape[a]), name="k")
    top = te.compute(kept, lambda *i: te.max(x[along(i, k)], axis=k), name=COLUMN + "max")
    shifted = te.compute(x.shape, lambda *i: x[i] - top[reduced(i)], name="shifted")
    exp = (topi.fast_exp if fast_exp else topi.exp)(shifted)
    j = te.reduce_axis((0, shape[a]), name="j")
    total = te.compute(kept, lambda *i: te.sum(exp[along(i, j)], axis=j), name=COLUMN + "sum")
    return te.compute(x.shape, lambda *i: exp[i] / total[reduced(i)], name="softmax")


def _applies(ty, axis) -> bool:
    """A static shape reduced over one axis that is not its last, the last long enough."""
    shape = getattr(ty, "shape", None)
    if shape is None or not all(isinstance(d, tirx.IntImm) for d in shape) or len(shape) < 2:
        return False
    return int(axis) % len(shape) != len(shape) - 1 and int(shape[-1]) >= MIN_COLUMNS


@tvm.transform.module_pass(opt_level=0, name="mmcompile.ColumnSoftmax")
class ColumnSoftmaxes:
    """Rewrite float32 softmax over an axis other than the last (static shapes) to
    :func:`column_softmax` (before ``FastMath``, which would take the softmax)."""

    def __init__(self, fast_exp: bool = True):
        self.fast_exp = fast_exp

    def transform_module(self, mod, _ctx):
        return rewrite_calls(mod, {"relax.nn.softmax": (
            partial(column_softmax, fast_exp=self.fast_exp), ("axis",), _applies)})


def _chunk(width: int) -> int:
    """The widest divisor of ``width`` up to :data:`MAX_CHUNK`."""
    return max(d for d in range(1, min(width, MAX_CHUNK) + 1) if width % d == 0)


class ColumnSoftmax(VectorRule):
    """Functions built by :func:`column_softmax` (with the elementwise ops ``FuseOps``
    grouped after it, when they keep its shape)."""

    @staticmethod
    def _schedule(func, lanes):
        sch = s_tir.Schedule(func)
        found = injective_tail(sch)
        if found is None:
            return None
        infos, names = found
        columns = [info for info, name in zip(infos, names) if name.startswith(COLUMN)]
        if len(columns) != 2:
            return None
        last = infos[-1].block_rv
        loops = sch.get_loops(last)
        if len(loops) != len(sch.get(columns[0].block_rv).iter_vars):  # rank - 1, + the axis
            return None
        axis = _loop_of(sch, last, _softmax_axis(sch, columns[0].block_rv))
        if axis is None or axis == len(loops) - 1:
            return None
        width = extent(sch, loops[-1])
        chunk = _chunk(width) if width else 0
        if chunk < 4:
            return None
        outer, inner = sch.split(loops[-1], [None, chunk])
        rest = [loop for i, loop in enumerate(loops[:-1]) if i != axis]
        sch.reorder(*rest, outer, loops[axis], inner)
        task = sch.fuse(*rest, outer)
        sch.parallel(task)
        sch.vectorize(inner)
        for info in reversed(infos[:-1]):
            sch.compute_at(info.block_rv, task, preserve_unit_loops=True)
        for info in infos[:-1]:
            block_loops = sch.get_loops(info.block_rv)[1:]  # below the task loop
            if info.is_injective():
                sch.vectorize(block_loops[-1])
                continue
            vectorize_reduction(sch, info.block_rv, *block_loops[-2:])  # [chunk, axis]
        return sch


def _softmax_axis(sch, column_rv) -> int | None:
    """The axis of the softmax input the column reduction reads along its reduction
    variable."""
    block = sch.get(column_rv)
    reduce_vars = [iv.var for iv in block.iter_vars if iv.iter_type != 0]
    if len(reduce_vars) != 1:
        return None
    for read in block.reads:
        for index, dim in enumerate(read.region):
            if dim.min.same_as(reduce_vars[0]):
                return index
    return None


def _loop_of(sch, block_rv, dim: int | None) -> int | None:
    """Which of ``block_rv``'s loops walks dimension ``dim`` of the buffer it writes (unit
    dimensions have no loop once the function is normalized)."""
    if dim is None:
        return None
    block = sch.get(block_rv)
    written = block.writes[0].region
    if dim >= len(written):
        return None
    ivars = [iv.var for iv in block.iter_vars]
    return next((i for i, var in enumerate(ivars) if written[dim].min.same_as(var)), None)
