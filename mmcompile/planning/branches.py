"""Branch analysis: which modality branch (and independent sub-branch) each node belongs to.

Each node depends on some set of input modalities (networkx, in topological order). Nodes that
depend on one modality form that modality's branch; a branch whose nodes fall into several
weakly connected pieces (two towers over the same input) is split into sub-branches
``<modality>.<k>``, which share no data and can run side by side. Nodes depending on two or
more modalities form the ``fusion`` branch; the fusion frontier is the set of branch tensors
the fusion reads. Nodes that depend on no input at all (constant subgraphs left unfolded)
get no branch: whichever stage needs them recomputes them (see :mod:`.partition`).
"""

from __future__ import annotations

import collections

import networkx as nx

from mmcompile.analysis import FUSION, node_modalities
from mmcompile.ir import Graph, node_inputs


def _split_components(graph: Graph, members: list[str]) -> list[list[str]]:
    """Weakly connected pieces of the subgraph induced by ``members`` (inputs excluded)."""
    dag = graph.to_networkx().subgraph(members)
    pieces = [sorted(c) for c in nx.weakly_connected_components(dag)]
    order = {name: i for i, name in enumerate(n.name for n in graph.gs.nodes)}
    return sorted(pieces, key=lambda piece: min(order[n] for n in piece))


def assign_branches(graph: Graph) -> dict[str, str]:
    """node name -> branch (``image``, ``image.1``, ``fusion``; constant-only and dead nodes
    omitted)."""
    by_branch: dict[str, list[str]] = collections.defaultdict(list)
    dag = graph.to_networkx()
    producers = [t.inputs[0].name for t in graph.gs.outputs if t.inputs]
    live = set(producers).union(*(nx.ancestors(dag, p) for p in producers))
    for name, mods in node_modalities(graph).items():
        if name not in live:  # dead code computes nothing anyone reads: no stage
            continue
        if len(mods) == 1:
            by_branch[next(iter(mods))].append(name)
        elif len(mods) > 1:
            by_branch[FUSION].append(name)
    stages: dict[str, str] = {}
    for branch, members in by_branch.items():
        pieces = [members] if branch == FUSION else _split_components(graph, members)
        for k, piece in enumerate(pieces):
            label = branch if len(pieces) == 1 else f"{branch}.{k}"
            stages.update((name, label) for name in piece)
    return stages


def branch_dependencies(graph: Graph, stages: dict[str, str]) -> tuple[dict[str, list[str]],
                                                                       list[str]]:
    """(branch -> branches it reads from, tensors crossing into the fusion branch)."""
    deps: dict[str, set[str]] = {s: set() for s in stages.values()}
    frontier: set[str] = set()
    for node in graph.gs.nodes:
        consumer = stages.get(node.name)
        if consumer is None:
            continue
        for tensor in node_inputs(node):
            for producer in tensor.inputs:
                source = stages.get(producer.name)
                if source is not None and source != consumer:
                    deps[consumer].add(source)
                    if consumer == FUSION:
                        frontier.add(tensor.name)
    return {k: sorted(v) for k, v in sorted(deps.items())}, sorted(frontier)
