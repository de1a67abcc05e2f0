"""fold-constants: evaluate every subgraph whose inputs are all constant, at compile time.

This includes the shape arithmetic torch exporters emit (Shape -> Gather -> Unsqueeze -> Concat
-> Reshape, ConstantOfShape, Range, ...): with static input shapes, Reshape/Expand targets
become constants, which is what TVM's ONNX importer needs ("only constant shape supported").

onnx-graphsurgeon's ``fold_constants`` does the evaluation (through onnxruntime) and the shape
folding. Three things are done here by hand, because onnx-graphsurgeon 0.6.1 gets them wrong or
misses them:

- ``Shape`` with ``start``/``end`` (opset 15+; the dynamo exporter emits it for ``x.size(0)``):
  gs folds it to the *whole* shape, silently producing wrong constants;
- ``CastLike(constant, x)``: only x's dtype matters, but gs waits for x to be constant;
- an ``If`` on a constant condition is replaced by the branch it takes (:func:`flatten_ifs`).
  gs's own flattening iterates over the ``If``'s outputs while unbinding them (so the second
  output of a two-output ``If`` lost its producer), and a branch that returns a tensor it did
  not compute (an outer-scope tensor, a constant) left the output produced by nothing:
  Silero VAD's nested ``If`` nodes came out as a graph onnx.checker and onnxruntime refuse
  ("nodes must be topologically sorted").

``DequantizeLinear`` is never folded: in a quantized (QDQ) graph it is what marks a weight as
int8 for the target; folding it would turn the weight back into float.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from mmcompile.ir import Graph
from mmcompile.transform import Pass, PassContext, PassResult, register_pass
from mmcompile.transform.rewrite import (RewriteRule, apply_rules, const, has_static_shape,
                                         make_constant, op, var)


def _fold_shape(m, graph):
    x = m["x"]
    if not has_static_shape(x):
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


# DequantizeLinear marks a weight as int8 for the target (see above). Loop / Scan: gs extracts
# their bodies in a form onnxruntime rejects ("Size mismatch validating subgraph inputs", a
# Range's function body), and one failed evaluation leaves *every* constant unfolded, the
# loop's trip count included; the CPU target unrolls loops with constant trip counts instead.
_NOT_FOLDED = frozenset({"DequantizeLinear", "Loop", "Scan"})

# Identity(constant) is then folded by gs into a plain constant.
_RULES = (
    RewriteRule("shape", op("Shape", var("x")), _fold_shape),
    RewriteRule("castlike", op("CastLike", const("c"), var("like")), _fold_castlike),
)


def _excluded(node: gs.Node) -> bool:
    return node.op in _NOT_FOLDED


def flatten_ifs(graph: gs.Graph) -> int:
    """Replace every ``If`` whose condition is constant by the nodes of the branch it takes,
    in ``graph`` and its subgraphs (innermost first); returns how many were replaced."""
    count = 0
    for node in graph.nodes:
        for sub in node.subgraphs():
            count += flatten_ifs(sub)
    index = 0
    while index < len(graph.nodes):
        node = graph.nodes[index]
        cond = node.inputs[0] if node.op == "If" and node.inputs else None
        if not isinstance(cond, gs.Constant) or np.asarray(cond.values).size != 1:
            index += 1
            continue
        branch = node.attrs["then_branch" if bool(np.asarray(cond.values).item())
                            else "else_branch"]
        for tensor in branch._local_tensors().values():  # no clash with the outer graph
            tensor.name = f"{node.name}/{tensor.name}"
        nodes = list(branch.nodes)
        # (a snapshot: clearing an output's producers also removes it from node.outputs,
        # which is how gs's own loop skipped every second output of a two-output If)
        for node_out, branch_out in zip(list(node.outputs), list(branch.outputs)):
            node_out.inputs.clear()
            producer = branch_out.inputs[0] if branch_out.inputs else None
            if producer is not None and producer in nodes:
                producer.outputs[producer.outputs.index(branch_out)] = node_out
            else:  # the branch passes a tensor through: an Identity produces the output
                nodes.append(gs.Node("Identity", name=f"{node.name}/pass",
                                     inputs=[branch_out], outputs=[node_out]))
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes[index:index + 1] = nodes
        index += len(nodes)
        count += 1
    return count


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
                                    size_threshold=self.config["size_threshold"],
                                    flatten_subgraphs=False,
                                    should_exclude_node=_excluded)
        flattened = flatten_ifs(graph.gs)
        graph.gs.cleanup(remove_unused_node_outputs=False).toposort()
        extra = {"ifs_flattened": flattened} if flattened else {}
        return PassResult.from_stats(nodes_folded=before - graph.num_nodes, **extra)
