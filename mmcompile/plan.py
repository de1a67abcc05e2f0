"""The plan: a model split into stages that a target compiles one by one.

Stages come from the ``annotate-branches`` pass (``graph.annotations["stages"]``). Each stage
becomes a self-contained ONNX subgraph, cut by tensor names with ``onnx.utils.Extractor``: its
inputs are the graph inputs and other stages' tensors it reads, its outputs the tensors other
stages or the caller read. Constant-only subgraphs are pulled into every stage that needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import onnx.utils

from mmcompile.ir import Graph


@dataclass
class StagePlan:
    """One stage: its name, subgraph, the tensors it reads and writes, and the stages it needs."""

    name: str
    graph: Graph
    inputs: list[str]
    outputs: list[str]
    depends_on: list[str] = field(default_factory=list)


def _stage_io(graph: Graph, stages: dict[str, str]) -> dict[str, tuple[list[str], list[str]]]:
    graph_inputs = [t.name for t in graph.gs.inputs]
    graph_outputs = {t.name for t in graph.gs.outputs}
    reads: dict[str, list[str]] = {s: [] for s in set(stages.values())}
    writes: dict[str, list[str]] = {s: [] for s in set(stages.values())}
    for node in graph.gs.nodes:
        stage = stages.get(node.name)
        if stage is None:
            continue
        for tensor in node.inputs:
            producer = stages.get(tensor.inputs[0].name) if tensor.inputs else None
            is_input = tensor.name in graph_inputs
            if (is_input or (producer is not None and producer != stage)) \
                    and tensor.name not in reads[stage]:
                reads[stage].append(tensor.name)
        for tensor in node.outputs:
            external = tensor.name in graph_outputs or any(
                stages.get(reader.name) != stage for reader in tensor.outputs)
            if external:
                writes[stage].append(tensor.name)
    order = {name: i for i, name in enumerate(graph_inputs)}
    return {s: (sorted(reads[s], key=lambda n: order.get(n, len(order))), writes[s])
            for s in reads}


def partition(graph: Graph) -> list[StagePlan]:
    """Split an annotated graph into stages, in a valid execution order.

    A graph without stage annotations (or with one stage) is returned as one stage ``main``.
    """
    stages = graph.annotations.get("stages") or {}
    single = [StagePlan("main", graph, [t.name for t in graph.gs.inputs],
                        [t.name for t in graph.gs.outputs])]
    if len(set(stages.values())) <= 1:
        return single
    io = _stage_io(graph, stages)
    written = {name for _, outs in io.values() for name in outs}
    if any(t.name not in written for t in graph.gs.outputs):
        return single  # an output computed from constants alone: keep the model whole
    model = graph.to_onnx()
    extractor = onnx.utils.Extractor(model)
    dag = nx.DiGraph()
    for stage, deps in graph.annotations["stage_dag"].items():
        dag.add_node(stage)
        dag.add_edges_from((dep, stage) for dep in deps)
    plans = []
    for stage in nx.lexicographical_topological_sort(dag):
        inputs, outputs = io[stage]
        sub = extractor.extract_model(inputs, outputs)
        sub.graph.name = f"{graph.name}:{stage}"
        sub_graph = Graph.from_onnx(sub, name=f"{graph.name}[{stage}]")
        sub_graph.modalities = {k: v for k, v in graph.modalities.items() if k in inputs}
        plans.append(StagePlan(stage, sub_graph, inputs, outputs,
                               sorted(dag.predecessors(stage))))
    return plans
