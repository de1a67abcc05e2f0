"""Local rewrites as data: a pattern and a callback, run by one shared driver.

A fusion is written as a :class:`RewriteRule`: a pattern tree built from :func:`op`,
:func:`var` and :func:`const`, and a callback that receives the :class:`Match` and returns the
replacement nodes (writing the matched root's output tensors) or ``None`` to decline. The
driver, :func:`apply_rules`, walks the graph in topological order, tries the rules anchored at
each node's op type, splices replacements in, and cleans up what became dead. No fusion
hand-writes its own graph walk.

Example (``x * sigmoid(x)`` -> ``Swish``)::

    x = var("x")
    rule = RewriteRule("swish", op("Mul", x, op("Sigmoid", x)),
                       lambda m, g: [gs.Node("Swish", inputs=[m["x"]], outputs=m.outputs)])
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

if TYPE_CHECKING:
    from mmcompile.ir import Graph

# Binary ops whose two inputs may be swapped when matching.
COMMUTATIVE_OPS = frozenset({"Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Equal"})


# -- helpers shared by passes -------------------------------------------------------------------

def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of ``tensor`` if it is a constant (an initializer or a ``Constant`` node's
    output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        if isinstance(attrs.get("value"), gs.Constant):
            return np.asarray(attrs["value"].values)
        for key in ("value_float", "value_int"):
            if key in attrs:
                return np.asarray(attrs[key])
        for key in ("value_floats", "value_ints"):
            if key in attrs:
                return np.asarray(attrs[key])
    return None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """Nodes that read ``tensor``."""
    return list(tensor.outputs)


def replace_all_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every reader of ``old`` (nodes in subgraphs included) read ``new`` instead."""
    for reader in list(old.outputs):
        for i, tensor in enumerate(reader.inputs):
            if tensor is old:
                reader.inputs[i] = new


def forward_output(node: gs.Node, source: gs.Tensor, graph: Graph) -> bool:
    """Remove ``node`` from the dataflow: readers of its first output read ``source`` instead.

    A graph output keeps its name (it is part of the model's signature): then the producer of
    ``source`` writes the output directly, if ``source`` is an intermediate tensor read only by
    ``node``. Returns False (nothing changed) when that is impossible.
    """
    out = node.outputs[0]
    graph_outputs = {id(t) for t in graph.gs.outputs}
    if id(out) not in graph_outputs:
        replace_all_uses(out, source)
        return True
    graph_inputs = {id(t) for t in graph.gs.inputs}
    writable = (isinstance(source, gs.Variable) and len(source.inputs) == 1
                and id(source) not in graph_inputs and id(source) not in graph_outputs
                and all(reader is node for reader in source.outputs))
    if not writable:
        return False
    producer = source.inputs[0]
    node.outputs.clear()
    index = next(i for i, t in enumerate(producer.outputs) if t is source)
    producer.outputs[index] = out
    return True


_fresh_ids = itertools.count()


def fresh_name(base: str) -> str:
    """A tensor/node name that will not collide with names from exporters."""
    return f"{base}__mmc{next(_fresh_ids)}"


def make_constant(base: str, value: np.ndarray) -> gs.Constant:
    """A new gs.Constant (initializer) with a fresh name."""
    value = np.asarray(value)  # not ascontiguousarray: it turns 0-d scalars into shape (1,)
    return gs.Constant(fresh_name(base), value if value.flags.c_contiguous else value.copy())


def has_input(node: gs.Node, index: int) -> bool:
    """Whether ``node``'s optional input ``index`` is given (present and not the empty name)."""
    return len(node.inputs) > index and bool(node.inputs[index].name)


def axes_of(node: gs.Node) -> np.ndarray | None:
    """The ``axes`` of a Squeeze / Unsqueeze / Reduce* node: an attribute in older opsets,
    input 1 from opset 13 (18 for the reductions); None if absent or not constant."""
    if "axes" in node.attrs:
        return np.asarray(node.attrs["axes"])
    return constant_value(node.inputs[1]) if has_input(node, 1) else None


def has_static_shape(tensor: gs.Tensor) -> bool:
    """Whether every dim of ``tensor`` is a known non-negative integer."""
    return tensor.shape is not None and all(isinstance(d, int) and d >= 0 for d in tensor.shape)


def is_read(graph: Graph, tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` (a node output) is given, and read by a node or as a graph output."""
    return bool(tensor.name) and (bool(tensor.outputs) or tensor in graph.gs.outputs)


class NodeBuilder:
    """Appends replacement nodes (to ``nodes``) with fresh names under ``prefix`` and fresh
    output tensors of ``dtype`` (None: left to shape inference); the last one may write a
    given tensor (``out``: the replaced node's output)."""

    def __init__(self, prefix: str, dtype: np.dtype | None = None):
        self.prefix, self.dtype, self.nodes = prefix, dtype, []

    def __call__(self, op_type: str, inputs: list, attrs: dict | None = None,
                 out: gs.Tensor | None = None, dtype: np.dtype | None = None) -> gs.Tensor:
        out = out if out is not None else gs.Variable(fresh_name(f"{self.prefix}/{op_type}"),
                                                      dtype=dtype or self.dtype)
        self.nodes.append(gs.Node(op_type, name=fresh_name(f"{self.prefix}/{op_type}"),
                                  inputs=inputs, outputs=[out], attrs=attrs or {}))
        return out

    def const(self, tag: str, value) -> gs.Constant:
        return make_constant(f"{self.prefix}/{tag}", np.asarray(value))


# -- patterns -----------------------------------------------------------------------------------

class Pattern:
    """Base of pattern nodes. Use :func:`op`, :func:`var` and :func:`const` to build them."""


@dataclass(frozen=True, eq=False)
class _Var(Pattern):
    name: str | None


@dataclass(frozen=True, eq=False)
class _Const(Pattern):
    name: str | None
    value: float | None
    rtol: float


@dataclass(frozen=True, eq=False)
class _Op(Pattern):
    op_type: str
    inputs: tuple[Pattern, ...]
    name: str | None
    commutative: bool
    where: Callable[[gs.Node], bool] | None
    allow_extra_inputs: bool


def var(name: str | None = None) -> Pattern:
    """Any tensor. A named var binds once: a second use of the name must be the same tensor."""
    return _Var(name)


def const(name: str | None = None, value: float | None = None, rtol: float = 1e-4) -> Pattern:
    """A constant tensor; with ``value``, one whose every element is ``value`` (within rtol)."""
    return _Const(name, value, rtol)


def op(op_type: str, *inputs: Pattern, name: str | None = None, commutative: bool | None = None,
       where: Callable[[gs.Node], bool] | None = None, allow_extra_inputs: bool = False) -> Pattern:
    """A node of ``op_type`` (default ONNX domain) whose inputs match ``inputs``.

    Args:
        name: capture the node as ``match.nodes[name]``.
        commutative: try both input orders (default: True for Add, Mul, Max, ...).
        where: extra predicate on the node (attributes, say).
        allow_extra_inputs: the node may have more inputs than patterns given (optional bias).
    """
    if commutative is None:
        commutative = op_type in COMMUTATIVE_OPS and len(inputs) == 2
    return _Op(op_type, tuple(inputs), name, commutative, where, allow_extra_inputs)


@dataclass
class Match:
    """A successful match: captured tensors, constant values and nodes."""

    root: gs.Node
    tensors: dict[str, gs.Tensor] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: dict[str, gs.Node] = field(default_factory=dict)
    matched: list[gs.Node] = field(default_factory=list)

    def __getitem__(self, name: str) -> gs.Tensor:
        return self.tensors[name]

    @property
    def outputs(self) -> list[gs.Tensor]:
        """The root's output tensors: replacement nodes must write exactly these."""
        return list(self.root.outputs)

    def _copy(self) -> Match:
        return Match(self.root, dict(self.tensors), dict(self.values), dict(self.nodes),
                     list(self.matched))


def _match_tensor(pattern: Pattern, tensor: gs.Tensor, m: Match) -> Iterator[Match]:
    if isinstance(pattern, _Var):
        if pattern.name is None:
            yield m
        elif pattern.name in m.tensors:
            if m.tensors[pattern.name] is tensor:
                yield m
        else:
            m = m._copy()
            m.tensors[pattern.name] = tensor
            yield m
        return
    if isinstance(pattern, _Const):
        value = constant_value(tensor)
        if value is None:
            return
        if pattern.value is not None:
            if value.size == 0 or not np.issubdtype(value.dtype, np.number) or not np.allclose(
                    value.astype(np.float64), pattern.value, rtol=pattern.rtol, atol=1e-7):
                return
        m = m._copy()
        if pattern.name is not None:
            m.tensors[pattern.name] = tensor
            m.values[pattern.name] = value
        yield m
        return
    assert isinstance(pattern, _Op)
    if len(tensor.inputs) != 1:
        return
    yield from _match_node(pattern, tensor.inputs[0], m)


def _match_node(pattern: _Op, node: gs.Node, m: Match) -> Iterator[Match]:
    if node.op != pattern.op_type or node.domain not in (None, "", "ai.onnx"):
        return
    if pattern.name is not None and pattern.name in m.nodes:
        # A named op used twice in one pattern (``Mul(d, d)`` with ``d`` an op) is one node.
        if m.nodes[pattern.name] is node:
            yield m
        return
    if any(node is seen for seen in m.matched):
        return
    n_in = len(node.inputs)
    if n_in < len(pattern.inputs) or (n_in > len(pattern.inputs) and not pattern.allow_extra_inputs):
        return
    if pattern.where is not None and not pattern.where(node):
        return
    m = m._copy()
    m.matched.append(node)
    if pattern.name is not None:
        m.nodes[pattern.name] = node
    orders = [pattern.inputs]
    if pattern.commutative:
        orders.append(pattern.inputs[::-1])
    for order in orders:
        yield from _match_inputs(order, node.inputs[:len(order)], m)


def _match_inputs(patterns: Sequence[Pattern], tensors: Sequence[gs.Tensor],
                  m: Match) -> Iterator[Match]:
    if not patterns:
        yield m
        return
    for m1 in _match_tensor(patterns[0], tensors[0], m):
        yield from _match_inputs(patterns[1:], tensors[1:], m1)


def _is_self_contained(m: Match, graph_outputs: set[str]) -> bool:
    """Interior nodes may only feed nodes of the match, so removing them loses nothing."""
    inside = {id(n) for n in m.matched}
    for node in m.matched:
        if node is m.root:
            continue
        for out in node.outputs:
            if out.name in graph_outputs or any(id(c) not in inside for c in out.outputs):
                return False
    return True


def matches(pattern: Pattern, node: gs.Node, graph: Graph | None = None) -> Iterator[Match]:
    """Every way ``pattern`` matches with ``node`` as root and a self-contained interior
    (commutative inputs in both orders, ...), so a callback that declines one binding can
    still accept another."""
    assert isinstance(pattern, _Op), "a rule's pattern must be rooted at an op()"
    outputs = {t.name for t in graph.gs.outputs} if graph is not None else set()
    for m in _match_node(pattern, node, Match(node)):
        if _is_self_contained(m, outputs):
            yield m


def match(pattern: Pattern, node: gs.Node, graph: Graph | None = None) -> Match | None:
    """The first match of ``pattern`` rooted at ``node``, or None."""
    return next(matches(pattern, node, graph), None)


# -- rules and the driver -----------------------------------------------------------------------

Rewrite = Callable[[Match, "Graph"], "list[gs.Node] | gs.Tensor | None"]


@dataclass(frozen=True)
class RewriteRule:
    """A named pattern and the callback that builds its replacement.

    The callback returns new nodes that write the root's outputs (``match.outputs``), an
    existing tensor that replaces the root's single output (the root becomes a no-op), or None
    to decline this match.
    """

    name: str
    pattern: Pattern
    rewrite: Rewrite

    @property
    def anchor(self) -> str:
        assert isinstance(self.pattern, _Op)
        return self.pattern.op_type


def apply_rules(graph: Graph, rules: Sequence[RewriteRule]) -> collections.Counter:
    """Apply ``rules`` once over the whole graph, in topological order.

    Each node is tried as the root of the rules anchored at its op type, in the order given,
    with every binding of each pattern; the first callback that does not decline wins.
    Replacement nodes write the root's output tensors, so consumers need no rewiring; a returned
    tensor is forwarded to the root's readers (:func:`forward_output`). Dead nodes, including
    any the graph had before, are removed afterwards.

    Returns:
        rule name -> number of rewrites applied.
    """
    by_anchor: dict[str, list[RewriteRule]] = collections.defaultdict(list)
    for rule in rules:
        by_anchor[rule.anchor].append(rule)
    counts: collections.Counter[str] = collections.Counter()
    consumed: set[int] = set()
    graph.gs.toposort()
    for node in list(graph.gs.nodes):
        if id(node) in consumed:
            continue
        for rule in by_anchor.get(node.op, ()):
            m = _first_accepted(rule, node, graph, consumed)
            if m is None:
                continue
            consumed.update(id(n) for n in m.matched)
            counts[rule.name] += 1
            break
    if counts:
        graph.gs.cleanup().toposort()
    return counts


def _first_accepted(rule: RewriteRule, node: gs.Node, graph: Graph,
                    consumed: set[int]) -> Match | None:
    """Apply the first binding of ``rule`` at ``node`` whose callback accepts; its Match."""
    for m in matches(rule.pattern, node, graph):
        if any(id(n) in consumed for n in m.matched):
            continue
        replacement = rule.rewrite(m, graph)
        if replacement is None:
            continue
        if isinstance(replacement, gs.Tensor):
            if not forward_output(node, replacement, graph):
                continue
            return m
        node.outputs.clear()
        graph.gs.nodes.extend(replacement)
        for new in replacement:
            new.name = new.name or fresh_name(f"{rule.name}/{new.op}")
        return m
    return None
