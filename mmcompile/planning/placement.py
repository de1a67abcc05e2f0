"""Placement: which target runs each node.

Per node, first match wins:

1. the user's placement by node name (``placement={"lstm_0": "onnxruntime"}``): the node runs
   there or compiling fails, naming the node and the target's reason;
2. the user's placement by branch (``{"text": "cpu", "image": "cuda"}``; a modality names all
   of its sub-branches ``image.0``, ``image.1``; ``fusion`` the nodes that join them);
3. a branch the planner moved to its target's host (``moves``, chosen by :mod:`.moves` from
   the cost model; never a branch or modality the user placed);
4. the requested target.

A node the chosen target cannot run (its ``supports`` says no, with a reason) goes to that
target's host when it names one (an accelerator's: the ``cpu`` target) and the host runs it,
else to the fallback target; the reason is kept for the report. Without a fallback
(``fallback=None``) that is an :class:`~mmcompile.errors.UnsupportedOpError`. The
capability query is the target's; the grouping of placed nodes into stages is
:mod:`.partition`'s (as torch.fx keeps ``OperatorSupport`` apart from its partitioner).

Two methods of :class:`~mmcompile.target.Target` take part (their defaults change nothing):
``configured(options)``, the instance set up for its checked options that every ``supports``
query of that configuration goes to (one per configuration, so two descriptions of one
accelerator never share state), and ``host(options) -> spec``, the target that runs what it
cannot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmcompile.errors import MMCompileError, UnsupportedOpError
from mmcompile.ir import Graph
from mmcompile.target import Target, TargetSpec, resolve_target


@dataclass
class Choice:
    """A target as placed: its key (the spec as written, e.g. ``cpu{mcpu=znver4}``), the
    target and its checked options."""

    key: str
    target: Target
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return self.target.name


@dataclass
class Placement:
    """The outcome: node -> target key, and why nodes are where they are.

    Attributes:
        nodes: node name -> key of :attr:`choices` (every node of the graph).
        choices: key -> :class:`Choice`; ``primary`` and ``fallback`` name two of them.
        fell_back: node name -> the reason its preferred target gave.
        placed_by_user: node name -> the placement key that put it there.
        hosts: key -> the key of its host target, for the targets that name one.
        moved: node name -> the branch the planner moved to a host (see :mod:`.moves`).
    """

    nodes: dict[str, str]
    choices: dict[str, Choice]
    primary: str
    fallback: str | None
    fell_back: dict[str, str] = field(default_factory=dict)
    placed_by_user: dict[str, str] = field(default_factory=dict)
    hosts: dict[str, str] = field(default_factory=dict)
    moved: dict[str, str] = field(default_factory=dict)

    def fallback_targets(self) -> list[str]:
        """The keys the nodes that fell back went to (hosts and the fallback), in use."""
        used = {self.nodes[n] for n in self.fell_back}
        return sorted(used)


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _choice(spec: str, config: Mapping[str, Any] | None, choices: dict[str, Choice]) -> str:
    """The key of the target ``spec`` (+ ``config``) names: its name with the options that
    differ from their defaults, so one configuration is one key however it was written."""
    target, options = resolve_target(spec, config)
    defaults = {o.name: o.default for o in target.options}
    changed = tuple((k, _text(v)) for k, v in sorted(options.items()) if v != defaults[k])
    key = str(TargetSpec(target.name, changed))
    if key not in choices:
        choices[key] = Choice(key, target.configured(options), options)
    return key


def _host(key: str, choices: dict[str, Choice]) -> str | None:
    """The key of the target that runs what ``key``'s target cannot, if it names one."""
    choice = choices[key]
    spec = choice.target.host(choice.options)
    return _choice(spec, None, choices) if spec else None


def _branch_keys(branch: str) -> tuple[str, ...]:
    """Placement keys that name ``branch``: itself, then its modality (``image.1`` -> image)."""
    modality = branch.split(".")[0]
    return (branch,) if modality == branch else (branch, modality)


def place(graph: Graph, branches: Mapping[str, str], target: str,
          target_config: Mapping[str, Any] | None = None, fallback: str | None = "onnxruntime",
          placement: Mapping[str, str] | None = None,
          moves: Mapping[str, str] | None = None) -> Placement:
    """Give every node of ``graph`` a target.

    Args:
        graph: the optimized graph.
        branches: node -> branch (:func:`~.branches.assign_branches`); nodes it omits (constant
            subgraphs) are placed like the rest.
        target: the requested target, ``name`` or ``name{key=value,...}``.
        target_config: options of the requested target, over those in ``target``.
        fallback: where nodes go that their target cannot run (None: refuse them).
        placement: branch, modality or node name -> target spec, over ``target``.
        moves: branch -> target spec, the planner's choice (:mod:`.moves`), under
            ``placement``.

    Raises:
        TargetError: an unknown target or option.
        MMCompileError: a placement key names neither a node nor a branch.
        UnsupportedOpError: a node no allowed target can run (named, with the reasons).
    """
    choices: dict[str, Choice] = {}
    primary = _choice(target, target_config, choices)
    backup = _choice(fallback, None, choices) if fallback else None
    user = {k: _choice(v, None, choices) for k, v in (placement or {}).items()}
    planner = {k: _choice(v, None, choices) for k, v in (moves or {}).items()}
    names = {node.name for node in graph.gs.nodes}
    known = set(branches.values()) | {b.split(".")[0] for b in branches.values()}
    unknown = sorted(k for k in user if k not in names and k not in known)
    if unknown:
        raise MMCompileError(f"placement names {', '.join(repr(k) for k in unknown)}, neither a "
                             f"node nor a branch of {graph.name}; its branches: "
                             f"{', '.join(sorted(known)) or 'none'}")
    result = Placement({}, choices, primary, backup)
    for key in list(choices):
        host = _host(key, choices)
        if host is not None:
            result.hosts[key] = host
    for node in graph.gs.nodes:
        if node.name in user:  # explicit, per node: it runs there or nowhere
            key = user[node.name]
            support = choices[key].target.supports(node, graph)
            if not support:
                raise UnsupportedOpError(node.op, node.name, f"target '{key}' (placed there "
                                         f"by name)", support.reason)
            result.nodes[node.name] = key
            result.placed_by_user[node.name] = node.name
            continue
        branch = branches.get(node.name)
        by_branch = next((k for k in _branch_keys(branch) if k in user), None) if branch else None
        key = user[by_branch] if by_branch else planner.get(branch, primary)
        support = choices[key].target.supports(node, graph)
        if by_branch:
            result.placed_by_user[node.name] = by_branch
        elif branch in planner:
            result.moved[node.name] = branch
        if support:
            result.nodes[node.name] = key
            continue
        host = result.hosts.get(key)
        if host is not None and choices[host].target.supports(node, graph):
            result.nodes[node.name] = host
            result.fell_back[node.name] = f"{choices[key].name}: {support.reason}"
            continue
        if backup is None:
            raise UnsupportedOpError(node.op, node.name, f"target '{key}'", support.reason
                                     + " (no fallback target: fallback=None / --fallback none)")
        second = choices[backup].target.supports(node, graph)
        if not second:
            raise UnsupportedOpError(node.op, node.name, f"target '{key}' and fallback "
                                     f"'{backup}'", f"{support.reason}; {second.reason}")
        result.nodes[node.name] = backup
        result.fell_back[node.name] = f"{choices[key].name}: {support.reason}"
    return result
