"""Read-only analyses of a graph: which modality branch each node belongs to, and a summary
``mmcompile inspect`` prints."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from mmcompile.flops import node_flops
from mmcompile.ir import Graph
from mmcompile.report import save_figure

FUSION = "fusion"
CONSTANT = "constant"


def node_modalities(graph: Graph) -> dict[str, frozenset[str]]:
    """node name -> the set of modalities whose inputs it (transitively) depends on."""
    dag = graph.to_networkx()
    deps: dict[str, frozenset[str]] = {}
    for vertex in nx.topological_sort(dag):
        data = dag.nodes[vertex]
        if data["kind"] == "input":
            deps[vertex] = frozenset([data["modality"]])
            continue
        found: set[str] = set()
        for pred in dag.predecessors(vertex):
            found |= deps[pred]
        deps[vertex] = frozenset(found)
    return {k: v for k, v in deps.items() if dag.nodes[k]["kind"] == "node"}


def branch_of(modalities: frozenset[str]) -> str:
    """The branch label of a node: its single modality, ``fusion`` or ``constant``."""
    if not modalities:
        return CONSTANT
    if len(modalities) == 1:
        return next(iter(modalities))
    return FUSION


@dataclass
class BranchSummary:
    name: str
    nodes: int = 0
    parameters: int = 0
    flops: int = 0
    ops: collections.Counter = field(default_factory=collections.Counter)


def branch_summary(graph: Graph) -> dict[str, BranchSummary]:
    """Per branch (image, text, ..., fusion): node count, parameters, op histogram.

    A weight counts towards a branch when every node reading it is in that branch, otherwise
    towards ``fusion``.
    """
    labels = {name: branch_of(mods) for name, mods in node_modalities(graph).items()}
    summary: dict[str, BranchSummary] = {}
    for node in graph.gs.nodes:
        entry = summary.setdefault(labels[node.name], BranchSummary(labels[node.name]))
        entry.nodes += 1
        entry.flops += node_flops(node) or 0
        entry.ops[node.op] += 1
    for tensor in graph.gs.tensors().values():
        if not isinstance(tensor, gs.Constant) or not np.issubdtype(tensor.dtype, np.floating):
            continue
        owners = {labels[n.name] for n in tensor.outputs if n.name in labels}
        owner = owners.pop() if len(owners) == 1 else FUSION
        summary.setdefault(owner, BranchSummary(owner)).parameters += int(np.prod(tensor.shape))
    return summary


def describe(graph: Graph) -> dict[str, Any]:
    """A JSON-able description: signature with modality tags, op counts, branches, annotations."""
    def tensor_info(t: gs.Tensor) -> dict[str, Any]:
        shape = None if t.shape is None else [d if isinstance(d, int) else str(d) for d in t.shape]
        return {"name": t.name, "shape": shape, "dtype": str(np.dtype(t.dtype)) if t.dtype else None}

    inputs = []
    for t in graph.gs.inputs:
        tag = graph.modalities.get(t.name)
        inputs.append({**tensor_info(t), "modality": tag.modality if tag else None,
                       "reason": tag.reason if tag else None})
    branches = branch_summary(graph)
    return {
        "name": graph.name,
        "opset": graph.opset,
        "nodes": graph.num_nodes,
        "parameters": graph.num_parameters(),
        "inputs": inputs,
        "outputs": [tensor_info(t) for t in graph.gs.outputs],
        "ops": dict(graph.op_counts().most_common()),
        "flops": sum(b.flops for b in branches.values()),
        "branches": {k: {"nodes": v.nodes, "parameters": v.parameters, "flops": v.flops,
                         "ops": dict(v.ops.most_common())} for k, v in branches.items()},
        "stage_dag": graph.annotations.get("stage_dag", {}),
        "attention_units": len(graph.annotations.get("attention_units", [])),
    }


def draw_branches(graph: Graph, path: str) -> None:
    """Draw the graph (one dot per node, layered by topological depth), coloured by branch, to
    an image (.png or .svg by extension)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = {name: branch_of(mods) for name, mods in node_modalities(graph).items()}
    dag = graph.to_networkx()
    for layer, names in enumerate(nx.topological_generations(dag)):
        for name in names:
            dag.nodes[name]["layer"] = layer
    pos = nx.multipartite_layout(dag, subset_key="layer")
    branches = sorted(set(labels.values()) | {dag.nodes[v]["modality"] for v in dag
                                              if dag.nodes[v]["kind"] == "input"})
    palette = plt.get_cmap("tab10")
    colour = {b: palette(i % 10) for i, b in enumerate(branches)}
    fig, ax = plt.subplots(figsize=(max(8, 0.12 * dag.number_of_nodes()), 6))
    for branch in branches:
        members = [v for v in dag if labels.get(v, dag.nodes[v].get("modality")) == branch]
        nx.draw_networkx_nodes(dag, pos, nodelist=members, node_size=30,
                               node_color=[colour[branch]], label=branch, ax=ax)
    nx.draw_networkx_edges(dag, pos, width=0.4, arrowsize=4, alpha=0.5, ax=ax)
    ax.set_title(f"{graph.name}: nodes by modality branch")
    ax.legend(loc="upper left", fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
