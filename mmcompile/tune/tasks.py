"""Tuning tasks: one per distinct kernel of the model, merged across stages, and the choice of
which ones are worth trials.

A target's tuner extracts tasks stage by stage (each stage is compiled on its own, so a kernel
is tuned in the form that stage compiles it to). The same kernel in two stages (two encoder
branches with equal shapes) or in two models that share a database is one task: its key is a
structural hash, confirmed with the tuner's structural-equality check, and its weight is the
number of calls across the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Task:
    """A kernel to tune.

    Attributes:
        key: structural hash (hex), the task's id in the database meta file.
        name: a readable name (``fused_conv2d_add_relu``).
        weight: calls per model run, summed over stages.
        payload: the target's representation (TVM: the PrimFunc's IRModule).
        stages: the stages that call it.
        default: fingerprint of the schedule the target gives it untuned; when a newer
            mmcompile changes it, the untuned time in the database is stale.
    """

    key: str
    name: str
    weight: float
    payload: Any = field(repr=False)
    stages: list[str] = field(default_factory=list)
    default: str = ""


def merge(per_stage: Sequence[tuple[str, Sequence[Task]]],
          same: Callable[[Any, Any], bool]) -> list[Task]:
    """One task per distinct kernel, in first-seen order, weights summed over stages.

    A hash collision between different kernels (``same`` false) keeps both, the second with
    a suffixed key.
    """
    merged: dict[str, Task] = {}
    for stage, tasks in per_stage:
        for task in tasks:
            key = task.key
            while key in merged and not same(merged[key].payload, task.payload):
                key += "'"
            if key in merged:
                merged[key].weight += task.weight
                if stage not in merged[key].stages:
                    merged[key].stages.append(stage)
            else:
                merged[key] = Task(key, task.name, task.weight, task.payload, [stage],
                                   task.default)
    return list(merged.values())


def select(tasks: Sequence[Task], untuned_ms: Mapping[str, float | None],
           min_share: float) -> tuple[list[Task], list[Task]]:
    """Split tasks into (worth tuning, costliest first; skipped). Skipped: a task below
    ``min_share`` of the model's untuned time (``weight * untuned_ms`` over the sum), and a
    task whose default schedule could not be measured.

    Why: a transformer block has tens of reshapes and transposes costing microseconds, and
    MetaSchedule's first pass gives every task a full batch of trials before any gradient is
    known; skipping them leaves that time to the matmuls and convolutions. A kernel that
    fails on random inputs (a gather reading int64 indices: out of bounds, the runner
    process crashes) would fail every trial too, each costing a runner restart (~6 s).
    """
    cost = {t.key: t.weight * untuned_ms[t.key] for t in tasks if untuned_ms.get(t.key)}
    total = sum(cost.values())
    keep = [t for t in tasks if t.key in cost and cost[t.key] >= min_share * total]
    skipped = [t for t in tasks if t not in keep]
    keep.sort(key=lambda t: -cost[t.key])  # the first pass reaches the costly kernels first
    return keep, skipped
