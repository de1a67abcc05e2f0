"""fold-scale-bias: fold a constant per-channel Mul/Add after a Conv, Gemm or MatMul into it.

``Mul(producer(x), c)`` with a constant ``c`` that varies only along the producer's
output-channel axis (Conv: axis 1, so ``c`` is ``[C,1,1]``, ``[1,C,1,1]`` or a scalar;
Gemm/MatMul: the last axis, so ``[N]``, ``[1,N]`` or a scalar) scales the weight's output
channels; ``Add(producer(x), c)`` of such a constant goes into the Conv bias or the Gemm's C.
``Div`` by a constant folds as a Mul by its reciprocal (declined when ``c`` has a zero) and
``Sub`` of a constant as an Add of its negation.

The constant must not broadcast the output to a larger shape, and the producer's output must
feed only that Mul/Add. MatMul + Add is left to fuse-gemm, which turns it into a Gemm. Runs after
fuse-conv-bn and shares its channel helpers; chains (Conv -> Mul -> Add) fold in one run.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmcompile.ir import Graph
from mmcompile.passes._channel_affine import (PRODUCERS, fold_channel_affine, output_channels,
                                           output_rank, producer_pattern)
from mmcompile.transform import Pass, PassContext, PassResult, register_pass
from mmcompile.transform.rewrite import Match, RewriteRule, apply_rules, const, op

SCALE_OPS = ("Mul", "Div")
BIAS_OPS = ("Add", "Sub")


def channel_vector(value: np.ndarray, rank: int, axis: int, channels: int) -> np.ndarray | None:
    """``value`` as a float64 vector of length ``channels``, if broadcasting it against a
    rank-``rank`` tensor varies it only along ``axis`` and leaves that tensor's shape unchanged;
    otherwise None."""
    if value.ndim > rank or value.size == 0:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,))


def _fold(m: Match, graph: Graph) -> list[gs.Node] | None:
    root, producer, weight = m.root, m.nodes["producer"], m.values["w"]
    channels = output_channels(producer, weight)
    rank = output_rank(producer, weight)
    if channels is None or rank is None:
        return None
    axis = 1 if producer.op in ("Conv", "ConvTranspose") else rank - 1
    vector = channel_vector(m.values["c"], rank, axis, channels)
    if vector is None:
        return None
    if root.op == "Div":
        if not np.all(vector):
            return None
        vector = 1.0 / vector
    elif root.op == "Sub":
        vector = -vector
    if root.op in SCALE_OPS:
        return fold_channel_affine(producer, weight, vector, None, m.outputs)
    return fold_channel_affine(producer, weight, None, vector, m.outputs)


RULES = [
    # Sub and Div are not commutative: only producer - c and producer / c match.
    RewriteRule(f"{producer.lower()}-{root.lower()}",
                op(root, producer_pattern(producer), const("c")), _fold)
    for root in SCALE_OPS + BIAS_OPS
    for producer in PRODUCERS
    if not (producer == "MatMul" and root in BIAS_OPS)
]
_SCALE_RULES = frozenset(rule.name for rule in RULES if rule.anchor in SCALE_OPS)


@register_pass
class FoldScaleBias(Pass):
    name = "fold-scale-bias"
    description = "fold constant per-channel Mul/Div and Add/Sub into the Conv/Gemm/MatMul before"
    opt_level = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        counts = apply_rules(graph, RULES)
        scales = sum(n for rule, n in counts.items() if rule in _SCALE_RULES)
        return PassResult.from_stats(scales_folded=scales,
                                     biases_folded=sum(counts.values()) - scales)
