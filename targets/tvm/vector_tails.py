"""Vector loops whose lanes are guarded by a predicate: a vector branch where every lane holds.

A padded reduction (``pad_einsum``: 65 attention keys computed as 72) writes its tiles back
through a predicate, ``T.where(row < 65 and col < 65)``, and its epilogue (bias, activation,
a quantize / dequantize pair) is folded into that write-back. TVM's ``VectorizeLoop`` turns
a vector loop whose body is guarded by a lane-dependent condition into scalar code for every
vector, not only for the one that straddles the edge: the quantize epilogue of CLIP's
attention scores ran 8 ``vdivss`` + 8 ``vroundss`` per vector in every tile. (TVM's buffer
predication, ``tirx.enable_buffer_level_predication``, leaves this predicate scalar too.)

:func:`split_guarded_vectors` rewrites each such loop, after scheduling, into

    if pred(lane = first) and pred(lane = last):   # every lane in range
        for lane in vectorized(n): body            # no predicate
    else:
        for lane in unroll(n): body where pred     # lane by lane, as before

which is exact when every conjunct of the predicate that reads the lane is linear in it (then
it holds on all lanes iff it holds at both ends); other predicates are left alone.

Measured (znver3, 2 threads, the kernel alone, JIT-compiled): CLIP batch 8's attention-score
kernel with its quantize / dequantize epilogue 205 -> 121 us, the float build's (a scale)
86 -> 81 us; outputs bit-identical. With :func:`~.cpu_matmul.unroll_write_back` (without it
the split kernel's tile left registers, and from the exported library it ran no faster),
CLIP's int8 build at batch 8, same-process A/B of saved artifacts: 0.94x (batch 1 1.00x);
int8 late fusion and Whisper-text at batch 8 1.01x / 1.00x; the float suite at batch 8
0.97-1.02x (late fusion 0.97x; CLIP, Whisper-text, MM-IMDb, YOLO-audio, MobileNet-text,
MOSEI-TFN, MOSEI-LSTM, AV-MNIST 0.99-1.02x): no float kernel it reaches mattered. The scalar
branch is unrolled so that it, too, indexes the register tile with constants.
"""

from __future__ import annotations

import tvm_ffi
from tvm import IRModule, s_tir, tirx
from tvm.sym import Analyzer

from mmcompile.targets.tvm.schedule_util import coefficient


def _conjuncts(expr) -> list:
    if isinstance(expr, tirx.And):
        return _conjuncts(expr.a) + _conjuncts(expr.b)
    return [expr]


def _substitute(expr, var, value):
    return tvm_ffi.structural_mutate(
        expr, [(tirx.Var, lambda v, _mutator: value if v.same_as(var) else v)])


def _reads(expr, var) -> bool:
    return var in tirx.analysis.undefined_vars(expr)


def _holds_between_ends(cond, lane) -> bool:
    """Whether ``cond`` holds on every lane once it holds on the first and the last: it does
    not read the lane, or compares two expressions whose difference is affine in it."""
    if not _reads(cond, lane):
        return True
    return isinstance(cond, (tirx.LT, tirx.LE, tirx.GT, tirx.GE)) \
        and coefficient(cond.a - cond.b, lane) is not None


def _split(loop):
    """``loop`` as an if / else of a whole-vector and a guarded scalar loop, or None."""
    realize = loop.body
    if loop.kind != tirx.ForKind.VECTORIZED or not isinstance(realize, s_tir.SBlockRealize):
        return None
    lane, pred = loop.loop_var, realize.predicate
    if isinstance(pred, tirx.IntImm) or not _reads(pred, lane):
        return None
    if not all(_holds_between_ends(c, lane) for c in _conjuncts(pred)):
        return None
    last = loop.min + loop.extent - 1
    every_lane = Analyzer().simplify(
        tirx.And(_substitute(pred, lane, loop.min), _substitute(pred, lane, last)))
    whole = s_tir.SBlockRealize(realize.iter_values, tirx.const(True, "bool"), realize.block)
    vector = tirx.For(lane, loop.min, loop.extent, loop.kind, whole)
    scalar = tirx.For(lane, loop.min, loop.extent, tirx.ForKind.UNROLLED, realize)
    return tirx.IfThenElse(every_lane, vector, scalar)


def split_guarded_vectors(mod):
    """``mod`` (a copy, when anything changes) with every guarded vector loop of its
    PrimFuncs split (see the module doc)."""
    def visit(loop, mutator):
        loop = mutator.default_mutate(loop)
        return _split(loop) or loop

    changed = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            body = tvm_ffi.structural_mutate(func.body, [(tirx.For, visit)])
            if not body.same_as(func.body):
                changed[gv] = func.with_body(body)
    if not changed:
        return mod
    # both branches hold the same block: its variables are defined twice until renamed
    changed = tirx.transform.ConvertSSA()(IRModule(changed))
    mod = mod.clone()
    for gv, func in changed.functions_items():
        mod.update_func(mod.get_global_var(gv.name_hint), func)
    return mod
