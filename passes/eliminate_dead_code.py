"""eliminate-dead-code: remove nodes and tensors no graph output depends on.

onnx-graphsurgeon's ``cleanup()`` does the work; unused graph inputs are kept, since they are
part of the model's calling signature.
"""

from __future__ import annotations

from mmcompile.ir import Graph
from mmcompile.transform import Pass, PassContext, PassResult, register_pass


@register_pass
class EliminateDeadCode(Pass):
    name = "eliminate-dead-code"
    description = "remove nodes whose outputs reach no graph output"
    opt_level = 0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        before = graph.num_nodes
        graph.gs.cleanup(remove_unused_node_outputs=False).toposort()
        return PassResult.from_stats(nodes_removed=before - graph.num_nodes)
