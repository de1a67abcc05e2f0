"""float16 ops that accumulate, computed in float32 (used by legalize-for-tvm).

TVM lowers a float16 MatMul, Conv, Softmax or reduction with a float16 accumulator: measured on
TVM 0.27 (LLVM, znver4), a (64 x K) @ (K x 64) float16 MatMul is off by 6.3e-3 of the output's
range at K=512 and 1.3e-2 at K=2048, where onnxruntime (float32 accumulation) stays at
3e-4, the rounding of the float16 result. onnx's reference, and so its node tests, accumulate in
float32 too. Each such op is wrapped here in Casts: float16 operands to float32, the op in
float32, its float16 outputs back. On a CPU without float16 arithmetic the op computed in
float32 anyway, one value at a time; the Casts of constant weights fold at compile time.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from mmcompile.ir import Graph
from mmcompile.transform.rewrite import Match, NodeBuilder, RewriteRule, fresh_name, op

# Ops whose result sums many float16 terms (or normalises by such a sum).
ACCUMULATING = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Softmax", "LogSoftmax",
                "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL1", "ReduceL2",
                "ReduceLogSumExp", "LayerNormalization", "GroupNormalization",
                "InstanceNormalization", "AveragePool", "GlobalAveragePool", "LpNormalization")

_HALF = np.dtype(np.float16)


def _is_half(t: gs.Tensor) -> bool:
    try:
        return t.dtype is not None and np.dtype(t.dtype) == _HALF
    except TypeError:  # onnx enums for types numpy lacks (bfloat16)
        return False


def widen(m: Match, graph: Graph) -> list[gs.Node] | None:
    """The node computed in float32 between Casts, or None when it has no float16 operand."""
    node = m.root
    if not any(_is_half(t) for t in node.inputs if t.name):
        return None
    b = NodeBuilder(node.name, np.dtype(np.float32))
    to_float = {"to": onnx.TensorProto.FLOAT}
    inputs = [b("Cast", [t], to_float) if t.name and _is_half(t) else t for t in node.inputs]
    wide_outs = [gs.Variable(fresh_name(f"{o.name}/float32"), dtype=np.float32)
                 if _is_half(o) else o for o in node.outputs]
    b.nodes.append(gs.Node(node.op, name=fresh_name(f"{node.name}/float32"), attrs=dict(node.attrs),
                           inputs=inputs, outputs=wide_outs, domain=node.domain))
    for out, wide in zip(node.outputs, wide_outs):
        if wide is not out:
            b("Cast", [wide], {"to": onnx.TensorProto.FLOAT16}, out=out)
    return b.nodes


RULES = tuple(RewriteRule(f"float16_{name}", op(name, allow_extra_inputs=True), widen)
              for name in ACCUMULATING)
