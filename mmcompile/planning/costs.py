"""Stage costs: what the parallel schedule is planned from.

Measured on the example inputs at compile time when possible (the median of profiled runs),
else estimated from a stage's FLOPs and the bytes it writes, roofline style. A stage whose
target models its own time (``modelled_ms`` in its info: the accelerator's cycle model)
costs that, measured or not: on the host it runs as a simulation, whose time says nothing
about the hardware's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from mmcompile.planning.partition import StagePlan
from mmcompile.runtime import CompiledModel
from mmcompile.schedule import Schedule


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


def modelled_costs(compiled: CompiledModel) -> dict[str, float]:
    """Stage name -> the time its target's own model gives (``modelled_ms``), where it has
    one."""
    return {s.name: float(s.info["modelled_ms"]) for s in compiled.stages
            if s.info.get("modelled_ms") is not None}


def best_stage_times(compiled: CompiledModel, feeds: Mapping[str, np.ndarray],
                     blocks: int = 5, runs: int = 3, warm_s: float = 0.25) -> dict[str, float]:
    """Each stage's time in ms run one after another with every core: the best of
    ``blocks`` medians of ``runs`` profiled runs, after ``warm_s`` of warm-up (a freshly
    compiled stage runs slower for its first calls; a burst of load on a shared machine
    spoils a block, not the figure). For decisions between placements, where one noisy
    stage time could flip the choice."""
    schedule, compiled.schedule = compiled.schedule, Schedule("sequential")
    try:
        deadline = time.perf_counter() + warm_s
        for _ in range(100):
            compiled.run(feeds)
            if time.perf_counter() > deadline:
                break
        best = {s.name: float("inf") for s in compiled.stages}
        for _ in range(blocks):
            samples: dict[str, list[float]] = {name: [] for name in best}
            for _ in range(runs):
                for entry in compiled.profile(feeds):
                    if entry["stage"] in samples:  # not the copies between memories
                        samples[entry["stage"]].append(entry["end_ms"] - entry["start_ms"])
            for name, values in samples.items():
                best[name] = min(best[name], float(np.median(values)))
    finally:
        compiled.schedule = schedule
    return best


def stage_costs(compiled: CompiledModel, plans: Sequence[StagePlan],
                feeds: Mapping[str, np.ndarray], measure: bool) -> dict[str, float]:
    """Each stage's time in ms with every core: measured on ``feeds`` (median of 4 profiled
    runs after one) or estimated from FLOPs and bytes; also recorded as ``cost_ms`` in the
    stage's info."""
    if measure:
        samples: dict[str, list[float]] = {s.name: [] for s in compiled.stages}
        schedule, compiled.schedule = compiled.schedule, Schedule("sequential")
        for _ in range(5):
            for entry in compiled.profile(feeds):
                if entry["stage"] in samples:  # not the copies between memories
                    samples[entry["stage"]].append(entry["end_ms"] - entry["start_ms"])
        compiled.schedule = schedule
        costs = {name: float(np.median(v[1:])) for name, v in samples.items()}
    else:
        costs = {plan.name: estimate_cost_ms(plan.graph) for plan in plans}
    # Planned from the figures the artifact records, so that a load that replans from them
    # places the stages exactly as compiled (unrounded, near-equal branches could swap).
    costs.update(modelled_costs(compiled))
    costs = {name: round(value, 4) for name, value in costs.items()}
    for stage in compiled.stages:
        stage.info["cost_ms"] = costs[stage.name]
    return costs
