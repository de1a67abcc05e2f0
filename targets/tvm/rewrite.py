"""Relax module rewrites shared by the CPU lowering passes (:mod:`.layout`, :mod:`.fast_math`,
:mod:`.rows`, :mod:`.depthwise`, :mod:`.spanning_conv`, :mod:`.transposed_conv`,
:mod:`.winograd`, :mod:`.one_hot`)."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import expr_functor


def rewrite_functions(mod, mutator):
    """``mod`` with every Relax function passed through ``mutator`` (built on ``mod``)."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()



def constant_value(expr):
    """The numpy value of a Relax constant, None for anything else."""
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


@expr_functor.visitor
class _Uses(relax.PyExprVisitor):
    def __init__(self):
        super().__init__()
        self.count: dict = {}

    def visit_var_(self, var):
        self.count[var] = self.count.get(var, 0) + 1

    def visit_dataflow_var_(self, var):
        self.count[var] = self.count.get(var, 0) + 1


def variable_uses(mod) -> dict:
    """How often each variable of ``mod``'s Relax functions is read (a rewrite that folds a
    value into its consumer needs the value read nowhere else)."""
    uses = _Uses()
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            uses.visit_expr(func)
    return uses.count


def static_shape(expr) -> list[int] | None:
    """The shape of a Relax tensor expression as integers, None where any dim is symbolic or
    the shape is unknown."""
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


def is_call(expr, op_name: str) -> bool:
    """Whether ``expr`` is a call of the Relax operator ``op_name``."""
    return (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)
            and expr.op.name == op_name)


def constant_nchw_call(call, op_name: str, kernel_layout: str):
    """``(data, weight, attrs)`` of ``call`` when it calls ``op_name`` (a convolution) on
    NCHW data with an NCHW output and constant weights in ``kernel_layout``, else None."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name != op_name:
        return None
    data, weight = call.args
    attrs = call.attrs
    if (not isinstance(weight, tvm.ir.expr.Constant) or attrs.kernel_layout != kernel_layout
            or attrs.data_layout != "NCHW" or attrs.out_layout != "NCHW"):
        return None
    return data, weight, attrs


@expr_functor.mutator
class _CallRewriter(relax.PyExprMutator):
    def __init__(self, mod, rules):
        super().__init__(mod)
        self.rules = rules

    def visit_call_(self, call):
        call = super().visit_call_(call)
        rule = self.rules.get(call.op.name) if isinstance(call.op, tvm.ir.Op) else None
        if rule is None or not all(isinstance(getattr(a, "ty", None), relax.TensorType)
                                   and a.ty.dtype == "float32" for a in call.args):
            return call
        build, attrs, *accepts = rule
        values = [getattr(call.attrs, a) for a in attrs]
        if accepts and not accepts[0](call.args[0].ty, *values):
            return call
        name = getattr(build, "func", build).__name__  # the function a functools.partial wraps
        return self.builder_.call_te(build, *call.args, *values, primfunc_name_hint=name)


def rewrite_calls(mod, rules):
    """``mod`` with every float32 call of an op in ``rules`` replaced by a ``call_te`` of its
    TE builder: ``{op name: (builder, attribute names passed after the arguments[, accepts])}``,
    ``accepts(first argument's type, *attributes)`` saying whether the rule applies."""
    return rewrite_functions(mod, _CallRewriter(mod, rules))
