"""The pass manager: resolves a pipeline against the registry and runs it on a graph.

Resolution happens once, before any pass runs, so that an unknown pass, a bad option or a cycle
of requirements fails fast. Running records one :class:`PassRecord` per pass invocation; any
exception from a pass is re-raised as a :class:`PassError` naming the pass, the passes before it
and the node if known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import networkx as nx

from mmcompile.errors import MMCompileError, PassError, PipelineError, VerificationError
from mmcompile.ir import Graph
from mmcompile.transform.context import PassContext
from mmcompile.transform.pass_base import Pass, PassResult, get_pass
from mmcompile.transform.pipeline import Fixpoint, PassSpec, Pipeline, parse_pipeline


@dataclass
class PassRecord:
    """One invocation of a pass."""

    name: str
    changed: bool
    stats: dict[str, int] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    seconds: float = 0.0
    round: int | None = None  # fixed-point round (1-based), None outside fixpoint groups
    skipped: str | None = None  # why the pass did not run ("disabled", "opt_level 2 > 1")


def _check_requirement_cycles(names: list[str]) -> None:
    dag = nx.DiGraph()
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for req in get_pass(name).requires:
            dag.add_edge(name, req)
            todo.append(req)
    try:
        cycle = nx.find_cycle(dag)
    except nx.NetworkXNoCycle:
        return
    path = " -> ".join([edge[0] for edge in cycle] + [cycle[0][0]])
    raise PipelineError(f"passes have a cycle of requirements: {path}")


def _with_requirements(items: tuple[PassSpec, ...], done: set[str]) -> list[PassSpec]:
    """Insert each pass's missing requirements just before it (depth-first, in order)."""
    out: list[PassSpec] = []

    def add(spec: PassSpec) -> None:
        for req in get_pass(spec.name).requires:
            if req not in done:
                add(PassSpec(req))
        out.append(spec)
        done.add(spec.name)

    for spec in items:
        add(spec)
    return out


def resolve_pipeline(pipeline: str | Pipeline) -> Pipeline:
    """Parse, check every name and option, and insert missing required passes.

    Raises:
        PipelineError: unknown pass, bad option, or a cycle of requirements.
    """
    pipeline = parse_pipeline(pipeline)
    names = pipeline.pass_names()
    for item in pipeline.items:
        for spec in (item.items if isinstance(item, Fixpoint) else (item,)):
            get_pass(spec.name)(**dict(spec.options))  # validates name and options
    _check_requirement_cycles(names)
    done: set[str] = set()
    items: list[PassSpec | Fixpoint] = []
    for item in pipeline.items:
        if isinstance(item, Fixpoint):
            items.append(Fixpoint(tuple(_with_requirements(item.items, done)), item.max_iterations))
        else:
            items.extend(_with_requirements((item,), done))
    return Pipeline(tuple(items))


class PassManager:
    """Runs a pipeline of registered passes on a :class:`Graph`, in place.

    Args:
        pipeline: pipeline text (``"fold-constants,eliminate-dead-code"``) or a Pipeline.
        ctx: the PassContext; a default one if omitted.

    Raises:
        PipelineError: at construction, for an invalid pipeline.
    """

    def __init__(self, pipeline: str | Pipeline, ctx: PassContext | None = None):
        self.pipeline = resolve_pipeline(pipeline)
        self.ctx = ctx or PassContext()

    def run(self, graph: Graph) -> list[PassRecord]:
        """Run every pass; returns the records. Raises PassError if a pass fails."""
        records: list[PassRecord] = []
        for instrument in self.ctx.instruments:
            instrument.enter(self.ctx)
        try:
            for item in self.pipeline.items:
                if isinstance(item, Fixpoint):
                    self._run_fixpoint(graph, item, records)
                else:
                    records.append(self._run_one(graph, item, records, None))
        finally:
            for instrument in self.ctx.instruments:
                instrument.exit(self.ctx)
        return records

    def _run_fixpoint(self, graph: Graph, group: Fixpoint, records: list[PassRecord]) -> None:
        for round_ in range(1, group.max_iterations + 1):
            changed = False
            for spec in group.items:
                record = self._run_one(graph, spec, records, round_)
                records.append(record)
                changed |= record.changed
            if not changed:
                return

    def _run_one(self, graph: Graph, spec: PassSpec, records: list[PassRecord],
                 round_: int | None) -> PassRecord:
        pass_ = get_pass(spec.name)(**dict(spec.options))
        skipped = None
        if spec.name in self.ctx.disabled_passes:
            skipped = "disabled"
        elif pass_.opt_level > self.ctx.opt_level:
            skipped = f"opt_level {pass_.opt_level} > {self.ctx.opt_level}"
        if skipped:
            return PassRecord(spec.name, False, nodes_before=graph.num_nodes,
                              nodes_after=graph.num_nodes, round=round_, skipped=skipped)
        previous = [r.name for r in records if r.skipped is None]
        nodes_before = graph.num_nodes
        for instrument in self.ctx.instruments:
            instrument.before_pass(graph, pass_)
        start = time.perf_counter()
        result = self._invoke(graph, pass_, previous)
        seconds = time.perf_counter() - start
        if self.ctx.verify_each:
            try:
                graph.verify()
            except VerificationError as exc:
                raise PassError(spec.name, previous, f"produced an invalid graph: {exc}",
                                node=exc.node) from exc
        for instrument in self.ctx.instruments:
            instrument.after_pass(graph, pass_, result)
        return PassRecord(spec.name, result.changed, dict(result.stats), nodes_before,
                          graph.num_nodes, seconds, round_)

    def _invoke(self, graph: Graph, pass_: Pass, previous: list[str]) -> PassResult:
        try:
            result = pass_.run(graph, self.ctx)
        except PassError:
            raise
        except MMCompileError as exc:
            raise PassError(pass_.name, previous, str(exc), node=getattr(exc, "node", None)) from exc
        except Exception as exc:  # a bug or a dependency failure inside the pass
            raise PassError(pass_.name, previous, f"{type(exc).__name__}: {exc}",
                            node=getattr(exc, "node", None)) from exc
        if not isinstance(result, PassResult):
            raise PassError(pass_.name, previous,
                            f"returned {type(result).__name__}, expected PassResult")
        return result
