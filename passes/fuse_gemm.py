"""fuse-gemm: MatMul(A, B) + Add(C) -> Gemm(A, B, C), where that is legal.

Gemm takes a 2-D A and B and a C that broadcasts *unidirectionally* to the [M, N] output, so
the fusion requires: A and B of rank 2 (static or inferred shapes), C's shape known and each of
its dims 1 or equal to the output's (symbolic dims must be the same symbol), the Add's output
shape equal to [M, N], a float16/float/double dtype, and a MatMul output read only by the Add.
C need not be constant. Rank-3 MatMuls ([B, S, K] x [K, N], everywhere in transformers) are
left alone: making them a Gemm would need Reshapes around it, which backends fuse better on
their own.

Also folds an Add after a Gemm that has no C into that C (beta becomes 1), under the same
broadcasting conditions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from mmcompile.ir import Graph
from mmcompile.transform import Pass, PassContext, PassResult, register_pass
from mmcompile.transform.rewrite import Match, RewriteRule, apply_rules, op, var

GEMM_DTYPES = (np.float16, np.float32, np.float64)


def _shape(tensor: gs.Tensor) -> list | None:
    """The tensor's shape (dims are ints, or strings for symbolic dims), None if unknown."""
    if isinstance(tensor, gs.Constant):
        return list(tensor.values.shape)
    return list(tensor.shape) if tensor.shape is not None else None


def _known(dim) -> bool:
    return (isinstance(dim, (int, np.integer)) and dim >= 0) or (isinstance(dim, str) and dim)


def broadcasts_to(shape: Sequence, target: Sequence) -> bool:
    """Whether ``shape`` broadcasts unidirectionally to ``target`` (Gemm's rule for C)."""
    if len(shape) > len(target):
        return False
    padded = [1] * (len(target) - len(shape)) + list(shape)
    return all(d == 1 or (_known(d) and d == t) for d, t in zip(padded, target))


def _gemm_legal(c: gs.Tensor, out: gs.Tensor, result: gs.Tensor) -> bool:
    """The product ``out`` is [M, N] (with a 2-D B, A is then 2-D too), C broadcasts to it, and
    the Add's ``result`` is [M, N] as well (C did not broadcast the sum to a larger shape)."""
    c_shape, out_shape, result_shape = _shape(c), _shape(out), _shape(result)
    if c_shape is None or out_shape is None or len(out_shape) != 2:
        return False
    if result_shape is not None and result_shape != out_shape:
        return False
    return broadcasts_to(c_shape, out_shape)


def _float_dtype(tensor: gs.Tensor) -> bool:
    dtype = tensor.values.dtype if isinstance(tensor, gs.Constant) else tensor.dtype
    return dtype is not None and np.dtype(dtype) in [np.dtype(t) for t in GEMM_DTYPES]


def _flat_bias(c: gs.Tensor) -> gs.Tensor:
    """A constant C of shape [1, N] as [N] (the same broadcast): per-channel quantizers index
    a bias by output channel (onnxruntime's ``quantize_static`` raised on Magika's [1, 214]
    bias, comparing a row with a scalar)."""
    if isinstance(c, gs.Constant) and c.values.ndim == 2 and c.values.shape[0] == 1:
        return gs.Constant(f"{c.name}_flat", np.ascontiguousarray(c.values.reshape(-1)))
    return c


def _fuse_matmul_add(m: Match, graph: Graph) -> list[gs.Node] | None:
    matmul, add = m.nodes["producer"], m.root
    a, b, c = m["a"], m["b"], m["c"]
    if c is matmul.outputs[0] or not _float_dtype(matmul.outputs[0]):
        return None
    b_shape = _shape(b)
    if b_shape is None or len(b_shape) != 2:
        return None
    if not _gemm_legal(c, matmul.outputs[0], add.outputs[0]):
        return None
    return [gs.Node("Gemm", name=matmul.name, inputs=[a, b, _flat_bias(c)], outputs=m.outputs)]


def _fold_gemm_add(m: Match, graph: Graph) -> list[gs.Node] | None:
    gemm, add, c = m.nodes["producer"], m.root, m["c"]
    if len(gemm.inputs) > 2 and gemm.inputs[2].name:
        return None  # already has a C; fold-scale-bias merges constant ones
    if c is gemm.outputs[0] or not _float_dtype(gemm.outputs[0]):
        return None
    if not _gemm_legal(c, gemm.outputs[0], add.outputs[0]):
        return None
    attrs = dict(gemm.attrs, beta=1.0)
    return [gs.Node("Gemm", name=gemm.name, attrs=attrs, inputs=[*gemm.inputs[:2], _flat_bias(c)],
                    outputs=m.outputs)]


RULES = [
    RewriteRule("matmul-add", op("Add", op("MatMul", var("a"), var("b"), name="producer"),
                                 var("c")), _fuse_matmul_add),
    RewriteRule("gemm-add", op("Add", op("Gemm", var("a"), var("b"), name="producer",
                                         allow_extra_inputs=True), var("c")), _fold_gemm_add),
]


@register_pass
class FuseGemm(Pass):
    name = "fuse-gemm"
    description = "fuse MatMul + Add into Gemm (2-D A and B), and an Add into a Gemm's missing C"
    opt_level = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        counts = apply_rules(graph, RULES)
        return PassResult.from_stats(gemm_fused=counts["matmul-add"],
                                     gemm_bias_folded=counts["gemm-add"])
