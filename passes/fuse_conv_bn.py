"""fuse-conv-bn: fold an inference BatchNormalization into the Conv, Gemm or MatMul before it.

An inference BatchNormalization is a per-channel affine map ``y = s * x + t`` with
``s = scale / sqrt(var + eps)`` and ``t = bias - mean * s``. When its input is the output of a
producer with a constant weight, and nothing else reads that output, the map folds into the
producer: the weight's output channels are multiplied by ``s`` and ``t`` is added to the bias.

Producers: Conv (any rank, groups, with or without bias), ConvTranspose (groups), Gemm (transB,
alpha/beta, with or without C) and MatMul with a constant 2-D weight and a rank-2 output (only
there is BN's channel axis 1 the MatMul's last axis); MatMul + BN becomes a Gemm. Folding is
done in float64 and cast back to the weight's dtype, so the result differs from the unfused
graph by rounding only.

BN in training mode, BN whose running-statistics outputs are read, and producers with
non-constant weights or bias are left alone.

The channel helpers live in ``_channel_affine.py``, shared with fold-scale-bias, which folds
the same affine map when it is written as Mul/Add.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmcompile.ir import Graph
from mmcompile.passes._channel_affine import (PRODUCERS, fold_channel_affine, output_channels,
                                              output_rank, producer_pattern)
from mmcompile.transform import Pass, PassContext, PassResult, register_pass
from mmcompile.transform.rewrite import (Match, RewriteRule, apply_rules, const,
                                         op)

def _is_inference_bn(node: gs.Node) -> bool:
    # spatial=0 (opset < 9) normalizes per element, not per channel.
    return not node.attrs.get("training_mode", 0) and node.attrs.get("spatial", 1) == 1


def _fold_bn(m: Match, graph: Graph) -> list[gs.Node] | None:
    bn, producer, weight = m.nodes["bn"], m.nodes["producer"], m.values["w"]
    graph_outputs = {t.name for t in graph.gs.outputs}
    for extra in bn.outputs[1:]:  # running statistics: only produced, never read, in inference
        if extra.name and (extra.outputs or extra.name in graph_outputs):
            return None
    channels = output_channels(producer, weight)
    if channels is None or output_rank(producer, weight) is None:
        return None
    if producer.op == "MatMul" and output_rank(producer, weight) != 2:
        return None  # BN normalizes axis 1, which is the MatMul's channel axis only in rank 2
    params = [m.values[k].astype(np.float64) for k in ("scale", "bias", "mean", "var")]
    if any(p.shape != (channels,) for p in params):
        return None
    gamma, beta, mean, var_ = params
    scale = gamma / np.sqrt(var_ + float(bn.attrs.get("epsilon", 1e-5)))
    shift = beta - mean * scale
    return fold_channel_affine(producer, weight, scale, shift, bn.outputs[:1])


RULES = [
    RewriteRule(f"{producer.lower()}-bn",
                op("BatchNormalization", producer_pattern(producer), const("scale"),
                   const("bias"), const("mean"), const("var"), name="bn",
                   where=_is_inference_bn),
                _fold_bn)
    for producer in PRODUCERS
]


@register_pass
class FuseConvBN(Pass):
    name = "fuse-conv-bn"
    description = "fold inference BatchNormalization into the Conv/Gemm/MatMul before it"
    opt_level = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        counts = apply_rules(graph, RULES)
        return PassResult.from_stats(bn_folded=sum(counts.values()))
