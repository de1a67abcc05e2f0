"""fold-constants: evaluate every subgraph whose inputs are all constant, at compile time.

This includes the shape arithmetic torch exporters emit (Shape -> Gather -> Unsqueeze -> Concat
-> Reshape, ConstantOfShape, Range, ...): with static input shapes, Reshape/Expand targets
become constants, which is what TVM's ONNX importer needs ("only constant shape supported").

onnx-graphsurgeon's ``fold_constants`` does the evaluation (through onnxruntime) and the shape
folding. Two things are done here first, by hand, because onnx-graphsurgeon 0.6.1 gets them
wrong or misses them:

- ``Shape`` with ``start``/``end`` (opset 15+; the dynamo exporter emits it for ``x.size(0)``):
  gs folds it to the *whole* shape, silently producing wrong constants;
- ``CastLike(constant, x)``: only x's dtype matters, but gs waits for x to be constant.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from mmcompile.ir import Graph
from mmcompile.transform import Pass, PassContext, PassResult, register_pass
from mmcompile.transform.rewrite import RewriteRule, apply_rules, const, make_constant, op, var


def _static(tensor: gs.Tensor) -> bool:
    return tensor.shape is not None and all(isinstance(d, int) and d >= 0 for d in tensor.shape)


def _fold_shape(m, graph):
    x = m["x"]
    if not _static(x):
        return None
    node = m.root
    value = np.array(x.shape, np.int64)[node.attrs.get("start", 0):node.attrs.get("end", None)]
    return [gs.Node("Identity", inputs=[make_constant("shape", value)], outputs=m.outputs)]


def _fold_castlike(m, graph):
    like = m["like"]
    if like.dtype is None:
        return None
    value = m.values["c"].astype(np.dtype(like.dtype))
    return [gs.Node("Identity", inputs=[make_constant("castlike", value)], outputs=m.outputs)]


@contextlib.contextmanager
def quiet_folding():
    """gs logs to stdout and its onnxruntime sessions warn on stderr about shape merges they
    recover from; the pass reports through counters instead."""
    import onnxruntime as ort
    severity = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        G_LOGGER.severity = severity
        ort.set_default_logger_severity(2)


# Identity(constant) is then folded by gs into a plain constant.
_RULES = (
    RewriteRule("shape", op("Shape", var("x")), _fold_shape),
    RewriteRule("castlike", op("CastLike", const("c"), var("like")), _fold_castlike),
)


@register_pass
class FoldConstants(Pass):
    name = "fold-constants"
    description = "evaluate constant subgraphs and static shape arithmetic at compile time"
    opt_level = 1
    options = {
        # Folded tensors larger than this (bytes) stay computed at run time: folding an
        # Expand of a scalar into a huge initializer trades a cheap op for memory and file size.
        "size_threshold": 16 * 1024 * 1024,
        "fold_shapes": True,
    }

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        before = graph.num_nodes
        graph.infer_shapes()
        if self.config["fold_shapes"]:
            apply_rules(graph, _RULES)
        with quiet_folding():
            graph.gs.fold_constants(fold_shapes=self.config["fold_shapes"], error_ok=True,
                                    size_threshold=self.config["size_threshold"])
        graph.gs.cleanup(remove_unused_node_outputs=False).toposort()
        return PassResult.from_stats(nodes_folded=before - graph.num_nodes)
