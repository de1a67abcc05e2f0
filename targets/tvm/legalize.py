"""legalize-for-tvm: rewrite ops TVM's Relax ONNX importer rejects (or mis-imports) into
equivalent forms it accepts.

Measured on TVM 0.27 (transformers CLIP/BLIP/Whisper exports):

- opset-23 ``Attention``: TVM keys converters by op name only, so the standard op lands in the
  ``com.microsoft`` Attention converter and fails with ``KeyError: 'num_heads'``. Decomposed here
  into Transpose/MatMul/Mul/(Add|Where)/Softmax/MatMul, 3-D (B, L, H*E) and 4-D (B, H, L, E)
  layouts, grouped KV heads, ``scale``, ``softcap``, ``is_causal`` and float or boolean masks.
  Past key/value inputs and the extra outputs are refused with a clear error.
- ``LayerNormalization`` with its Mean / InvStdDev outputs: TVM returns scalar 0.0 placeholders
  for them, so a graph that reads them imports but computes wrong results. Unused extra
  outputs are dropped; used ones are computed explicitly (ReduceMean/Sub/Mul/Sqrt/Reciprocal).
- ``Loop`` / ``Scan``: TVM has no converter; those whose iteration counts are compile-time
  constants are unrolled (:mod:`.unroll`, which also says what it refuses).
- ``Constant`` nodes holding ``value_int(s)``/``value_float(s)``: TVM reads only ``value``
  ("no value in Constant"); rewritten to ``value``.

No library does these rewrites (onnxruntime's optimizer targets its own kernels), hence this file.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmcompile.errors import UnsupportedOpError
from mmcompile.ir import Graph
from mmcompile.transform import Pass, PassContext, PassResult, register_pass
from mmcompile.targets.tvm.unroll import unroll_loop, unroll_scan
from mmcompile.transform.rewrite import (Match, NodeBuilder, RewriteRule, apply_rules,
                                         fresh_name, has_input, make_constant, op, var)


def _to_heads(b: NodeBuilder, t: gs.Tensor, heads: int, tag: str) -> gs.Tensor:
    """(B, L, H*E) -> (B, H, L, E)."""
    batch, length, width = t.shape
    r = b("Reshape", [t, b.const(f"{tag}_shape", np.array([batch, length, heads, width // heads],
                                                           np.int64))])
    return b("Transpose", [r], {"perm": [0, 2, 1, 3]})


def _repeat_kv(b: NodeBuilder, t: gs.Tensor, batch: int, kv_heads: int, rep: int, length: int,
               width: int, tag: str) -> gs.Tensor:
    u = b("Unsqueeze", [t, b.const(f"{tag}_axes", np.array([2], np.int64))])
    e = b("Expand", [u, b.const(f"{tag}_expand",
                                np.array([batch, kv_heads, rep, length, width], np.int64))])
    return b("Reshape", [e, b.const(f"{tag}_shape",
                                    np.array([batch, kv_heads * rep, length, width], np.int64))])


def attention_refusal(node: gs.Node, graph: Graph) -> str | None:
    """Why an opset-23 ``Attention`` node cannot be decomposed for TVM, or None."""
    if has_input(node, 4) or has_input(node, 5):
        return "past key/value inputs are not supported"
    if any(o.outputs or o in graph.gs.outputs for o in node.outputs[1:]):
        return "present key/value or qk outputs are read"
    if node.attrs.get("qk_matmul_output_mode", 0) != 0:
        return "qk_matmul_output_mode != 0"
    windowed = [k for k in ("left_window_size", "right_window_size")
                if node.attrs.get(k, -1) != -1]
    if windowed or has_input(node, 6):
        return f"{', '.join(windowed or ['nonpad_kv_seqlen input'])} not supported"
    if any(t.shape is None or not all(isinstance(d, int) for d in t.shape)
           for t in node.inputs[:3]):
        return "needs static shapes (fix input shapes, e.g. --input-shape)"
    return None


def layernorm_refusal(node: gs.Node, graph: Graph) -> str | None:
    """Why a ``LayerNormalization`` node cannot be legalized for TVM, or None."""
    used = [o for o in node.outputs[1:] if o.outputs or o in graph.gs.outputs]
    if used and node.inputs[0].shape is None:
        return "Mean/InvStdDev outputs are read and the input rank is unknown"
    return None


REFUSALS = {"Attention": attention_refusal, "LayerNormalization": layernorm_refusal}


def refusal(node: gs.Node, graph: Graph) -> str | None:
    """Why this pass cannot make ``node`` importable by TVM, or None (the TVM targets'
    ``supports`` asks before placing the node on them)."""
    check = REFUSALS.get(node.op)
    return check(node, graph) if check is not None and (node.domain or "") in ("", "ai.onnx") else None


def _decompose_attention(m: Match, graph: Graph) -> list[gs.Node]:
    node = m.root
    q, k, v = m["q"], m["k"], m["v"]
    reason = attention_refusal(node, graph)
    if reason:
        raise UnsupportedOpError("Attention", node.name, "legalize-for-tvm", reason)
    dtype = np.dtype(q.dtype or np.float32)
    b = NodeBuilder(node.name, dtype)
    three_d = len(q.shape) == 3
    if three_d:
        q_heads, kv_heads = node.attrs["q_num_heads"], node.attrs["kv_num_heads"]
        q, k, v = (_to_heads(b, q, q_heads, "q"), _to_heads(b, k, kv_heads, "k"),
                   _to_heads(b, v, kv_heads, "v"))
        batch, length = m["q"].shape[:2]
        head_dim, kv_len = m["q"].shape[2] // q_heads, m["k"].shape[1]
        v_dim = m["v"].shape[2] // kv_heads
    else:
        batch, q_heads, length, head_dim = q.shape
        kv_heads, kv_len, v_dim = k.shape[1], k.shape[2], v.shape[3]
    if kv_heads != q_heads:  # grouped-query attention: repeat each KV head
        rep = q_heads // kv_heads
        k = _repeat_kv(b, k, batch, kv_heads, rep, kv_len, head_dim, "k_rep")
        v = _repeat_kv(b, v, batch, kv_heads, rep, kv_len, v_dim, "v_rep")
    scale = node.attrs.get("scale") or 1.0 / np.sqrt(head_dim)
    scores = b("MatMul", [q, b("Transpose", [k], {"perm": [0, 1, 3, 2]})])
    scores = b("Mul", [scores, b.const("scale", np.array(scale, dtype))])
    softcap = node.attrs.get("softcap", 0.0)
    if softcap and softcap > 0:
        capped = b("Tanh", [b("Div", [scores, b.const("softcap", np.array(softcap, dtype))])])
        scores = b("Mul", [capped, b.const("softcap_mul", np.array(softcap, dtype))])
    # A finite minimum rather than -inf: a fully masked row then averages instead of giving NaN.
    lowest = b.const("masked", np.array(np.finfo(dtype).min, dtype))
    if node.attrs.get("is_causal", 0):
        # Without a KV cache ONNX aligns the causal mask top-left (query i sees keys <= i).
        causal = np.tril(np.ones((length, kv_len), bool), k=0)
        scores = b("Where", [b.const("causal", causal), scores, lowest])
    if has_input(node, 3):
        mask = node.inputs[3]
        scores = b("Where", [mask, scores, lowest]) if mask.dtype == np.bool_ \
            else b("Add", [scores, mask])
    probs = b("Softmax", [scores], {"axis": -1})
    out = node.outputs[0]
    if three_d:
        heads = b("MatMul", [probs, v])
        merged = b("Transpose", [heads], {"perm": [0, 2, 1, 3]})
        b("Reshape", [merged, b.const("out_shape", np.array([batch, length, q_heads * v_dim],
                                                            np.int64))], out=out)
    else:
        b("MatMul", [probs, v], out=out)
    return b.nodes


def _legalize_layernorm(m: Match, graph: Graph) -> list[gs.Node] | None:
    node = m.root
    if len(node.outputs) < 2:
        return None
    outs = node.outputs
    used = [o for o in outs[1:] if o.outputs or o in graph.gs.outputs]
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


_RULES = (
    RewriteRule("attention", op("Attention", var("q"), var("k"), var("v"),
                                allow_extra_inputs=True), _decompose_attention),
    RewriteRule("layernorm_outputs", op("LayerNormalization", var("x"), var("scale"),
                                        allow_extra_inputs=True), _legalize_layernorm),
    RewriteRule("constant_attr", op("Constant"), _constant_to_value),
    RewriteRule("loop", op("Loop", allow_extra_inputs=True), unroll_loop),
    RewriteRule("scan", op("Scan", allow_extra_inputs=True), unroll_scan),
)


@register_pass
class LegalizeForTVM(Pass):
    name = "legalize-for-tvm"
    description = ("rewrite ops TVM's ONNX importer rejects (opset-23 Attention, LayerNorm extra "
                   "outputs, Loop / Scan with constant iteration counts)")
    opt_level = 0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        counts = apply_rules(graph, _RULES)
        return PassResult.from_stats(attention_decomposed=counts["attention"],
                                     layernorm_legalized=counts["layernorm_outputs"],
                                     constants_rewritten=counts["constant_attr"],
                                     loops_unrolled=counts["loop"] + counts["scan"])
