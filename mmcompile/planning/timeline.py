"""The modelled clock: a run replayed with each stage at its modelled or measured time.

A stage whose target models its own time (``modelled_ms`` in its info: the accelerator's
cycle model) runs on the host as a simulation, whose time says nothing about the hardware's.
On the modelled clock it takes its modelled time on a lane of its device (``accel lane``);
every other stage takes its measured time on the lane it ran on (the caller, a worker). The
stages are replayed in the run's order, each starting when its lane is free and the stages
it reads from have ended, so host work that does not wait for an accelerator stage runs
beside it, as it would with the accelerator driven asynchronously. The planner orders the
stages of such a model for this clock (:func:`list_schedule`): a lane never idles while a
stage it could run is ready, and a run in that order replays to the planned latency.

Used by ``mmcompile run --timeline`` (:func:`modelled_timeline`) and by :mod:`.moves`, which
weighs placements by the latency on this clock (:func:`modelled_latency_ms`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mmcompile.runtime import CompiledModel, Stage

CALLER = "caller"  # the lane of a sequential schedule (the runtime's name for it)


@dataclass(frozen=True)
class Slot:
    """One stage to replay: its lane, how long it takes, the stages it waits for."""

    stage: str
    lane: str
    duration_ms: float
    deps: tuple[str, ...] = ()


def replay(slots: Sequence[Slot]) -> dict[str, tuple[float, float]]:
    """Stage -> (start, end) in ms on one clock: each slot, in the order given, starts when
    its lane is free and its dependencies (those among ``slots``) have ended."""
    ends: dict[str, float] = {}
    free: dict[str, float] = {}
    times = {}
    for slot in slots:
        start = max([free.get(slot.lane, 0.0), *(ends[d] for d in slot.deps if d in ends)])
        ends[slot.stage] = free[slot.lane] = start + slot.duration_ms
        times[slot.stage] = (start, start + slot.duration_ms)
    return times


def list_schedule(slots: Sequence[Slot]) -> list[str]:
    """An order of ``slots`` for :func:`replay` that keeps the lanes busy: list scheduling,
    each step the ready slot (its dependencies placed) that can start earliest, the one
    with the longest path to the end of the run first among equals. (``slots`` must be in a
    dependency order; a lane runs its slots in the order returned.)"""
    by_name = {s.stage: s for s in slots}
    users: dict[str, list[str]] = {s.stage: [] for s in slots}
    for slot in slots:
        for dep in slot.deps:
            if dep in users:
                users[dep].append(slot.stage)
    tail: dict[str, float] = {}  # longest path from a slot's start to the end of the run
    for slot in reversed(slots):
        tail[slot.stage] = slot.duration_ms + max((tail[u] for u in users[slot.stage]),
                                                  default=0.0)
    index = {s.stage: i for i, s in enumerate(slots)}
    ends: dict[str, float] = {}
    free: dict[str, float] = {}
    order: list[str] = []
    waiting = list(slots)
    while waiting:
        starts = {s.stage: max([free.get(s.lane, 0.0), *(ends[d] for d in s.deps if d in ends)])
                  for s in waiting if all(d in ends or d not in by_name for d in s.deps)}
        name = min(starts, key=lambda n: (starts[n], -tail[n], index[n]))
        slot = by_name[name]
        ends[name] = free[slot.lane] = starts[name] + slot.duration_ms
        order.append(name)
        waiting.remove(slot)
    return order


def modelled_ms(stage: Stage | None) -> float | None:
    """The time ``stage``'s target models for it, or None (a measured stage, a copy)."""
    value = stage.info.get("modelled_ms") if stage is not None else None
    return None if value is None else float(value)


def device_lane(stage: Stage) -> str:
    """The lane a modelled stage takes on the modelled clock (``accel lane``)."""
    return f"{stage.device} lane"


def modelled_latency_ms(stages: Sequence[Stage], costs: Mapping[str, float]
                        ) -> tuple[float, list[str]]:
    """One run's latency on the modelled clock for a sequential schedule: the host's stages
    one after another on the caller, each modelled stage on its device's lane, in the order
    :func:`list_schedule` gives (a sequential run in that order replays to this latency).

    Args:
        stages: the model's stages in a dependency order.
        costs: stage name -> its time in ms (measured, or modelled where the target models
            it: :func:`~.costs.stage_costs` gives both).

    Returns:
        ``(latency_ms, order)``: the order is the stage names as they should run.
    """
    slots = [Slot(s.name, device_lane(s) if modelled_ms(s) is not None else CALLER,
                  float(costs[s.name]), tuple(s.depends_on)) for s in stages]
    order = list_schedule(slots)
    by_name = {s.stage: s for s in slots}
    times = replay([by_name[name] for name in order])
    return max((end for _, end in times.values()), default=0.0), order


def modelled_timeline(model: CompiledModel, feeds: Mapping[str, Any], runs: int = 3
                      ) -> list[dict[str, Any]]:
    """One run of ``model`` on the modelled clock (see the module docstring), replayed in
    :meth:`~mmcompile.runtime.CompiledModel.profile`'s order, each measured time the median
    of ``runs`` profiled runs.

    Returns:
        Entries as ``profile``'s (``stage``, ``target``, ``lane``, ``start_ms``,
        ``end_ms``), by start time, with ``modelled`` set on the modelled ones.

    Raises:
        InputError: bad ``feeds`` (as :meth:`~mmcompile.runtime.CompiledModel.run`).
    """
    profiles = [model.profile(feeds) for _ in range(max(1, runs))]
    measured = {e["stage"]: float(np.median([
        next(x["end_ms"] - x["start_ms"] for x in p if x["stage"] == e["stage"])
        for p in profiles])) for e in profiles[0]}
    by_name = {s.name: s for s in model.stages}
    slots, entries = [], []
    for entry in profiles[0]:
        stage = by_name.get(entry["stage"])  # None: a copy between memories
        modelled = modelled_ms(stage)
        lane = device_lane(stage) if modelled is not None else entry["lane"]
        duration = modelled if modelled is not None else measured[entry["stage"]]
        slots.append(Slot(entry["stage"], lane, duration,
                          tuple(stage.depends_on) if stage is not None else ()))
        entries.append({**entry, "lane": lane, "modelled": modelled is not None})
    times = replay(slots)
    out = [{**e, "start_ms": times[e["stage"]][0], "end_ms": times[e["stage"]][1]}
           for e in entries]
    return sorted(out, key=lambda e: e["start_ms"])
