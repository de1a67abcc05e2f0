"""The graph IR: an onnx-graphsurgeon graph plus what mmcompile adds to it.

onnx-graphsurgeon already gives an editable graph whose producer/consumer links stay consistent
(``node.inputs``/``tensor.outputs``), ``cleanup()`` and ``toposort()``. mmcompile adds only:

- modality tags for the graph inputs (:mod:`mmcompile.modality`);
- ``annotations``: small JSON-able facts passes leave for later stages (attention units, stage
  assignment), keyed by node name;
- :meth:`Graph.verify`, a networkx view, op statistics, and an atomic :meth:`Graph.save`.

Tags and annotations survive ``save``/``load`` in the model's ``metadata_props``.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from mmcompile.errors import ModelLoadError, VerificationError
from mmcompile.modality import ModalityTag, assign_modalities

_MODALITY_KEY = "mmcompile.modalities"
_ANNOTATION_KEY = "mmcompile.annotations"
# protobuf cannot serialise a single message over 2 GiB; larger models keep weights outside.
PROTO_LIMIT = 2**31 - 1


def _name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique, non-empty name, so errors and annotations can point at it."""
    taken = collections.Counter(node.name for node in graph.nodes if node.name)
    seen: set[str] = set()
    counters: collections.Counter[str] = collections.Counter()
    for node in graph.nodes:
        name = node.name
        # A user's name is kept unless an earlier node already has it; generated names avoid
        # every name the model uses.
        while not name or name in seen or (name != node.name and name in taken):
            counters[node.op] += 1
            name = f"{node.op}_{counters[node.op]}"
        node.name = name
        seen.add(name)


def outer_inputs(node: gs.Node) -> list[gs.Tensor]:
    """Tensors of the enclosing graph that ``node``'s subgraphs (``If`` branches, ``Loop`` and
    ``Scan`` bodies, at any depth) read without taking them as inputs: the node depends on
    their producers as much as on its listed inputs."""
    found: dict[str, gs.Tensor] = {}
    for sub in node.subgraphs():
        local = {t.name for t in sub.inputs}
        local.update(t.name for n in sub.nodes for t in n.outputs)
        for inner in sub.nodes:
            for tensor in (*inner.inputs, *outer_inputs(inner)):
                if tensor.name and tensor.name not in local \
                        and not isinstance(tensor, gs.Constant):
                    found.setdefault(tensor.name, tensor)
    return list(found.values())


def node_inputs(node: gs.Node) -> list[gs.Tensor]:
    """A node's listed inputs, then the outer-scope tensors its subgraphs read."""
    extra = outer_inputs(node) if node.op in _CONTROL_FLOW else []
    return [*node.inputs, *(t for t in extra if all(t is not i for i in node.inputs))]


_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


def _loop_state_shapes(graph: gs.Graph) -> None:
    """Shapes of ``Loop`` / ``Scan`` state outputs that ONNX's inference leaves unknown (a
    ``Loop`` that computes its own condition gets none): a state whose body output is
    declared with its initial value's static shape keeps that shape through every
    iteration. (A stage boundary at such an output needs it: TVM imports no unknown rank.)"""
    for node in graph.nodes:
        body = node.attrs.get("body") if node.op in ("Loop", "Scan") else None
        if not isinstance(body, gs.Graph):
            continue
        if node.op == "Loop":
            pairs = zip(node.inputs[2:], body.outputs[1:], node.outputs)
        else:
            states = len(node.inputs) - int(node.attrs.get("num_scan_inputs", 0))
            pairs = zip(node.inputs[:states], body.outputs[:states], node.outputs[:states])
        for initial, carried, out in pairs:
            shape = initial.shape
            if out.shape is None and shape is not None and carried.shape is not None \
                    and all(isinstance(d, int) for d in shape) \
                    and list(carried.shape) == list(shape):
                out.shape, out.dtype = list(shape), out.dtype or initial.dtype


class Graph:
    """A model being compiled: an ``onnx_graphsurgeon.Graph`` plus modality tags and annotations.

    Attributes:
        gs: the underlying onnx-graphsurgeon graph; passes edit it in place.
        modalities: graph input name -> :class:`ModalityTag`.
        annotations: JSON-able facts left by passes (for example ``"attention_units"``).
        name: a human-readable name used in messages (the file name, or the module's class).
    """

    def __init__(self, graph: gs.Graph, modalities: Mapping[str, ModalityTag],
                 annotations: dict[str, Any] | None = None, name: str = "model",
                 metadata: Mapping[str, str] | None = None):
        self.gs = graph
        self.modalities = dict(modalities)
        self.annotations = annotations if annotations is not None else {}
        self.name = name
        self.metadata = dict(metadata or {})

    # -- construction / conversion ---------------------------------------------------------

    @classmethod
    def from_onnx(cls, model: onnx.ModelProto, modalities: Mapping[str, str] | None = None,
                  name: str = "model") -> Graph:
        """Wrap an ONNX model. Tags saved in the model are reused unless ``modalities`` is given.

        Raises:
            ModalityError: ``modalities`` names a missing input or an unknown modality.
            ModelLoadError: onnx-graphsurgeon cannot import the model.
        """
        try:
            graph = gs.import_onnx(model)
        except Exception as exc:  # gs raises bare Exceptions for malformed protos
            raise ModelLoadError(f"cannot import {name} into the graph IR: {exc}") from exc
        _name_nodes(graph)
        metadata = {p.key: p.value for p in model.metadata_props}
        saved = json.loads(metadata.pop(_MODALITY_KEY, "{}"))
        annotations = json.loads(metadata.pop(_ANNOTATION_KEY, "{}"))
        signature = {t.name: (t.shape, t.dtype) for t in graph.inputs}
        explicit = dict(modalities) if modalities is not None else None
        tags = assign_modalities(signature, explicit, model_name=name)
        if explicit is None:
            for input_name, tag in saved.items():
                if input_name in tags:
                    tags[input_name] = ModalityTag(tag["modality"], tag["reason"])
        return cls(graph, tags, annotations, name=name, metadata=metadata)

    def to_onnx(self) -> onnx.ModelProto:
        """Export to an ONNX ModelProto (tags and annotations go into ``metadata_props``)."""
        model = gs.export_onnx(self.gs, do_type_check=False)
        props = dict(self.metadata)
        props[_MODALITY_KEY] = json.dumps({k: v.to_dict() for k, v in self.modalities.items()})
        if self.annotations:
            props[_ANNOTATION_KEY] = json.dumps(self.annotations, sort_keys=True)
        onnx.helper.set_model_props(model, props)
        return model

    def copy(self) -> Graph:
        """A deep copy that passes can edit without touching this graph."""
        return Graph.from_onnx(self.to_onnx(), name=self.name)

    def infer_shapes(self) -> Graph:
        """Re-run ONNX shape inference (in place) so every tensor has a dtype and shape if known."""
        model = self.to_onnx()
        if model.ByteSize() < PROTO_LIMIT:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        self.gs = Graph.from_onnx(model, name=self.name).gs
        _loop_state_shapes(self.gs)
        return self

    # -- queries ---------------------------------------------------------------------------

    @property
    def opset(self) -> int:
        """The default-domain (``ai.onnx``) opset version."""
        return int(self.gs.opset)

    @property
    def num_nodes(self) -> int:
        return len(self.gs.nodes)

    def op_counts(self) -> collections.Counter[str]:
        """op type -> number of nodes (custom domains as ``domain::Op``)."""
        return collections.Counter(
            f"{n.domain}::{n.op}" if n.domain not in (None, "", "ai.onnx") else n.op
            for n in self.gs.nodes)

    def num_parameters(self) -> int:
        """Number of elements in floating-point constants (weights), counted once each."""
        total = 0
        for tensor in self.gs.tensors().values():
            if isinstance(tensor, gs.Constant) and np.issubdtype(tensor.dtype, np.floating):
                total += int(np.prod(tensor.shape))
        return total

    def node(self, name: str) -> gs.Node:
        """The node called ``name`` (raises KeyError)."""
        for node in self.gs.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def to_networkx(self) -> nx.DiGraph:
        """Dependency graph: one vertex per node (``kind="node"``) and per graph input
        (``kind="input"``, vertex name ``"input:<name>"``); edges carry the tensor name."""
        dag = nx.DiGraph()
        for tensor in self.gs.inputs:
            dag.add_node(f"input:{tensor.name}", kind="input",
                         modality=self.modalities.get(tensor.name, ModalityTag("other", "")).modality)
        for node in self.gs.nodes:
            dag.add_node(node.name, kind="node", op=node.op)
        graph_inputs = {t.name for t in self.gs.inputs}
        for node in self.gs.nodes:
            for tensor in node_inputs(node):
                if tensor.name in graph_inputs:
                    dag.add_edge(f"input:{tensor.name}", node.name, tensor=tensor.name)
                for producer in tensor.inputs:
                    dag.add_edge(producer.name, node.name, tensor=tensor.name)
        return dag

    # -- checks ----------------------------------------------------------------------------

    def verify(self, check_onnx: bool = True) -> None:
        """Check that the graph is well formed.

        Checks: every tensor is produced at most once; every node input is a graph input, a
        constant, an optional (empty) input or produced by a node; every graph output is
        produced; no cycles; and (``check_onnx``) the exported model passes ``onnx.checker``
        with full checks, which includes strict shape/dtype inference.

        Raises:
            VerificationError: naming the node or tensor at fault.
        """
        graph_inputs = {t.name for t in self.gs.inputs}
        producers: dict[str, list[str]] = collections.defaultdict(list)
        for node in self.gs.nodes:
            for tensor in node.outputs:
                producers[tensor.name].append(node.name)
        for tensor_name, names in producers.items():
            if len(names) > 1 or (names and tensor_name in graph_inputs):
                raise VerificationError(f"tensor '{tensor_name}' is produced by several nodes "
                                        f"{names}" + (" and is a graph input" if tensor_name
                                                      in graph_inputs else ""), node=names[0])
        for node in self.gs.nodes:
            for tensor in node.inputs:
                dangling = (isinstance(tensor, gs.Variable) and tensor.name
                            and not tensor.inputs and tensor.name not in graph_inputs)
                if dangling:
                    raise VerificationError(f"node '{node.name}' ({node.op}) reads tensor "
                                            f"'{tensor.name}' that nothing produces", node=node.name)
        for tensor in self.gs.outputs:
            if isinstance(tensor, gs.Variable) and not tensor.inputs and \
                    tensor.name not in graph_inputs:
                raise VerificationError(f"graph output '{tensor.name}' is not produced by any node")
        dag = self.to_networkx()
        if not nx.is_directed_acyclic_graph(dag):
            cycle = [edge[0] for edge in nx.find_cycle(dag)]
            raise VerificationError(f"graph has a cycle through nodes {cycle}", node=cycle[0])
        if check_onnx:
            self._check_onnx()

    def _check_onnx(self) -> None:
        model = self.to_onnx()
        try:
            if model.ByteSize() < PROTO_LIMIT:
                onnx.checker.check_model(model, full_check=True)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    path = os.path.join(tmp, "model.onnx")
                    onnx.save_model(model, path, save_as_external_data=True)
                    onnx.checker.check_model(path, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise VerificationError(f"{self.name} fails onnx.checker: {exc}") from exc

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike, check: bool = True) -> Path:
        """Write the graph as an ONNX file, atomically (a temp file renamed into place).

        Models over 2 GiB store their weights in ``<name>.data`` beside the file.

        Args:
            path: destination ``.onnx`` path; parent directories must exist.
            check: run :meth:`verify` first, so nothing invalid is ever written.

        Returns:
            The path written.

        Raises:
            VerificationError: the graph is invalid (nothing is written).
            ModelLoadError: the destination cannot be written.
        """
        path = Path(path)
        if check:
            self.verify()
        model = self.to_onnx()
        external = model.ByteSize() >= PROTO_LIMIT
        try:
            with tempfile.TemporaryDirectory(dir=path.parent or ".", prefix=".mmc-") as tmp:
                tmp_path = Path(tmp) / path.name
                onnx.save_model(model, tmp_path, save_as_external_data=external,
                                location=path.name + ".data" if external else None)
                if external:  # weights first: a model file never points at missing data
                    os.replace(Path(tmp) / (path.name + ".data"), path.parent / (path.name + ".data"))
                os.replace(tmp_path, path)
        except OSError as exc:
            raise ModelLoadError(f"cannot write {path}: {exc}") from exc
        return path

    def __repr__(self) -> str:
        inputs = ", ".join(f"{k}:{v.modality}" for k, v in self.modalities.items())
        return f"Graph({self.name!r}, nodes={self.num_nodes}, opset={self.opset}, inputs=[{inputs}])"
