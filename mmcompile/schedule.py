"""Branch-parallel scheduling: which worker runs each stage, with how many threads.

The cost model is the stage times measured on the example inputs at compile time (or, when
measuring is off, an estimate from FLOPs and bytes). The parallel schedule is critical-path list
scheduling: independent stages (the modality branches) are placed longest-first on the least
loaded of ``min(cores, branches)`` long-lived workers, each given an equal share of the cores
(the rest to the busiest); a stage with dependencies (the fusion) goes to the worker that
finishes its last input. ``auto`` measures the sequential and the parallel schedule of the same
compiled stages and keeps the faster.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmcompile.errors import MMCompileError

SCHEDULES = ("auto", "sequential", "parallel")


@dataclass
class Schedule:
    """Where and how stages run.

    Attributes:
        kind: ``sequential`` (one after another on the calling thread, all cores each) or
            ``parallel`` (long-lived workers, cores split between them).
        workers: for parallel: one list of stage names per worker, in execution order.
        threads: for parallel: threads per worker.
        estimate_ms: predicted wall time of one run; ``bound_ms``: the critical-path bound.
        measured_ms: wall time measured for each candidate schedule when ``auto`` chose.
    """

    kind: str
    workers: list[list[str]] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    estimate_ms: float = 0.0
    bound_ms: float = 0.0
    measured_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "workers": self.workers, "threads": self.threads,
                "estimate_ms": round(self.estimate_ms, 3), "bound_ms": round(self.bound_ms, 3),
                "measured_ms": {k: round(v, 3) for k, v in self.measured_ms.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        return cls(data["kind"], [list(w) for w in data.get("workers", [])],
                   list(data.get("threads", [])), data.get("estimate_ms", 0.0),
                   data.get("bound_ms", 0.0), dict(data.get("measured_ms", {})))


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_kind(kind: str) -> str:
    if kind not in SCHEDULES:
        raise MMCompileError(f"unknown schedule '{kind}'; expected one of {', '.join(SCHEDULES)}")
    return kind


def estimate_cost_ms(graph, gflops_per_s: float = 20.0, gbytes_per_s: float = 10.0) -> float:
    """Roofline-style estimate of a stage's time from its FLOPs (see
    :func:`mmcompile.flops.node_flops`) and the bytes of the tensors it writes (used when
    stage times are not measured)."""
    from mmcompile.flops import node_flops
    flops, nbytes = 0.0, 0.0
    for node in graph.gs.nodes:
        flops += node_flops(node) or 0
        for out in node.outputs:
            if out.shape is not None and all(isinstance(d, int) and d >= 0 for d in out.shape):
                nbytes += 4.0 * float(np.prod(out.shape))
    return 1e3 * (flops / (gflops_per_s * 1e9) + nbytes / (gbytes_per_s * 1e9))


def critical_path_ms(order: Sequence[str], deps: Mapping[str, Sequence[str]],
                     cost: Mapping[str, float]) -> float:
    """Longest dependency chain, each stage at its (full-core) cost."""
    finish: dict[str, float] = {}
    for stage in order:
        finish[stage] = max((finish[d] for d in deps[stage]), default=0.0) + cost[stage]
    return max(finish.values(), default=0.0)


def plan_parallel(order: Sequence[str], deps: Mapping[str, Sequence[str]],
                  cost: Mapping[str, float], cores: int,
                  slowdown: Callable[[int], float] | None = None) -> Schedule:
    """Critical-path list scheduling of the stage DAG.

    Independent stages (no inputs from other stages: the branches) go longest-first onto the
    least loaded of ``min(cores, branches)`` workers, each with an equal share of the cores.
    Stages with dependencies (the fusion) then run on the calling thread with every core, as
    soon as their inputs are ready: they are on the critical path, and splitting cores there
    would only slow them down.

    Args:
        order, deps: the stages in topological order and each one's input stages.
        cost: each stage's time in ms with every core.
        cores: cores to split between the workers.
        slowdown: how much longer work takes with ``k`` threads than with ``cores`` (measured
            by ``auto``); default ``cores / k``, perfect scaling, under which splitting the
            cores never beats running the branches one after another.
    """
    roots = [s for s in order if not deps[s]]
    n_workers = max(1, min(cores, len(roots)))
    bound = critical_path_ms(order, deps, cost)
    if n_workers == 1:
        return Schedule("sequential", estimate_ms=sum(cost.values()), bound_ms=bound)
    workers: list[list[str]] = [[] for _ in range(n_workers)]
    work = [0.0] * n_workers  # full-core ms placed on each worker
    for stage in sorted(roots, key=lambda s: -cost[s]):
        w = int(np.argmin(work))
        workers[w].append(stage)
        work[w] += cost[stage]
    threads = [max(1, cores // n_workers)] * n_workers
    threads[int(np.argmax(work))] += cores - sum(threads)
    slowdown = slowdown or (lambda k: cores / k)
    busy = [w * slowdown(t) for w, t in zip(work, threads)]
    tail = sum(cost[s] for s in order if deps[s])
    return Schedule("parallel", workers, threads, max(busy) + tail, bound)
