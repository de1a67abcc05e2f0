"""fuse-layernorm: decomposed layer normalisation -> ``LayerNormalization`` (opset >= 17).

``nn.LayerNorm`` already exports as ``LayerNormalization`` (torch 2.13, dynamo, opset 18) and is
left as it is. Hand-written norms arrive decomposed; for
``(x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps)
* w + b`` the exporter emits::

    mean = ReduceMean(x, [-1]);  d = Sub(x, mean)
    d2 = Sub(x, ReduceMean(x, [2]))                        # var() recomputes the centring
    var = Reshape(ReduceMean(Mul(d2, d2), [2], keepdims=0), [.., 1])
    y = Add(Mul(Div(d, Sqrt(Add(var, eps))), w), b)

Two rule sets run one after the other, because an optional affine tail does not fit a single
tree pattern without doubling every variant:

1. the normalisation itself, in its variants (``d * d`` or ``Pow(d, 2)``; the centring shared or
   recomputed; ``keepdims=0`` + Reshape; ``Div`` by ``Sqrt``/``Pow(., 0.5)`` or ``Mul`` by
   ``Reciprocal(Sqrt)``/``Pow(., -0.5)``) -> ``LayerNormalization(x, ones, zeros)``;
2. ``LayerNormalization(x, s, zeros) * gamma`` and ``LayerNormalization(x, s, zeros) + beta``
   with constant ``gamma``/``beta`` that only vary over the normalised axes fold into the
   node's scale and bias (this also tidies exporter-made norms with unit scale).

Only trailing axes are fused (LayerNormalization normalises from ``axis`` to the end), and the
normalised dims must be static; ReduceMean axes are read from the input (opset 18) or the
attribute (older). A non-constant epsilon, or a mean over other axes, is left alone.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmcompile.ir import Graph
from mmcompile.transform import Pass, PassContext, PassResult, register_pass
from mmcompile.transform.rewrite import (Match, Pattern, RewriteRule, apply_rules, const,
                                         constant_value, make_constant, match, op, var)

_LN_OPSET = 17


def _reduce_mean(x: Pattern, name: str | None = None) -> Pattern:
    return op("ReduceMean", x, name=name, allow_extra_inputs=True)


# x - mean(x): the variance branch may reuse the numerator's or recompute it, so the callback
# checks it against this pattern (the tree patterns cannot say "the same node twice").
_CENTERED = op("Sub", var("x"), _reduce_mean(var("x"), name="mean"))


def _norm_patterns() -> list[Pattern]:
    x, c = var("x"), var("c")
    numerator = op("Sub", x, _reduce_mean(x, name="mean"), name="sub")
    squares = [op("Mul", c, c), op("Pow", c, const(value=2.0))]
    variances = [_reduce_mean(sq, name="var") for sq in squares]
    variances += [op("Reshape", v, const(), name="reshape") for v in variances]
    patterns = []
    for variance in variances:
        shifted = op("Add", variance, const("eps"))
        patterns += [
            op("Div", numerator, op("Sqrt", shifted)),
            op("Div", numerator, op("Pow", shifted, const(value=0.5))),
            op("Mul", numerator, op("Reciprocal", op("Sqrt", shifted))),
            op("Mul", numerator, op("Pow", shifted, const(value=-0.5))),
        ]
    return patterns


def _reduced_axes(node: gs.Node, rank: int) -> tuple[int, ...] | None:
    """The sorted non-negative axes a ReduceMean reduces, or None if unknown or not static."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        axes = constant_value(node.inputs[1])
        if axes is None:
            return None
        axes = axes.reshape(-1).tolist()
    else:
        axes = node.attrs.get("axes")
    if not axes:
        return None if node.attrs.get("noop_with_empty_axes", 0) else tuple(range(rank))
    return tuple(sorted(int(a) % rank for a in axes))


def _normalised_shape(m: Match) -> tuple[int, ...] | None:
    """The trailing dims the matched norm normalises over, if it is a valid LayerNormalization."""
    x = m["x"]
    if x.shape is None:
        return None
    rank = len(x.shape)
    axes = _reduced_axes(m.nodes["mean"], rank)
    if axes is None or axes != tuple(range(rank - len(axes), rank)):
        return None
    if m.nodes["mean"].attrs.get("keepdims", 1) != 1:
        return None
    if _reduced_axes(m.nodes["var"], rank) != axes:
        return None
    keep = m.nodes["var"].attrs.get("keepdims", 1)
    if "reshape" in m.nodes:  # keepdims=0, then reshaped back: must land on the mean's shape
        target, mean_shape = m.nodes["reshape"].outputs[0].shape, m.nodes["mean"].outputs[0].shape
        if target is None or target != mean_shape or not all(isinstance(d, int) for d in target):
            return None
    elif keep != 1:
        return None
    centered = m["c"]
    if centered is not m.nodes["sub"].outputs[0]:
        if len(centered.inputs) != 1:
            return None
        again = match(_CENTERED, centered.inputs[0])
        if again is None or again["x"] is not x or \
                _reduced_axes(again.nodes["mean"], rank) != axes or \
                again.nodes["mean"].attrs.get("keepdims", 1) != 1:
            return None
    shape = tuple(x.shape[rank - len(axes):])
    return shape if all(isinstance(d, int) and d > 0 for d in shape) else None


def _fuse_norm(m: Match, graph: Graph) -> list[gs.Node] | None:
    eps = m.values["eps"]
    shape = _normalised_shape(m)
    if shape is None or eps.size != 1 or not np.issubdtype(eps.dtype, np.floating):
        return None
    out_shape = m.outputs[0].shape
    if eps.ndim > len(m["x"].shape) or (out_shape is not None and out_shape != m["x"].shape):
        return None  # a constant broadcasts the result beyond x's shape
    dtype = eps.dtype
    scale = make_constant("ln_scale", np.ones(shape, dtype))
    bias = make_constant("ln_bias", np.zeros(shape, dtype))
    return [gs.Node("LayerNormalization", attrs={"axis": -len(shape), "epsilon": float(eps.item())},
                    inputs=[m["x"], scale, bias], outputs=m.outputs)]


# -- folding a constant affine tail into the node ------------------------------------------------

def _ln(scale: Pattern, bias: Pattern) -> Pattern:
    return op("LayerNormalization", var("x"), scale, bias, name="ln")


_AFFINE_PATTERNS = {
    "scale": op("Mul", _ln(const("scale", value=1.0), const("bias", value=0.0)), const("param")),
    "bias": op("Add", _ln(const("scale"), const("bias", value=0.0)), const("param")),
}


def _over_normalised_axes(value: np.ndarray, x_shape: list, axis: int) -> np.ndarray | None:
    """``value`` as a tensor of the normalised shape, if broadcasting it against the norm's
    output varies only over the normalised axes (and does not grow the output)."""
    rank = len(x_shape)
    if value.ndim > rank:
        return None
    aligned = value.reshape((1,) * (rank - value.ndim) + value.shape)
    norm_shape = tuple(x_shape[axis:])
    if any(d != 1 for d in aligned.shape[:axis]):
        return None
    if any(d not in (1, n) for d, n in zip(aligned.shape[axis:], norm_shape)):
        return None
    return np.ascontiguousarray(np.broadcast_to(aligned.reshape(aligned.shape[axis:]), norm_shape))


def _fold_affine(slot: str):
    def rewrite(m: Match, graph: Graph) -> list[gs.Node] | None:
        ln, x = m.nodes["ln"], m["x"]
        if x.shape is None:
            return None
        rank = len(x.shape)
        axis = int(ln.attrs.get("axis", -1)) % rank
        if not all(isinstance(d, int) for d in x.shape[axis:]):
            return None
        param = _over_normalised_axes(m.values["param"], x.shape, axis)
        if param is None or param.dtype != m.values["scale"].dtype:
            return None
        scale, bias = (param, m.values["bias"]) if slot == "scale" else (m.values["scale"], param)
        inputs = [x, make_constant("ln_scale", np.broadcast_to(scale, param.shape)),
                  make_constant("ln_bias", np.broadcast_to(bias, param.shape))]
        return [gs.Node("LayerNormalization", attrs=dict(ln.attrs), inputs=inputs,
                        outputs=m.outputs)]
    return rewrite


NORM_RULES = [RewriteRule("layernorm", p, _fuse_norm) for p in _norm_patterns()]
AFFINE_RULES = [RewriteRule(f"layernorm-{slot}", p, _fold_affine(slot))
                for slot, p in _AFFINE_PATTERNS.items()]


@register_pass
class FuseLayerNorm(Pass):
    name = "fuse-layernorm"
    description = "replace decomposed layer normalisation with LayerNormalization"
    opt_level = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if graph.opset < _LN_OPSET:
            return PassResult.from_stats(layernorm_fused=0, affine_folded=0)
        fused = apply_rules(graph, NORM_RULES)["layernorm"]
        # after the first set: the fused nodes' unit scale and zero bias are what rule 2 needs
        folded = apply_rules(graph, AFFINE_RULES)
        return PassResult.from_stats(layernorm_fused=fused, affine_folded=sum(folded.values()))
