"""eliminate-common-subexpr: compute each value once.

Exporters repeat work: the same ``Shape`` of a tensor for every ``x.shape[i]``, the same
transpose of a key for several heads, equal index constants under different names. Two nodes
with the same op, domain and attributes reading the same tensors compute the same thing, so the
later one is dropped and its readers read the first one's outputs; two small initializers with
the same dtype, shape and bytes are merged first, so that nodes reading them become equal too.

onnx-graphsurgeon has no CSE. onnx_ir (under onnxscript) has one, but it merges training-mode
Dropout and Bernoulli (only Random* and Multinomial count as non-deterministic there), compares
Constant values of at most 10 elements and does not see ``Add(a, b)`` and ``Add(b, a)`` as
equal; it also needs a proto round trip that rebuilds this graph. So it is written here, as one walk in topological
order (a node's inputs are already merged when it is visited, so chains merge in one run). It
is a whole-graph walk, not a local rewrite, hence no rewrite rules.

Never merged: non-deterministic ops (random ops, Dropout in training mode), nodes with subgraph
attributes (If, Loop, Scan: comparing bodies is not worth it), ops from non-standard domains
(whether they are deterministic is unknown), and nodes inside subgraphs (not visited).

When a duplicate writes a graph output, that output keeps its name: an ``Identity`` from the
kept node's output writes it (unless the duplicate is itself an Identity: nothing to gain).
"""

from __future__ import annotations

import struct
from collections.abc import Hashable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from mmcompile.ir import Graph
from mmcompile.transform import Pass, PassContext, PassResult, register_pass
from mmcompile.transform.rewrite import COMMUTATIVE_OPS, constant_value, replace_all_uses

NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                                  "RandomUniformLike", "Multinomial", "Bernoulli"})
_STANDARD_DOMAINS = (None, "", "ai.onnx", "ai.onnx.ml")


class _Unmergeable(Exception):
    """Raised while building a key for a node that must never be merged."""


def _constant_key(constant: gs.Constant, max_bytes: int) -> Hashable:
    array = np.asarray(constant.values)
    if array.nbytes > max_bytes:
        raise _Unmergeable
    # Bytes, not values: -0.0 and 0.0 differ, and equal NaN payloads are equal. The export
    # dtype can differ from the stored one (bfloat16 kept as float32), so it is compared too.
    return ("tensor", str(constant.export_dtype), array.dtype.str, array.shape, array.tobytes())


def _attr_key(value: Any, max_bytes: int) -> Hashable:
    if isinstance(value, gs.Constant):
        return _constant_key(value, max_bytes)
    if isinstance(value, np.ndarray):
        return _constant_key(gs.Constant("", value), max_bytes)
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, (bool, int, str, bytes)):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_attr_key(v, max_bytes) for v in value))
    raise _Unmergeable  # subgraphs, attribute references, anything not understood


def _tensor_key(tensor: gs.Tensor) -> tuple[int, int]:
    return (0, 0) if not tensor.name else (1, id(tensor))  # all omitted optional inputs alike


def _is_training_dropout(node: gs.Node, opset: int) -> bool:
    if opset < 7:
        return not node.attrs.get("is_test", 0)
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return False
    value = constant_value(node.inputs[2])
    return value is None or bool(value.any())


def node_key(node: gs.Node, opset: int, max_bytes: int) -> Hashable | None:
    """What makes two nodes compute the same values, or None if ``node`` must not be merged."""
    if node.domain not in _STANDARD_DOMAINS or node.op in NONDETERMINISTIC_OPS or not node.outputs:
        return None
    if node.op == "Dropout" and _is_training_dropout(node, opset):
        return None
    try:
        attrs = tuple(sorted((k, _attr_key(v, max_bytes)) for k, v in node.attrs.items()))
    except _Unmergeable:
        return None
    inputs = tuple(_tensor_key(t) for t in node.inputs)
    if node.op in COMMUTATIVE_OPS and len(inputs) == 2:
        inputs = tuple(sorted(inputs))
    outputs = tuple(bool(t.name) for t in node.outputs)  # same optional outputs requested
    return (node.op, node.domain or "", inputs, attrs, outputs)


def merge_constants(graph: gs.Graph, max_bytes: int) -> int:
    """Make readers of equal initializers read the first one; returns how many were merged.

    Initializers that are graph inputs or outputs keep their identity (a caller may override
    or read them by name).
    """
    pinned = {id(t) for t in (*graph.inputs, *graph.outputs)}
    first: dict[Hashable, gs.Constant] = {}
    merged = 0
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant) or id(tensor) in pinned:
            continue
        try:
            size = int(np.prod(tensor.shape)) * np.dtype(tensor.dtype).itemsize
            if size > max_bytes:
                continue
            key = _constant_key(tensor, max_bytes)
        except (TypeError, _Unmergeable):
            continue
        kept = first.setdefault(key, tensor)
        if kept is not tensor:
            replace_all_uses(tensor, kept)
            merged += 1
    return merged


def merge_nodes(graph: gs.Graph, opset: int, max_bytes: int) -> int:
    """Drop nodes equal to an earlier node (see the module docstring); returns how many."""
    graph.toposort()
    graph_outputs = {id(t) for t in graph.outputs}
    first: dict[Hashable, gs.Node] = {}
    removed: set[int] = set()
    identities: list[gs.Node] = []
    for node in list(graph.nodes):
        key = node_key(node, opset, max_bytes)
        if key is None:
            continue
        kept = first.setdefault(key, node)
        if kept is node:
            continue
        writes_output = [id(t) in graph_outputs for t in node.outputs]
        if node.op == "Identity" and any(writes_output):
            continue  # it would only be replaced by an equal Identity
        pairs = list(zip(node.outputs, kept.outputs))
        node.inputs.clear()
        node.outputs.clear()
        for (old, new), is_output in zip(pairs, writes_output):
            replace_all_uses(old, new)
            if is_output:
                identities.append(gs.Node("Identity", name=node.name, inputs=[new],
                                          outputs=[old]))
        removed.add(id(node))
    if removed:
        graph.nodes = [n for n in graph.nodes if id(n) not in removed] + identities
        graph.toposort()
    return len(removed)


@register_pass
class EliminateCommonSubexpr(Pass):
    name = "eliminate-common-subexpr"
    description = "merge nodes that compute the same values, and equal small constants"
    opt_level = 1
    options = {
        # Constants (initializers and Constant-node values) larger than this (bytes) are never
        # compared: equal large weights are rare, and comparing them costs a full copy.
        "max_constant_bytes": 1 << 20,
    }

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        limit = self.config["max_constant_bytes"]
        constants = merge_constants(graph.gs, limit)
        nodes = merge_nodes(graph.gs, graph.opset, limit)
        return PassResult.from_stats(nodes_merged=nodes, constants_merged=constants)
