"""annotate-branches: record the modality branches of a graph (see
:mod:`mmcompile.planning.branches`, where the analysis lives, shared with the planner).

The result is written to ``graph.annotations``:

- ``"stages"``: node name -> branch name;
- ``"stage_dag"``: branch name -> list of branches it reads from;
- ``"fusion_frontier"``: tensor names crossing from branches into fusion.
"""

from __future__ import annotations

from mmcompile.analysis import FUSION
from mmcompile.ir import Graph
from mmcompile.planning.branches import assign_branches, branch_dependencies
from mmcompile.transform import Pass, PassContext, PassResult, register_pass


@register_pass
class AnnotateBranches(Pass):
    name = "annotate-branches"
    description = "assign nodes to modality-branch stages (branches, sub-branches, fusion)"
    opt_level = 0

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stages = assign_branches(graph)
        dag, frontier = branch_dependencies(graph, stages)
        new = {"stages": stages, "stage_dag": dag, "fusion_frontier": frontier}
        changed = any(graph.annotations.get(k) != v for k, v in new.items())
        graph.annotations.update(new)
        branches = [s for s in dag if s != FUSION]
        return PassResult(changed, {"stages": len(dag), "branches": len(branches),
                                    "frontier_tensors": len(frontier)})
