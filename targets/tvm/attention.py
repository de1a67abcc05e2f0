"""The opset-23/24 ``Attention`` op as plain ONNX ops TVM's importer takes (used by
legalize-for-tvm).

TVM keys its ONNX converters by op name only, so the standard op lands in the
``com.microsoft`` Attention converter and fails (``KeyError: 'num_heads'``). The decomposition
follows onnx's reference implementation (``onnx/reference/ops/op_attention.py``), which the
node tests' expected outputs come from:

- 3-D (B, L, H*E) inputs are split into heads and merged back; grouped KV heads are repeated
  head by head (h0, h0, h1, h1, ...); Q and K are each scaled by sqrt(scale) before their
  MatMul, as the reference and the op's function body do (it matters in float16).
- ``past_key`` / ``past_value`` are concatenated in front of K / V along the sequence axis;
  the results are the ``present_key`` / ``present_value`` outputs (before the KV repeat).
- Masks combine: a boolean or additive ``attn_mask`` (padded on the key axis to the full KV
  length with False / -inf), ``is_causal`` and the sliding window (``left_window_size`` /
  ``right_window_size``), both aligned bottom-right by the number of keys before the query
  block: ``past_key``'s length, or per batch ``nonpad_kv_seqlen[b] - q_len`` for an external
  cache, whose padding keys (``j >= nonpad_kv_seqlen[b]``) are masked too.
- A query row with no key left to attend gives zeros (``Y`` and mode-3 probabilities), decided
  on the mask, not on the scores. Masked scores are replaced by the dtype's lowest finite value
  rather than -inf, so a softmax never computes ``-inf - -inf``.
- ``softcap`` before the mask; ``softmax_precision`` casts the softmax's input and back;
  ``qk_matmul_output_mode`` 0 and 1 give the (softcapped) scaled scores, 2 the scores with the
  mask added (-inf where masked), 3 the probabilities.

Shapes must be static (the masks are built at compile time where they can be).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from mmcompile.errors import UnsupportedOpError
from mmcompile.ir import Graph
from mmcompile.transform.rewrite import Match, NodeBuilder, has_input, has_static_shape, is_read

_MASK, _PAST_KEY, _PAST_VALUE, _NONPAD = 3, 4, 5, 6


def refusal(node: gs.Node, graph: Graph) -> str | None:
    """Why an ``Attention`` node cannot be decomposed for TVM, or None."""
    if has_input(node, _PAST_KEY) != has_input(node, _PAST_VALUE):
        return "past_key and past_value must be given together"
    if has_input(node, _PAST_KEY) and has_input(node, _NONPAD):
        return "nonpad_kv_seqlen cannot be combined with past key/value inputs"
    dtype = node.inputs[0].dtype
    if dtype is not None and not isinstance(dtype, type) and not isinstance(dtype, np.dtype):
        return f"element type {dtype} is not supported"  # bfloat16 and the like (onnx enums)
    if node.attrs.get("qk_matmul_output_mode", 0) not in (0, 1, 2, 3):
        return f"qk_matmul_output_mode={node.attrs['qk_matmul_output_mode']} is not defined"
    given = [t for i, t in enumerate(node.inputs) if has_input(node, i)]
    if not all(has_static_shape(t) for t in given):
        return "needs static shapes (fix input shapes, e.g. --input-shape)"
    return None


def _to_heads(b: NodeBuilder, t: gs.Tensor, heads: int, tag: str) -> gs.Tensor:
    """(B, L, H*E) -> (B, H, L, E)."""
    batch, length, width = t.shape
    r = b("Reshape", [t, b.const(f"{tag}_shape", np.array([batch, length, heads, width // heads],
                                                           np.int64))])
    return b("Transpose", [r], {"perm": [0, 2, 1, 3]})


def _repeat_kv(b: NodeBuilder, t: gs.Tensor, shape: tuple[int, ...], rep: int,
               tag: str) -> gs.Tensor:
    batch, kv_heads, length, width = shape
    u = b("Unsqueeze", [t, b.const(f"{tag}_axes", np.array([2], np.int64))])
    e = b("Expand", [u, b.const(f"{tag}_expand",
                                np.array([batch, kv_heads, rep, length, width], np.int64))])
    return b("Reshape", [e, b.const(f"{tag}_shape",
                                    np.array([batch, kv_heads * rep, length, width], np.int64))])


class _Mask:
    """The keys each query may attend: a compile-time (q, kv) part and runtime parts (boolean
    tensors broadcasting to (B, H, q, kv)), plus an additive float mask."""

    def __init__(self, b: NodeBuilder, q_len: int, kv_len: int):
        self.b, self.q_len, self.kv_len = b, q_len, kv_len
        self.fixed = np.ones((q_len, kv_len), bool)
        self.runtime: list[gs.Tensor] = []
        self.additive: gs.Tensor | None = None

    def frontier(self, causal: bool, left: int, right: int, offset: int | gs.Tensor) -> None:
        """Causal and sliding-window limits for the query at block index i, at absolute position
        ``p = offset + i``: key j is allowed iff ``j <= p`` (causal), ``p - j <= left`` and
        ``j - p <= right``. ``offset`` is a number of past keys, or a tensor of shape
        (B, 1, 1, 1) holding ``nonpad_kv_seqlen``, the block then ending at each batch's last
        key (``offset[b] = nonpad[b] - q_len``)."""
        i = np.arange(self.q_len)[:, None]
        j = np.arange(self.kv_len)[None, :]
        if isinstance(offset, int):
            diff = i + offset - j
            self.fixed &= (diff >= 0) if causal else True
            self.fixed &= (diff <= left) if left >= 0 else True
            self.fixed &= (-diff <= right) if right >= 0 else True
            return
        b = self.b
        # p - j = nonpad[b] - (j - i + q_len)
        shifted = b.const("key_minus_query", (j - i + self.q_len).astype(np.int64))
        if causal:
            self.runtime.append(b("LessOrEqual", [shifted, offset], dtype=np.bool_))
        if left >= 0 or right >= 0:
            diff = b("Sub", [offset, shifted], dtype=np.int64)
            if left >= 0:
                self.runtime.append(b("LessOrEqual", [diff, b.const("left", np.int64(left))],
                                      dtype=np.bool_))
            if right >= 0:
                self.runtime.append(b("GreaterOrEqual",
                                      [diff, b.const("right", np.int64(-right))], dtype=np.bool_))

    def padding(self, nonpad: gs.Tensor) -> None:
        """Keys at or past ``nonpad[b]`` are padding."""
        keys = self.b.const("keys", np.arange(self.kv_len, dtype=np.int64))
        self.runtime.append(self.b("Less", [keys, nonpad], dtype=np.bool_))

    def user(self, mask: gs.Tensor) -> None:
        """``attn_mask``: boolean (True attends) or additive, padded to the KV length."""
        b, boolean = self.b, mask.dtype == np.bool_
        pad = self.kv_len - mask.shape[-1]
        if pad > 0:
            fill = np.full((*mask.shape[:-1], pad), False if boolean else -np.inf,
                           dtype=np.bool_ if boolean else b.dtype)
            mask = b("Concat", [mask, b.const("mask_pad", fill)], {"axis": -1},
                     dtype=np.bool_ if boolean else None)
        if boolean:
            self.runtime.append(mask)
        else:
            self.additive = mask

    def allowed(self) -> gs.Tensor | None:
        """One boolean tensor of the allowed keys, or None when every key is allowed."""
        parts = list(self.runtime)
        if not self.fixed.all():
            parts.append(self.b.const("allowed", self.fixed))
        if not parts:
            return None
        out = parts[0]
        for part in parts[1:]:
            out = self.b("And", [out, part], dtype=np.bool_)
        return out

    def dead_rows(self, allowed: gs.Tensor | None, opset: int) -> gs.Tensor | None:
        """Rows with no key left (True), shape (..., q, 1), or None when there can be none."""
        b = self.b
        if not self.runtime and self.additive is None:
            dead = ~self.fixed.any(axis=1, keepdims=True)
            return b.const("dead_rows", dead) if dead.any() else None
        # On booleans, not on a max of the bias: TVM's max reduction starts from the lowest
        # finite value, so a row of -inf reduces to that, not to -inf.
        live = allowed
        if self.additive is not None:
            finite = b("Not", [b("Equal", [self.additive, b.const("minus_inf", np.array(
                -np.inf, b.dtype))], dtype=np.bool_)], dtype=np.bool_)
            live = finite if live is None else b("And", [live, finite], dtype=np.bool_)
        live = b("Cast", [live], {"to": onnx.TensorProto.FLOAT}, dtype=np.float32)
        if opset >= 18:
            row = b("ReduceMax", [live, b.const("last", np.array([-1], np.int64))],
                    {"keepdims": 1}, dtype=np.float32)
        else:
            row = b("ReduceMax", [live], {"axes": [-1], "keepdims": 1}, dtype=np.float32)
        return b("Less", [row, b.const("half", np.float32(0.5))], dtype=np.bool_)


def decompose(m: Match, graph: Graph) -> list[gs.Node]:
    """The replacement nodes for the ``Attention`` node ``m.root`` (see the module docstring).

    Raises:
        UnsupportedOpError: the node cannot be decomposed (:func:`refusal` says why).
    """
    node = m.root
    reason = refusal(node, graph)
    if reason:
        raise UnsupportedOpError("Attention", node.name, "legalize-for-tvm", reason)
    q, k, v = m["q"], m["k"], m["v"]
    dtype = np.dtype(q.dtype or np.float32)
    b = NodeBuilder(node.name, dtype)
    three_d = len(q.shape) == 3
    if three_d:
        q_heads, kv_heads = node.attrs["q_num_heads"], node.attrs["kv_num_heads"]
        batch, q_len = q.shape[:2]
        head_dim, v_dim = q.shape[2] // q_heads, v.shape[2] // kv_heads
        q, k, v = (_to_heads(b, q, q_heads, "q"), _to_heads(b, k, kv_heads, "k"),
                   _to_heads(b, v, kv_heads, "v"))
    else:
        batch, q_heads, q_len, head_dim = q.shape
        kv_heads, v_dim = k.shape[1], v.shape[3]
    past = 0
    if has_input(node, _PAST_KEY):
        past = node.inputs[_PAST_KEY].shape[2]
        k = b("Concat", [node.inputs[_PAST_KEY], k], {"axis": 2})
        v = b("Concat", [node.inputs[_PAST_VALUE], v], {"axis": 2})
    kv_len = m["k"].shape[-2 if not three_d else 1] + past
    outs = list(node.outputs) + [gs.Variable("")] * (4 - len(node.outputs))
    for present, t in ((outs[1], k), (outs[2], v)):
        if is_read(graph, present):
            b("Identity", [t], out=present)
    if kv_heads != q_heads:  # grouped-query attention
        rep = q_heads // kv_heads
        k = _repeat_kv(b, k, (batch, kv_heads, kv_len, head_dim), rep, "k_rep")
        v = _repeat_kv(b, v, (batch, kv_heads, kv_len, v_dim), rep, "v_rep")

    scale = node.attrs.get("scale") or 1.0 / np.sqrt(head_dim)
    root = b.const("sqrt_scale", np.array(np.sqrt(scale), dtype))
    q = b("Mul", [q, root])
    k_t = b("Transpose", [b("Mul", [k, root])], {"perm": [0, 1, 3, 2]})
    scores = b("MatMul", [q, k_t])
    softcap = node.attrs.get("softcap", 0.0)
    if softcap and softcap > 0:
        capped = b("Tanh", [b("Div", [scores, b.const("softcap", np.array(softcap, dtype))])])
        scores = b("Mul", [capped, b.const("softcap_mul", np.array(softcap, dtype))])
    qk_raw = scores

    mask = _Mask(b, q_len, kv_len)
    left, right = node.attrs.get("left_window_size", -1), node.attrs.get("right_window_size", -1)
    causal = bool(node.attrs.get("is_causal", 0))
    if has_input(node, _NONPAD):
        nonpad = b("Reshape", [node.inputs[_NONPAD], b.const("per_batch",
                                                             np.array([-1, 1, 1, 1], np.int64))],
                   dtype=np.int64)
        mask.frontier(causal, left, right, nonpad)
        mask.padding(nonpad)
    else:
        mask.frontier(causal, left, right, past)
    if has_input(node, _MASK):
        mask.user(node.inputs[_MASK])
    if mask.additive is not None:
        scores = b("Add", [scores, mask.additive])
    allowed = mask.allowed()
    masked_scores = scores
    if allowed is not None:
        lowest = b.const("lowest", np.array(np.finfo(dtype).min, dtype))
        masked_scores = b("Where", [allowed, scores, lowest])

    precision = node.attrs.get("softmax_precision")
    wide = onnx.helper.tensor_dtype_to_np_dtype(precision) if precision else dtype
    if wide != dtype:
        masked_scores = b("Cast", [masked_scores], {"to": precision}, dtype=wide.type)
    probs = b("Softmax", [masked_scores], {"axis": -1}, dtype=wide.type)
    dead = mask.dead_rows(allowed, graph.opset)
    if dead is not None:
        probs = b("Where", [dead, b.const("zeros", np.zeros((), wide)), probs], dtype=wide.type)
    if wide != dtype:
        probs = b("Cast", [probs], {"to": onnx.helper.np_dtype_to_tensor_dtype(dtype)})

    mode = node.attrs.get("qk_matmul_output_mode", 0)
    if is_read(graph, outs[3]):
        if mode == 3:
            b("Identity", [probs], out=outs[3])
        elif mode == 2:
            with_mask = scores if allowed is None else b(
                "Where", [allowed, scores, b.const("minus_inf", np.array(-np.inf, dtype))])
            b("Identity", [with_mask], out=outs[3])
        else:
            b("Identity", [qk_raw], out=outs[3])
    y = outs[0]
    if three_d:
        merged = b("Transpose", [b("MatMul", [probs, v])], {"perm": [0, 2, 1, 3]})
        b("Reshape", [merged, b.const("out_shape", np.array([batch, q_len, q_heads * v_dim],
                                                            np.int64))], out=y)
    else:
        b("MatMul", [probs, v], out=y)
    return b.nodes
