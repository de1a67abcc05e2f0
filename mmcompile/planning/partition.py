"""Stages: the placed graph cut into connected pieces, each with one target.

Every node has a label, ``(base, target key)``: the base is ``main`` for a plan that keeps the
model whole, or the node's modality branch for the branch-parallel plan. Nodes with one label
are grouped into as few stages as keep the stage DAG acyclic:

1. each node gets a level, the most label changes on any path into it (a node whose inputs
   all carry its own label shares their level), and ``(label, level)`` is a group: an edge
   between two groups raises the level, so the groups form a DAG. A node that reads only
   constants (a weight's ``DequantizeLinear``) takes the lowest level of its readers when
   they all share its label: it joins the stage that uses it, instead of a level-0 stage
   that would hand its result over (nothing points into it, so no cycle can form);
2. groups with one label are merged while the DAG stays acyclic, so no boundary remains that
   the dependencies do not force (a fallback node in the middle of a chain splits the chain;
   two fallback nodes side by side share one stage).

Why it matters: a boundary costs a call into another executable, tensors handed over and, on
the CPU target, the fusions across it (see :mod:`mmcompile.planning`, where it is measured).

Each stage becomes a self-contained ONNX subgraph, cut out of the exported model by node
name: its inputs are the graph inputs and other stages' tensors it reads (outer-scope
tensors that ``If``/``Loop`` bodies read included), its outputs the tensors other stages or
the caller read. Constant-only subgraphs (a weight's ``DequantizeLinear``) never cross a
boundary: they are pulled into every stage that reads them, and are no part of a stage that
does not (a group of nothing else is no stage).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import onnx
import onnx_graphsurgeon as gs

from mmcompile.errors import MMCompileError
from mmcompile.ir import PROTO_LIMIT, Graph, node_inputs


@dataclass
class StagePlan:
    """One stage: its name, subgraph, the tensors it reads and writes, the stages it needs,
    its target (a placement key: ``cpu``, ``onnxruntime``, ``cpu{winograd=false}``) and the
    nodes of the planned graph it runs."""

    name: str
    graph: Graph
    inputs: list[str]
    outputs: list[str]
    depends_on: list[str] = field(default_factory=list)
    target: str = ""
    nodes: list[str] = field(default_factory=list)
    branch: str = "main"


Label = tuple[str, str]  # (base, target key)


def constant_nodes(graph: Graph) -> set[str]:
    """Nodes that compute from constants alone (a weight's ``DequantizeLinear``, a shape
    computation), directly or through other such nodes."""
    found: set[str] = set()
    made: set[str] = set()
    for node in graph.gs.nodes:  # graph order is topological
        if all(isinstance(t, gs.Constant) or not t.name or t.name in made
               for t in node_inputs(node)):
            found.add(node.name)
            made.update(t.name for t in node.outputs)
    return found


def group_nodes(graph: Graph, labels: Mapping[str, Label]) -> list[tuple[Label, list[str]]]:
    """Nodes grouped into acyclic stages by label (see the module docstring), in execution
    order; each group's nodes in graph order."""
    order = [n.name for n in graph.gs.nodes if n.name in labels]
    position = {name: i for i, name in enumerate(order)}
    dag = graph.to_networkx().subgraph(order)
    level: dict[str, int] = {}
    for name in nx.topological_sort(dag):
        level[name] = max((level[p] + (labels[p] != labels[name]) for p in dag.predecessors(name)),
                          default=0)
    constant = constant_nodes(graph) & set(level)
    for name in reversed(list(nx.topological_sort(dag))):
        readers = list(dag.successors(name))
        if name in constant and readers and all(labels[r] == labels[name] for r in readers):
            level[name] = min(level[r] for r in readers)  # joins its readers' group
    groups: dict[tuple[Label, int], list[str]] = collections.defaultdict(list)
    for name in order:
        groups[labels[name], level[name]].append(name)
    member = {name: key for key, names in groups.items() for name in names}
    quotient = nx.DiGraph()
    quotient.add_nodes_from(groups)
    quotient.add_edges_from((member[a], member[b]) for a, b in dag.edges
                            if member[a] != member[b])
    _merge_same_label(quotient, groups)
    # ties broken by base name, then target, then level: branches in a stable order
    ordered = nx.lexicographical_topological_sort(quotient, key=lambda k: (*k[0], k[1]))
    return [(key[0], sorted(groups[key], key=position.get)) for key in ordered]


def _merge_same_label(quotient: nx.DiGraph, groups: dict) -> None:
    """Merge groups that share a label (the lower level absorbs the higher) while the
    quotient stays acyclic; in place."""
    changed = True
    while changed:
        changed = False
        by_label = collections.defaultdict(list)
        for key in quotient.nodes:
            by_label[key[0]].append(key)
        for keys in by_label.values():
            keys.sort(key=lambda k: k[1])
            for a in keys:
                for b in keys:
                    if a == b or a not in quotient or b not in quotient or b[1] < a[1]:
                        continue
                    merged = nx.contracted_nodes(quotient, a, b, self_loops=False)
                    if nx.is_directed_acyclic_graph(merged):
                        quotient.clear()
                        quotient.update(merged)
                        groups[a].extend(groups.pop(b))
                        changed = True
        # contracted_nodes leaves "contraction" attributes: harmless, but keep the graph clean
        for key in quotient.nodes:
            quotient.nodes[key].pop("contraction", None)


def _stage_io(graph: Graph, stage_of: Mapping[str, str], constants: set[str]
              ) -> dict[str, tuple[list[str], list[str]]]:
    graph_inputs = [t.name for t in graph.gs.inputs]
    graph_outputs = {t.name for t in graph.gs.outputs}
    reads: dict[str, list[str]] = {s: [] for s in set(stage_of.values())}
    writes: dict[str, list[str]] = {s: [] for s in set(stage_of.values())}
    readers: dict[str, set[str]] = collections.defaultdict(set)  # tensor -> reading stages
    constant = {t.name for n in graph.gs.nodes if n.name in constants for t in n.outputs}
    for node in graph.gs.nodes:
        stage = stage_of.get(node.name)
        if stage is None:
            continue
        for tensor in node_inputs(node):
            if tensor.name in constant:  # each reading stage computes it (see _extract)
                continue
            readers[tensor.name].add(stage)
            producer = stage_of.get(tensor.inputs[0].name) if tensor.inputs else None
            is_input = tensor.name in graph_inputs
            if (is_input or (producer is not None and producer != stage)) \
                    and tensor.name not in reads[stage]:
                reads[stage].append(tensor.name)
    for node in graph.gs.nodes:
        stage = stage_of.get(node.name)
        if stage is None:
            continue
        for tensor in node.outputs:
            if tensor.name in graph_outputs or readers[tensor.name] - {stage}:
                writes[stage].append(tensor.name)
    order = {name: i for i, name in enumerate(graph_inputs)}
    return {s: (sorted(reads[s], key=lambda n: order.get(n, len(order))), writes[s])
            for s in reads}


def _graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads that it does not define: its outer-scope inputs."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    read: set[str] = set()
    for node in graph.node:
        read.update(_node_reads(node) - defined)
        defined.update(node.output)
    return read


def _node_reads(node: onnx.NodeProto) -> set[str]:
    names = {n for n in node.input if n}
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                    list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []):
            names |= _graph_reads(sub)
    return names


def _extract(model: onnx.ModelProto, keep: set[str], inputs: Sequence[str],
             outputs: Sequence[str], name: str) -> onnx.ModelProto:
    """The stage of ``model`` made of the nodes named ``keep``, reading ``inputs`` and writing
    ``outputs``, plus the constant-only nodes and initializers it needs."""
    g = model.graph
    producer = {out: node for node in g.node for out in node.output}
    initializers = {t.name: t for t in g.initializer}
    nodes = {n.name: n for n in g.node if n.name in keep}
    given = set(inputs)
    todo = [r for n in nodes.values() for r in _node_reads(n)] + list(outputs)
    used_init: set[str] = set()
    while todo:  # pull in what the kept nodes read that no stage input provides
        tensor = todo.pop()
        if tensor in given or tensor in used_init:
            continue
        if tensor in initializers:
            used_init.add(tensor)
        elif tensor in producer and producer[tensor].name not in nodes:
            node = producer[tensor]
            nodes[node.name] = node
            todo.extend(_node_reads(node))
    infos = {v.name: v for v in (*g.input, *g.value_info, *g.output)}

    def info(tensor: str) -> onnx.ValueInfoProto:
        if tensor in infos:
            return infos[tensor]
        if tensor in initializers:
            t = initializers[tensor]
            return onnx.helper.make_tensor_value_info(tensor, t.data_type, list(t.dims))
        raise MMCompileError(f"stage {name}: no type is known for tensor '{tensor}' (run shape "
                             f"inference, or give input shapes)")

    order = {n.name: i for i, n in enumerate(g.node)}
    graph = onnx.helper.make_graph(
        sorted(nodes.values(), key=lambda n: order[n.name]), name,
        [info(t) for t in inputs], [info(t) for t in outputs],
        [initializers[t] for t in initializers if t in used_init],
        value_info=[v for k, v in infos.items() if k not in given and k not in outputs
                    and any(k in n.output for n in nodes.values())])
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import),
                                 ir_version=model.ir_version)
    sub.metadata_props.extend(model.metadata_props)
    return sub


def stage_plans(graph: Graph, groups: Sequence[tuple[Label, list[str]]], primary: str,
                target_names: Mapping[str, str]) -> list[StagePlan]:
    """One :class:`StagePlan` per group of :func:`group_nodes`, named ``<base>`` (the primary
    target) or ``<base>@<target>``, ``-2``, ``-3`` after a name already taken.

    A single group that runs every node is the graph itself (nothing extracted).
    """
    names: list[str] = []
    taken: collections.Counter[str] = collections.Counter()
    for (base, key), _ in groups:
        stem = base if key == primary else f"{base}@{target_names[key]}"
        taken[stem] += 1
        names.append(stem if taken[stem] == 1 else f"{stem}-{taken[stem]}")
    stage_of = {node: name for name, (_, nodes) in zip(names, groups) for node in nodes}
    if len(groups) <= 1:  # no node (outputs are inputs) or one stage: the graph itself
        (base, key), nodes = groups[0] if groups else (("main", primary), [])
        return [StagePlan(names[0] if names else base, graph, [t.name for t in graph.gs.inputs],
                          [t.name for t in graph.gs.outputs], [], key, nodes, base)]
    constants = constant_nodes(graph)
    io = _stage_io(graph, stage_of, constants)
    written = {t for _, outs in io.values() for t in outs}
    orphans = [t.name for t in graph.gs.outputs if t.name not in written]
    if orphans and len({key for (_, key), _ in groups}) == 1:
        # an output computed from constants alone, one target: keep the model whole
        return stage_plans(graph, [(("main", primary), [n for _, g in groups for n in g])],
                           primary, target_names)
    for name, ((_, key), _) in zip(names, groups):  # else the first stage computes them too
        if orphans and key == primary:
            io[name][1].extend(orphans)
            break
    model = graph.to_onnx()
    if model.ByteSize() < PROTO_LIMIT:  # types of the tensors crossing stages
        model = onnx.shape_inference.infer_shapes(model)
    used_in: dict[str, set[str]] = collections.defaultdict(set)  # constant node -> stages
    graph_outputs = {t.name for t in graph.gs.outputs}
    for node in graph.gs.nodes:
        if node.name in constants:
            for tensor in node.outputs:
                used_in[node.name].update(stage_of[r.name] for r in tensor.outputs
                                          if r.name in stage_of)
                if tensor.name in graph_outputs:
                    used_in[node.name].add(stage_of[node.name])
    deps: dict[str, set[str]] = {name: set() for name in names}
    for node in graph.gs.nodes:
        consumer = stage_of.get(node.name)
        for tensor in node_inputs(node) if consumer else ():
            for producer in tensor.inputs:
                source = stage_of.get(producer.name)
                if source is not None and source != consumer and producer.name not in constants:
                    deps[consumer].add(source)
    plans = []
    for name, ((base, key), nodes) in zip(names, groups):
        inputs, outputs = io[name]
        # a constant-only node goes with the stages that read it (see _extract), not with
        # one that merely shares its target
        nodes = [n for n in nodes if n not in constants or name in used_in.get(n, ())]
        if not nodes:
            continue
        sub = _extract(model, set(nodes), inputs, outputs, f"{graph.name}:{name}")
        sub_graph = Graph.from_onnx(sub, name=f"{graph.name}[{name}]")
        sub_graph.modalities = {k: v for k, v in graph.modalities.items() if k in inputs}
        plans.append(StagePlan(name, sub_graph, inputs, outputs, sorted(deps[name]), key, nodes,
                               base))
    return plans


def partition(graph: Graph, target: str = "cpu") -> list[StagePlan]:
    """The branch stages recorded by the ``annotate-branches`` pass, all on ``target``, in a
    valid execution order (one stage, ``main``, without annotations or with one branch)."""
    branches = graph.annotations.get("stages") or {}
    if len(set(branches.values())) <= 1:
        branches = {}
    labels = {n: (b, target) for n, b in branches.items()} or {
        n.name: ("main", target) for n in graph.gs.nodes}
    return stage_plans(graph, group_nodes(graph, labels), target, {target: target})
