"""The parallel schedule of a stage DAG: which lane runs each stage, with how many threads.

Critical-path list scheduling. Independent stages (the modality branches: no inputs from other
stages) are placed longest-first on the least loaded of ``min(cores, branches)`` cpu lanes,
each with an equal share of the cores (the rest to the busiest); a root stage on a device
(``cuda``) goes to that device's lane instead, which takes no cores from the cpu lanes. Stages
with dependencies (the fusion) then run on the calling thread with every core, as soon as
their inputs are ready: they are on the critical path, and splitting cores there would only
slow them down.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mmcompile.schedule import Schedule


def critical_path_ms(order: Sequence[str], deps: Mapping[str, Sequence[str]],
                     cost: Mapping[str, float]) -> float:
    """Longest dependency chain, each stage at its (full-core) cost."""
    finish: dict[str, float] = {}
    for stage in order:
        finish[stage] = max((finish[d] for d in deps[stage]), default=0.0) + cost[stage]
    return max(finish.values(), default=0.0)


def plan_parallel(order: Sequence[str], deps: Mapping[str, Sequence[str]],
                  cost: Mapping[str, float], cores: int,
                  slowdown: Callable[[int], float] | None = None,
                  devices: Mapping[str, str] | None = None) -> Schedule:
    """Critical-path list scheduling of the stage DAG (see the module docstring).

    Args:
        order, deps: the stages in topological order and each one's input stages.
        cost: each stage's time in ms with every core.
        cores: cores to split between the cpu lanes.
        slowdown: how much longer work takes with ``k`` threads than with ``cores`` (measured
            by ``auto``); default ``cores / k``, perfect scaling, under which splitting the
            cores never beats running the branches one after another.
        devices: stage -> the device its target runs on (``cpu`` when absent).

    Returns:
        A ``parallel`` :class:`Schedule`, or ``sequential`` when fewer than two lanes would
        have work.
    """
    devices = devices or {}
    roots = [s for s in order if not deps[s]]
    on_device = [s for s in roots if devices.get(s, "cpu") != "cpu"]
    on_cpu = [s for s in roots if s not in on_device]
    device_lanes = sorted({devices[s] for s in on_device})
    n_workers = max(1, min(cores, len(on_cpu))) if on_cpu else 0
    bound = critical_path_ms(order, deps, cost)
    if n_workers + len(device_lanes) < 2:
        return Schedule("sequential", estimate_ms=sum(cost.values()), bound_ms=bound)
    workers: list[list[str]] = [[] for _ in range(n_workers)]
    work = [0.0] * n_workers  # full-core ms placed on each cpu lane
    for stage in sorted(on_cpu, key=lambda s: -cost[s]):
        w = int(np.argmin(work))
        workers[w].append(stage)
        work[w] += cost[stage]
    threads = [max(1, cores // n_workers)] * n_workers
    if n_workers:
        threads[int(np.argmax(work))] += cores - sum(threads)
    slowdown = slowdown or (lambda k: cores / k)
    busy = [w * slowdown(t) for w, t in zip(work, threads)]
    for device in device_lanes:  # one driver thread per device; its stages in DAG order
        stages = [s for s in on_device if devices[s] == device]
        workers.append(stages)
        threads.append(1)
        busy.append(sum(cost[s] for s in stages))
    tail = sum(cost[s] for s in order if deps[s])
    return Schedule("parallel", workers, threads, ["cpu"] * n_workers + device_lanes,
                    max(busy) + tail, bound)


def replan(model, kind: str, threads: int = 0) -> Schedule:
    """A schedule of ``kind`` for a compiled ``model``'s stages, from the costs recorded at
    compile time (1 ms each where none was)."""
    from mmcompile.schedule import available_cores, check_kind
    if check_kind(kind) != "parallel":
        return Schedule("sequential")
    order = [s.name for s in model.stages]
    deps = {s.name: s.depends_on for s in model.stages}
    costs = {s.name: float(s.info.get("cost_ms", 1.0)) for s in model.stages}
    return plan_parallel(order, deps, costs, threads or available_cores(),
                         devices={s.name: s.device for s in model.stages})
