"""fuse-gelu: decomposed GELU -> one Gelu op.

Exporters spell GELU out in elementwise ops. What torch 2.13's dynamo exporter (opset 18) emits:

- ``nn.GELU()``, transformers ``gelu``: ``x * (0.5 * (1 + erf(x / 1.4142)))``;
- transformers ``gelu_python``: ``(x * 0.5) * (1 + erf(x / 1.4142))``;
- ``nn.GELU(approximate="tanh")``, ``gelu_pytorch_tanh``:
  ``x * (0.5 * (1 + tanh(0.7979 * (x + 0.044715 * x**3))))``;
- transformers ``gelu_new``: the same with ``(x * 0.5)`` first;
- transformers ``gelu_fast``: ``(x * 0.5) * (1 + tanh((x * 0.7979) * (1 + (x * 0.044715) * x)))``.

The rules below cover those plus the other common arrangements (``x / sqrt(2)`` or
``x * 0.7071``; ``x**3`` as ``Pow`` or ``x * x * x``; the 0.5 applied to x, to the bracket, last,
or as ``/ 2``). Add/Mul operand order is left to the pattern driver.

The replacement is the standard ``Gelu`` from opset 20 on (``approximate="tanh"`` for the tanh
form). Below opset 20 it is onnxruntime's contrib ``com.microsoft::Gelu`` / ``FastGelu``: both
pass ``onnx.checker``, run in onnxruntime and are converted by TVM's ONNX importer; the
``com.microsoft`` opset import (version 1) is added on export by onnx-graphsurgeon.

``quick_gelu`` (``x * sigmoid(1.702 * x)``) is a different function and is left alone.
"""

from __future__ import annotations

import itertools
import math

import onnx_graphsurgeon as gs

from mmcompile.ir import Graph
from mmcompile.transform import Pass, PassContext, PassResult, register_pass
from mmcompile.transform.rewrite import Match, Pattern, RewriteRule, apply_rules, const, op, var

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715

_const_ids = itertools.count()


def _k(value: float) -> Pattern:
    # Every constant is named so the callback can check that none of them broadcasts x.
    return const(f"k{next(_const_ids)}", value=value)


def _arrangements(x: Pattern, bracket: Pattern) -> list[Pattern]:
    """The ways ``0.5 * x * bracket`` is written."""
    return [
        op("Mul", x, op("Mul", bracket, _k(0.5))),
        op("Mul", op("Mul", x, _k(0.5)), bracket),
        op("Mul", op("Mul", x, bracket), _k(0.5)),
        op("Div", op("Mul", x, bracket), _k(2.0)),
    ]


def _erf_patterns() -> list[Pattern]:
    x = var("x")
    scaled = [op("Div", x, _k(_SQRT2)), op("Mul", x, _k(1.0 / _SQRT2))]
    return [p for s in scaled
            for p in _arrangements(x, op("Add", op("Erf", s), _k(1.0)))]


def _tanh_patterns() -> list[Pattern]:
    x = var("x")
    cubes = [op("Pow", x, _k(3.0)), op("Mul", op("Mul", x, x), x)]
    # sqrt(2/pi) * (x + 0.044715 * x^3)
    args = [op("Mul", op("Add", x, op("Mul", c, _k(_CUBIC))), _k(_SQRT_2_OVER_PI)) for c in cubes]
    # (sqrt(2/pi) * x) * (1 + 0.044715 * x * x), transformers' gelu_fast
    squares = [op("Mul", op("Mul", x, _k(_CUBIC)), x), op("Mul", op("Mul", x, x), _k(_CUBIC))]
    args += [op("Mul", op("Mul", x, _k(_SQRT_2_OVER_PI)), op("Add", s, _k(1.0))) for s in squares]
    return [p for a in args for p in _arrangements(x, op("Add", op("Tanh", a), _k(1.0)))]


def _scalars_only(m: Match) -> bool:
    """No constant in the match broadcasts x to a larger shape (Gelu(x) keeps x's shape)."""
    rank = len(m["x"].shape) if m["x"].shape is not None else None
    return all(v.size == 1 and (rank is None or v.ndim <= rank) for v in m.values.values())


def _gelu(tanh: bool):
    def rewrite(m: Match, graph: Graph) -> list[gs.Node] | None:
        if not _scalars_only(m):
            return None
        if graph.opset >= 20:
            attrs = {"approximate": "tanh"} if tanh else {}
            return [gs.Node("Gelu", attrs=attrs, inputs=[m["x"]], outputs=m.outputs)]
        return [gs.Node("FastGelu" if tanh else "Gelu", domain="com.microsoft",
                        inputs=[m["x"]], outputs=m.outputs)]
    return rewrite


RULES = ([RewriteRule("gelu-erf", p, _gelu(tanh=False)) for p in _erf_patterns()]
         + [RewriteRule("gelu-tanh", p, _gelu(tanh=True)) for p in _tanh_patterns()])


@register_pass
class FuseGelu(Pass):
    name = "fuse-gelu"
    description = "replace decomposed GELU (erf or tanh form) with one Gelu op"
    opt_level = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        counts = apply_rules(graph, RULES)
        return PassResult.from_stats(gelu_fused=counts["gelu-erf"],
                                     gelu_tanh_fused=counts["gelu-tanh"])
