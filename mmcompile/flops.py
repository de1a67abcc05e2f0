"""FLOPs of one forward pass, counted on the shape-inferred ONNX graph.

Only the ops that dominate these models are counted, at 2 FLOPs per multiply-accumulate:
MatMul (attention's QK^T and PV included, as the exporters emit them), Gemm, Conv and
ConvTranspose. Elementwise ops, normalisations and softmax are left out, as in the usual
conventions (fvcore, torch.utils.flop_counter); the count needs static shapes, and nodes whose
shapes are unknown are reported rather than guessed. Counting the ONNX graph, not the torch
module, gives one number for suite models and model files alike (onnx_tool, thop and fvcore are
not installed; torch's FlopCounterMode needs the module).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from mmcompile.ir import Graph


@dataclass
class FlopCount:
    """Total FLOPs, the share of each op type, and the names of nodes that could not be counted
    (a shape was unknown)."""

    total: int = 0
    by_op: Counter = field(default_factory=Counter)
    uncounted: list[str] = field(default_factory=list)


def _shape(tensor: gs.Tensor) -> list[int] | None:
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return list(shape)


def _matmul(node: gs.Node) -> int | None:
    a, out = _shape(node.inputs[0]), _shape(node.outputs[0])
    if a is None or out is None:
        return None
    return 2 * math.prod(out) * a[-1]


def _gemm(node: gs.Node) -> int | None:
    a, out = _shape(node.inputs[0]), _shape(node.outputs[0])
    if a is None or out is None:
        return None
    k = a[0] if node.attrs.get("transA", 0) else a[1]
    return 2 * math.prod(out) * k


def _conv(node: gs.Node) -> int | None:
    w, out = _shape(node.inputs[1]), _shape(node.outputs[0])
    if w is None or out is None:
        return None
    # Each output element sums over (Cin / groups) x kernel taps.
    return 2 * math.prod(out) * math.prod(w[1:])


def _conv_transpose(node: gs.Node) -> int | None:
    x, w = _shape(node.inputs[0]), _shape(node.inputs[1])
    if x is None or w is None:
        return None
    # Each input element scatters into (Cout / groups) x kernel taps.
    return 2 * math.prod(x) * math.prod(w[1:])


_COUNTERS: dict[str, Callable[[gs.Node], int | None]] = {
    "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv, "ConvTranspose": _conv_transpose,
}


def node_flops(node: gs.Node) -> int | None:
    """FLOPs of one node: 0 for ops not counted, None when a counted op's shapes are unknown."""
    counter = _COUNTERS.get(node.op)
    return 0 if counter is None else counter(node)


def count_flops(graph: Graph) -> FlopCount:
    """FLOPs of one forward pass of ``graph`` at its (static) input shapes."""
    result = FlopCount()
    for node in graph.gs.nodes:
        if node.op not in _COUNTERS:
            continue
        flops = node_flops(node)
        if flops is None:
            result.uncounted.append(node.name)
            continue
        result.total += flops
        result.by_op[node.op] += flops
    return result
