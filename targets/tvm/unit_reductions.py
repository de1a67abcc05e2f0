"""TIR rewrite: reductions over a single element become plain elementwise blocks.

Why this exists (a miscompile, not a speed-up). A reduction whose every reduction axis has
extent 1 (a depthwise 1x1 convolution, a 1x1 convolution over one input channel, a matmul with
K = 1, a 1x1 pool, a global pool over a 1x1 map, a 1x1 transposed convolution) still carries a
``T.init()``. dlight's ``normalize_prim_func`` drops unit loops, so the block then has no
reduction iterator left and looks *complete* to ``reverse_compute_inline``, which TVM 0.27
applies (``dlight.try_inline``, used by our ``Fallback`` and ``MatmulLike`` rules and by
dlight's GPU rules) without refusing the ``init``: a bias ``out = conv + b`` inlined into it
becomes ``init: out = 0 + b; body: out = out + x * w + b``, the bias counted twice. Measured
before this pass: ``nn.Conv2d(16, 16, 1, groups=16)`` off by 26% of the output's range,
``nn.Linear(1, 32)`` 34%, ``AvgPool2d(1) + c`` 31%, ``adaptive_avg_pool2d(x, 1)`` of a 1x1 map
34% (relative to max(1, max|ref|)); all exact after it.

The fix removes the construct every rule trips on instead of guarding each rule: a block
whose reduction axes all have extent 1 computes ``combine(init, value)`` once, so it is
rewritten to store exactly that, without ``init`` and with its reduction iterators made
spatial. Such blocks are elementwise, so the rules then schedule them as elementwise
kernels (parallel and vectorized). Reductions over more than one element are untouched.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad(...) builds in TVM 0.27

from mmcompile.targets.tvm.schedule_util import with_functions

# Binary combiners TE emits for its reductions (sum, max, min, prod, logical and/or).
_COMBINERS = (tirx.Add, tirx.Max, tirx.Min, tirx.Mul, tirx.And, tirx.Or)


def _is_unit_reduction(block) -> bool:
    reduce_ = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    return block.init is not None and bool(reduce_) and all(
        isinstance(iv.dom.extent, tirx.IntImm) and int(iv.dom.extent) == 1 for iv in reduce_)


def _same_load(expr, store) -> bool:
    return (isinstance(expr, TensorLoad) and expr.source.same_as(store.buffer)
            and len(expr.indices) == len(store.indices)
            and all(tvm_ffi.structural_equal(a, b) for a, b in zip(expr.indices, store.indices)))


def _spatial_block(block):
    """The elementwise equivalent of a unit reduction ``block``, or None when its body is not
    ``out[i] = combine(out[i], value)`` over an ``init`` of ``out[i] = init`` (left alone)."""
    body, init = block.body, block.init
    if not (isinstance(body, tirx.BufferStore) and isinstance(init, tirx.BufferStore)
            and init.buffer.same_as(body.buffer) and isinstance(body.value, _COMBINERS)):
        return None
    combine = body.value
    if _same_load(combine.a, body):
        value = combine.b
    elif _same_load(combine.b, body):
        value = combine.a
    else:
        return None
    if isinstance(combine, tirx.Add) and isinstance(init.value, tirx.FloatImm) \
            and float(init.value.value) == 0.0:
        result = value  # 0 + v: the common case (sums) needs no extra add
    else:
        result = type(combine)(init.value, value)
    iter_vars = [iv if iv.iter_type != tirx.IterVar.CommReduce
                 else tirx.IterVar(iv.dom, iv.var, tirx.IterVar.DataPar)
                 for iv in block.iter_vars]
    reads = [r for r in block.reads if not r.source.same_as(body.buffer)]
    return s_tir.SBlock(iter_vars, reads, block.writes, block.name_hint,
                        tirx.BufferStore(body.buffer, result, body.indices), None,
                        block.alloc_buffers, block.match_buffers, block.annotations)


def spatialize(func):
    """``func`` (a TIR PrimFunc) with its unit reductions rewritten; returns ``(func, count)``."""
    sch = s_tir.Schedule(func)
    count = 0
    for block in _blocks(sch):
        old = sch.get(block)
        if not _is_unit_reduction(old):
            continue
        new = _spatial_block(old)
        if new is None:
            continue
        sch.state.replace(sch.get_sref(block), new, {old: new})
        count += 1
    return (sch.mod["main"], count) if count else (func, 0)  # the schedule keeps the attrs


def _blocks(sch):
    names = []
    tvm_ffi.structural_walk(sch.mod["main"].body,
                            (s_tir.SBlock, lambda block: names.append(block.name_hint)))
    return [sch.get_sblock(name) for name in names if name != "root"]


@tvm.transform.module_pass(opt_level=0, name="mmcompile.SpatializeUnitReductions")
class SpatializeUnitReductions:
    """Every PrimFunc's reductions over one element rewritten as elementwise blocks (see the
    module docstring: without this, epilogues inlined into them are applied twice)."""

    def transform_module(self, mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                new, count = spatialize(func)
                if count:
                    updates[gv] = new
        return with_functions(mod, updates)
