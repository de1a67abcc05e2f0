"""``mmcompile.optimize``: run a pipeline on a graph and report what each pass did."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mmcompile.ir import Graph
from mmcompile.report import format_table
from mmcompile.transform import PassContext, PassManager, PassRecord, Pipeline


@dataclass
class OptimizeResult:
    """The optimized graph, the per-pass records, and op counts before and after."""

    graph: Graph
    pipeline: Pipeline
    records: list[PassRecord]
    ops_before: collections.Counter
    ops_after: collections.Counter

    @property
    def nodes_before(self) -> int:
        return sum(self.ops_before.values())

    @property
    def nodes_after(self) -> int:
        return sum(self.ops_after.values())

    def pass_table(self) -> str:
        """One row per pass (fixed-point rounds summed): runs, changed, counters, nodes, time."""
        rows = []
        for name, recs in _group_by_name(self.records):
            ran = [r for r in recs if r.skipped is None]
            stats: collections.Counter[str] = collections.Counter()
            for r in ran:
                stats.update(r.stats)
            counters = " ".join(f"{k}={v}" for k, v in stats.items() if v) or "-"
            delta = sum(r.nodes_after - r.nodes_before for r in ran)
            rows.append((name, len(ran) if ran else recs[0].skipped, "yes" if any(r.changed for r in ran)
                         else "no", f"{delta:+d}", f"{sum(r.seconds for r in ran) * 1e3:.1f}", counters))
        return format_table(["pass", "runs", "changed", "nodes", "ms", "counters"], rows)

    def op_table(self) -> str:
        """Op types whose count changed (and the total), before -> after."""
        ops = sorted(set(self.ops_before) | set(self.ops_after),
                     key=lambda o: (-self.ops_before.get(o, 0), o))
        rows = [(o, self.ops_before.get(o, 0), self.ops_after.get(o, 0),
                 f"{self.ops_after.get(o, 0) - self.ops_before.get(o, 0):+d}")
                for o in ops if self.ops_before.get(o, 0) != self.ops_after.get(o, 0)]
        rows.append(("TOTAL", self.nodes_before, self.nodes_after,
                     f"{self.nodes_after - self.nodes_before:+d}"))
        return format_table(["op", "before", "after", "delta"], rows)

    def report(self) -> str:
        """Both tables, for ``mmcompile optimize --report``."""
        return (f"pipeline: {self.pipeline}\n\n{self.pass_table()}\n\n{self.op_table()}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (``--json``)."""
        return {
            "pipeline": str(self.pipeline),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "ops_before": dict(self.ops_before),
            "ops_after": dict(self.ops_after),
            "passes": [{"name": r.name, "round": r.round, "changed": r.changed, "stats": r.stats,
                        "nodes_before": r.nodes_before, "nodes_after": r.nodes_after,
                        "seconds": round(r.seconds, 6), "skipped": r.skipped}
                       for r in self.records],
        }


def _group_by_name(records: Iterable[PassRecord]) -> list[tuple[str, list[PassRecord]]]:
    groups: dict[str, list[PassRecord]] = {}
    for r in records:
        groups.setdefault(r.name, []).append(r)
    return list(groups.items())


def optimize(graph: Graph, passes: str | Pipeline = "default", *, ctx: PassContext | None = None,
             inplace: bool = False) -> OptimizeResult:
    """Run a pass pipeline on ``graph``.

    Args:
        graph: the graph to optimize (copied first unless ``inplace``).
        passes: pipeline text such as ``"default"`` or ``"fold-constants,eliminate-dead-code"``,
            or a parsed :class:`Pipeline`.
        ctx: opt level, disabled passes, config, instruments, verify-after-each-pass.
        inplace: edit ``graph`` itself instead of a copy.

    Returns:
        :class:`OptimizeResult` with the optimized graph and a per-pass report.

    Raises:
        PipelineError: unknown pass or option, bad syntax, cycle of requirements.
        PassError: a pass failed (naming the pass, the passes before it and the node).
    """
    manager = PassManager(passes, ctx)
    work = graph if inplace else graph.copy()
    before = work.op_counts()
    records = manager.run(work)
    return OptimizeResult(work, manager.pipeline, records, before, work.op_counts())
