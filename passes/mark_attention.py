"""mark-attention: find scaled-dot-product attention chains and record each as a unit.

The graph is not rewritten. Each chain ``MatMul(softmax(scale * Q @ K^T [+ mask]), V)`` becomes
one entry of ``graph.annotations["attention_units"]``::

    {"name": "attention_0", "nodes": [...],            # the chain's nodes, in graph order
     "q": ..., "k": ..., "v": ..., "output": ...,      # tensor names
     "k_transposed": False,                             # True: "k" already holds K^T
     "scale": 0.125, "mask": None, "num_heads": 8}      # num_heads from a rank-4 Q [B,H,S,D]

What torch 2.13's dynamo exporter (opset 18) emits for ``F.scaled_dot_product_attention`` (and
so for ``nn.MultiheadAttention`` and transformers' CLIP attention)::

    kt = Reshape(Transpose(Reshape(k, [-1, S, D]), [0, 2, 1]), [B, H, D, S])
    s  = MatMul(Mul(q, sqrt(scale)), Mul(kt, sqrt(scale)))     # the scale split over Q and K
    p  = Softmax(Add(s, mask), axis=-1)                         # Add only with a mask
    p  = Where(IsNaN(p), 0, p)                                  # only with a mask
    out = MatMul(p, v)

The patterns also take a plain ``Transpose`` of K (or none: K given transposed), the scale on Q,
K or the scores as ``Mul`` or ``Div`` by a scalar constant, and no scale at all. Every variant is
one tree pattern (built as a product of the optional pieces, most specific first); the first
that matches a ``MatMul`` wins. A chain whose intermediate tensors are used outside it (say,
attention weights returned as an output) is not a unit: it could not be replaced as one.

``changed`` is True only when the recorded list differs from what was there before, so a
second run reports no change.
"""

from __future__ import annotations

import itertools
import math

import onnx_graphsurgeon as gs

from mmcompile.ir import Graph
from mmcompile.transform import Pass, PassContext, PassResult, register_pass
from mmcompile.transform.rewrite import Match, Pattern, const, match, op, var

ANNOTATION = "attention_units"


def _last_two_swapped(node: gs.Node) -> bool:
    perm = list(node.attrs.get("perm", []))
    n = len(perm)
    return n >= 2 and perm == list(range(n - 2)) + [n - 1, n - 2]


def _batch_only_reshape(node: gs.Node) -> bool:
    """A Reshape that only merges or splits leading dims (keeps the last two, statically)."""
    before, after = node.inputs[0].shape, node.outputs[0].shape
    if before is None or after is None or len(before) < 2 or len(after) < 2:
        return False
    last = list(before[-2:])
    return last == list(after[-2:]) and all(isinstance(d, int) and d > 0 for d in last)


def _softmax_over_last(node: gs.Node) -> bool:
    shape = node.outputs[0].shape
    axis = int(node.attrs.get("axis", -1))
    return axis == -1 or (shape is not None and axis == len(shape) - 1)


def _k_transposed() -> list[Pattern]:
    """K^T from K: a transpose of the last two axes, with batch-only reshapes around it."""
    k = var("k")
    out = []
    for pre, post in itertools.product((True, False), repeat=2):
        p = op("Reshape", k, const(), where=_batch_only_reshape) if pre else k
        p = op("Transpose", p, where=_last_two_swapped)
        out.append(op("Reshape", p, const(), where=_batch_only_reshape) if post else p)
    return out


def _scaled(p: Pattern, role: str) -> list[Pattern]:
    """``p``, ``p * c`` or ``p / c``; the constant is captured as ``<role>_mul``/``<role>_div``."""
    return [op("Mul", p, const(f"{role}_mul")), op("Div", p, const(f"{role}_div")), p]


def _size(p: Pattern) -> int:
    """Number of op nodes in a pattern: more specific patterns are tried first."""
    return int(hasattr(p, "op_type")) + sum(_size(i) for i in getattr(p, "inputs", ()))


def _patterns() -> list[Pattern]:
    out = []
    k_sides = [s for kt in _k_transposed() for s in _scaled(kt, "k")] + _scaled(var("kt"), "k")
    for q_side, k_side in itertools.product(_scaled(var("q"), "q"), k_sides):
        for scores in _scaled(op("MatMul", q_side, k_side, name="qk"), "s"):
            for masked in (op("Add", scores, var("mask")), scores):
                probs = op("Softmax", masked, where=_softmax_over_last, name="softmax")
                # SDPA with a mask guards fully-masked rows: Where(IsNaN(p), 0, p)
                guarded = op("Where", op("IsNaN", var("p")), const(value=0.0), probs)
                for p in (guarded, probs):
                    out.append(op("MatMul", p, var("v")))
    return sorted(out, key=_size, reverse=True)


PATTERNS = _patterns()
# The patterns by what produces the probabilities the root MatMul reads (Softmax, or the Where
# of a guarded one): most MatMuls (projections, MLPs) are produced by neither and try none of
# the 540 patterns (CLIP b8: 17,792 tries, 0.4 s of its compile).
_BY_PROBS = {kind: [p for p in PATTERNS if p.inputs[0].op_type == kind]
             for kind in {p.inputs[0].op_type for p in PATTERNS}}


def _scale(m: Match) -> float | None:
    """The product of the matched scale constants (scalars only), or None."""
    scale = 1.0
    for key, value in m.values.items():
        if not key.endswith(("_mul", "_div")):
            continue
        if value.size != 1:
            return None
        factor = float(value.reshape(-1)[0])
        if key.endswith("_div"):
            if factor == 0.0:
                return None
            factor = 1.0 / factor
        scale *= factor
    return scale if math.isfinite(scale) else None


def _unit(m: Match, position: dict[int, int], opset: int) -> dict | None:
    """The annotation for a match, or None if the match is not an attention chain after all."""
    softmax = m.nodes["softmax"]
    if "p" in m.tensors and m["p"] is not softmax.outputs[0]:
        return None
    if opset < 13 and "axis" not in softmax.attrs:  # the default axis was 1 before opset 13
        return None
    scale = _scale(m)
    if scale is None:
        return None
    q = m["q"]
    k = m.tensors.get("k", m.tensors.get("kt"))
    num_heads = None
    if q.shape is not None and len(q.shape) == 4 and isinstance(q.shape[1], int):
        num_heads = int(q.shape[1])
    nodes = sorted(m.matched, key=lambda n: position[id(n)])
    return {
        "nodes": [n.name for n in nodes],
        "q": q.name, "k": k.name, "v": m["v"].name, "output": m.root.outputs[0].name,
        "k_transposed": "k" not in m.tensors,
        "scale": scale,
        "mask": m["mask"].name if "mask" in m.tensors else None,
        "num_heads": num_heads,
    }


def find_attention_units(graph: Graph) -> list[dict]:
    """The attention chains in ``graph``, in graph order, named ``attention_0``, ...

    Returns:
        A list of unit dicts (the annotation format described in the module docstring).
    """
    position = {id(n): i for i, n in enumerate(graph.gs.nodes)}
    units = []
    for node in graph.gs.nodes:
        if node.op != "MatMul" or node.domain not in (None, "", "ai.onnx"):
            continue
        producers = node.inputs[0].inputs if node.inputs else []
        for pattern in _BY_PROBS.get(producers[0].op, []) if producers else []:
            m = match(pattern, node, graph)
            unit = _unit(m, position, graph.opset) if m is not None else None
            if unit is not None:
                units.append({"name": f"attention_{len(units)}", **unit})
                break
    return units


@register_pass
class MarkAttention(Pass):
    name = "mark-attention"
    description = "record scaled-dot-product attention chains in graph.annotations"
    opt_level = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        units = find_attention_units(graph)
        before = graph.annotations.get(ANNOTATION, [])
        if units:
            graph.annotations[ANNOTATION] = units
        else:
            graph.annotations.pop(ANNOTATION, None)
        # Nothing in the graph changes: "changed" means the recorded units did.
        return PassResult(changed=units != before, stats={"attention_units": len(units)})
