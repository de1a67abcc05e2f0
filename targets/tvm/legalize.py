"""legalize-for-tvm: rewrite ops TVM's Relax ONNX importer rejects (or mis-imports) into
equivalent forms it accepts.

Measured on TVM 0.27 (transformers CLIP/BLIP/Whisper exports):

- opset-23 ``Attention``: TVM keys converters by op name only, so the standard op lands in the
  ``com.microsoft`` Attention converter and fails with ``KeyError: 'num_heads'``. Decomposed
  into plain ops (:mod:`.attention`: every input, output and attribute of the op).
- ``LayerNormalization`` with its Mean / InvStdDev outputs: TVM returns scalar 0.0 placeholders
  for them, so a graph that reads them imports but computes wrong results. Unused extra
  outputs are dropped; used ones are computed explicitly (ReduceMean/Sub/Mul/Sqrt/Reciprocal).
- ``Loop`` / ``Scan``: TVM has no converter; those whose iteration counts are compile-time
  constants are unrolled (:mod:`.unroll`, which also says what it refuses).
- float16 ops that accumulate (MatMul, Conv, Softmax, reductions, ...): TVM accumulates in
  float16; computed in float32 between Casts (:mod:`.float16`).
- ``Resize`` with ``axes`` or ``keep_aspect_ratio_policy`` (ignored by TVM's importer), and
  those TVM computes differently from ONNX (scales that are not the ratio of the sizes,
  antialias, ...): :mod:`.resize`.
- ``ReduceMax`` / ``ReduceMin`` over an empty axis: TVM returns the lowest / highest finite
  value, ONNX -inf / +inf; the (constant) result is written out.
- ``Constant`` nodes holding ``value_int(s)``/``value_float(s)``: TVM reads only ``value``
  ("no value in Constant"); rewritten to ``value``.
- ``GatherND`` of one element per row, its indices built as ``[arange(n), idx]`` (torch's
  ``x[torch.arange(n), idx]``, CLIP's end-of-text pooling): with ``n`` symbolic TVM's ``Range``
  has no output shape and the converter fails (``'NoneType' object is not subscriptable``;
  CLIP compiled with ``dynamic={"batch": ...}``). Rewritten to ``GatherND(x, idx[:, None],
  batch_dims=1)``, the same elements.

No library does these rewrites (onnxruntime's optimizer targets its own kernels), hence this file.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmcompile.errors import UnsupportedOpError
from mmcompile.ir import Graph
from mmcompile.transform import Pass, PassContext, PassResult, register_pass
from mmcompile.targets.tvm import attention, float16, resize
from mmcompile.targets.tvm.unroll import unroll_loop, unroll_scan
from mmcompile.transform.rewrite import (Match, NodeBuilder, RewriteRule, apply_rules,
                                         axes_of, const, fresh_name, has_input,
                                         has_static_shape, is_read, make_constant, op, var)


def layernorm_refusal(node: gs.Node, graph: Graph) -> str | None:
    """Why a ``LayerNormalization`` node cannot be legalized for TVM, or None."""
    used = [o for o in node.outputs[1:] if is_read(graph, o)]
    if used and node.inputs[0].shape is None:
        return "Mean/InvStdDev outputs are read and the input rank is unknown"
    return None


REFUSALS = {"Attention": attention.refusal, "LayerNormalization": layernorm_refusal}


def refusal(node: gs.Node, graph: Graph) -> str | None:
    """Why this pass cannot make ``node`` importable by TVM, or None (the TVM targets'
    ``supports`` asks before placing the node on them)."""
    check = REFUSALS.get(node.op)
    if check is None or (node.domain or "") not in ("", "ai.onnx"):
        return None
    return check(node, graph)


def _legalize_layernorm(m: Match, graph: Graph) -> list[gs.Node] | None:
    node = m.root
    if len(node.outputs) < 2:
        return None
    outs = node.outputs
    used = [o for o in outs[1:] if is_read(graph, o)]
    if not used:  # same op, first output only
        return [gs.Node("LayerNormalization", name=fresh_name(node.name), inputs=list(node.inputs),
                        outputs=[outs[0]], attrs=dict(node.attrs))]
    x, scale = node.inputs[0], node.inputs[1]
    reason = layernorm_refusal(node, graph)
    if reason:
        raise UnsupportedOpError("LayerNormalization", node.name, "legalize-for-tvm", reason)
    rank = len(x.shape)
    axes = np.arange(int(node.attrs.get("axis", -1)) % rank, rank, dtype=np.int64)
    b = NodeBuilder(node.name, np.dtype(x.dtype or np.float32))
    def reduce_mean(t: gs.Tensor, out: gs.Tensor | None = None) -> gs.Tensor:
        if graph.opset >= 18:  # axes became an input in opset 18
            return b("ReduceMean", [t, b.const("axes", axes)], {"keepdims": 1}, out=out)
        return b("ReduceMean", [t], {"axes": [int(a) for a in axes], "keepdims": 1}, out=out)

    mean = reduce_mean(x, outs[1])
    centered = b("Sub", [x, mean])
    var_ = reduce_mean(b("Mul", [centered, centered]))
    eps = b.const("eps", np.array(node.attrs.get("epsilon", 1e-5), b.dtype))
    inv_std = b("Reciprocal", [b("Sqrt", [b("Add", [var_, eps])])],
                out=outs[2] if len(outs) > 2 else None)
    y = b("Mul", [b("Mul", [centered, inv_std]), scale])
    if has_input(node, 2):
        b("Add", [y, node.inputs[2]], out=outs[0])
    else:
        b("Identity", [y], out=outs[0])
    return b.nodes


def _identity_element(op_type: str, dtype: np.dtype):
    if dtype.kind == "b":
        return op_type == "ReduceMin"  # all() of nothing is True, any() False
    if dtype.kind == "f":
        return np.inf if op_type == "ReduceMin" else -np.inf
    return np.iinfo(dtype).max if op_type == "ReduceMin" else np.iinfo(dtype).min


def _empty_reduction(m: Match, graph: Graph) -> list[gs.Node] | None:
    """ReduceMax / ReduceMin over an axis of length 0 -> a constant of -inf / +inf (the lowest
    / highest integer, False / True); TVM starts its reductions from the lowest / highest
    finite value and returns that."""
    node = m.root
    x = node.inputs[0]
    if not has_static_shape(x) or x.dtype is None:
        return None
    rank = len(x.shape)
    if has_input(node, 1):
        if not isinstance(node.inputs[1], gs.Constant):
            return None
        axes = [int(a) for a in np.asarray(node.inputs[1].values).ravel()]
    else:
        axes = list(node.attrs.get("axes", []))
    if not axes:
        axes = [] if node.attrs.get("noop_with_empty_axes", 0) else list(range(rank))
    axes = [a % rank for a in axes]
    if not any(x.shape[a] == 0 for a in axes):
        return None
    keep = node.attrs.get("keepdims", 1)
    shape = [1 if a in axes else d for a, d in enumerate(x.shape) if keep or a not in axes]
    dtype = np.dtype(x.dtype)
    value = np.full(shape, _identity_element(node.op, dtype), dtype)
    return [gs.Node("Identity", name=fresh_name(node.name), outputs=m.outputs,
                    inputs=[make_constant(f"{node.name}/empty", value)])]


_CONSTANT_ATTRS = {"value_int": np.int64, "value_ints": np.int64,
                   "value_float": np.float32, "value_floats": np.float32}


def _constant_to_value(m: Match, graph: Graph) -> list[gs.Node] | None:
    attrs = m.root.attrs
    key = next((k for k in _CONSTANT_ATTRS if k in attrs), None)
    if key is None:
        return None
    value = np.array(attrs[key], dtype=_CONSTANT_ATTRS[key])
    return [gs.Node("Constant", name=fresh_name(m.root.name), outputs=m.outputs,
                    attrs={"value": make_constant("value", value)})]


def _row_gather(m: Match, graph: Graph) -> list[gs.Node] | None:
    """``GatherND(x, Concat([Unsqueeze(Range(0, n, 1)), Unsqueeze(idx)], -1))`` with ``n`` the
    first dim of ``x`` -> ``GatherND(x, Unsqueeze(idx), batch_dims=1)``."""
    x, idx = m["x"], m["idx"]
    if (m.root.attrs.get("batch_dims", 0) != 0 or m.nodes["concat"].attrs.get("axis") not in (-1, 1)
            or m.values["start"].size != 1 or int(m.values["start"].ravel()[0]) != 0
            or m.values["delta"].size != 1 or int(m.values["delta"].ravel()[0]) != 1):
        return None
    for key in ("rows", "cols"):  # each a column [n, 1]
        axes = axes_of(m.nodes[key])
        if axes is None or axes.ravel().tolist() not in ([-1], [1]):
            return None
    # one index per row of x: Concat makes n the length of idx, which must be x's first dim
    # (equal symbols are equal sizes, as ONNX's shape inference has it)
    if (x.shape is None or not x.shape or idx.shape is None or len(idx.shape) != 1
            or idx.shape[0] in (None, "") or idx.shape[0] != x.shape[0]):
        return None
    b = NodeBuilder(m.root.name, np.dtype(idx.dtype) if idx.dtype is not None else None)
    column = b("Unsqueeze", [idx, b.const("axes", np.array([-1], np.int64))])
    b("GatherND", [x, column], {"batch_dims": 1}, out=m.outputs[0])
    return b.nodes


_ROW_GATHER = op("GatherND", var("x"), op(
    "Concat",
    op("Unsqueeze", op("Range", const("start"), var(), const("delta"), name="range"),
       allow_extra_inputs=True, name="rows"),
    op("Unsqueeze", var("idx"), allow_extra_inputs=True, name="cols"), name="concat"))


_RULES = (
    RewriteRule("attention", op("Attention", var("q"), var("k"), var("v"),
                                allow_extra_inputs=True), attention.decompose),
    RewriteRule("layernorm_outputs", op("LayerNormalization", var("x"), var("scale"),
                                        allow_extra_inputs=True), _legalize_layernorm),
    RewriteRule("constant_attr", op("Constant"), _constant_to_value),
    RewriteRule("empty_max", op("ReduceMax", allow_extra_inputs=True), _empty_reduction),
    RewriteRule("empty_min", op("ReduceMin", allow_extra_inputs=True), _empty_reduction),
    RewriteRule("resize", op("Resize", allow_extra_inputs=True), resize.legalize),
    RewriteRule("loop", op("Loop", allow_extra_inputs=True), unroll_loop),
    RewriteRule("scan", op("Scan", allow_extra_inputs=True), unroll_scan),
    RewriteRule("row_gather", _ROW_GATHER, _row_gather),
)


@register_pass
class LegalizeForTVM(Pass):
    name = "legalize-for-tvm"
    description = ("rewrite ops TVM's ONNX importer rejects (opset-23 Attention, LayerNorm extra "
                   "outputs, Loop / Scan with constant iteration counts, float16 accumulation)")
    opt_level = 0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        counts = apply_rules(graph, _RULES)
        # after the rules above: the Attention decomposition makes float16 MatMuls and Softmax
        counts += apply_rules(graph, float16.RULES)
        return PassResult.from_stats(attention_decomposed=counts["attention"],
                                     layernorm_legalized=counts["layernorm_outputs"],
                                     constants_rewritten=counts["constant_attr"],
                                     resizes_legalized=counts["resize"],
                                     empty_reductions=counts["empty_max"] + counts["empty_min"],
                                     loops_unrolled=counts["loop"] + counts["scan"],
                                     row_gathers=counts["row_gather"],
                                     float16_widened=sum(n for rule, n in counts.items()
                                                         if rule.startswith("float16_")))
