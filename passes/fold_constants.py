"""fold-constants: evaluate every subgraph whose inputs are all constant, at compile time.

This includes the shape arithmetic torch exporters emit (Shape -> Gather -> Unsqueeze -> Concat
-> Reshape, ConstantOfShape, Range, ...): with static input shapes, Reshape/Expand targets
become constants, which is what TVM's ONNX importer needs ("only constant shape supported").

onnx-graphsurgeon's ``fold_constants`` does the evaluation (through onnxruntime) and the shape
folding; this pass runs shape inference first so shapes are known, and counts what it folded.
"""

from __future__ import annotations

from mmcompile.ir import Graph
from mmcompile.transform import Pass, PassContext, PassResult, register_pass


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
        graph.gs.fold_constants(fold_shapes=self.config["fold_shapes"], error_ok=True,
                                size_threshold=self.config["size_threshold"])
        graph.gs.cleanup(remove_unused_node_outputs=False).toposort()
        return PassResult.from_stats(nodes_folded=before - graph.num_nodes)
