"""A schedule: which lane runs each stage, with how many threads. The runtime executes it;
:mod:`mmcompile.planning` makes it.

A lane is a long-lived worker thread with a device: ``cpu`` lanes split the cores between them;
a device lane (``cuda``) is the thread that drives that device's stages. Stages no lane holds
run on the calling thread afterwards, in order, with every core.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmcompile.errors import MMCompileError

SCHEDULES = ("auto", "sequential", "parallel")


@dataclass
class Schedule:
    """Where and how stages run.

    Attributes:
        kind: ``sequential`` (one after another on the calling thread, all cores each) or
            ``parallel`` (long-lived lanes, cores split between the cpu ones).
        workers: for parallel: one list of stage names per lane, in execution order.
        threads: for parallel: threads per lane.
        devices: for parallel: each lane's device (``cpu``, ``cuda``); all ``cpu`` if empty.
        estimate_ms: predicted wall time of one run; ``bound_ms``: the critical-path bound.
        measured_ms: wall time measured for each candidate schedule when ``auto`` chose.
    """

    kind: str
    workers: list[list[str]] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    estimate_ms: float = 0.0
    bound_ms: float = 0.0
    measured_ms: dict[str, float] = field(default_factory=dict)

    def lane_devices(self) -> list[str]:
        """Each lane's device (``cpu`` where none was recorded)."""
        return self.devices or ["cpu"] * len(self.workers)

    def lane_names(self) -> list[str]:
        """``worker 0``, ``worker 1``, ``cuda 0``: how reports and timelines name the lanes."""
        counts: dict[str, int] = {}
        names = []
        for device in self.lane_devices():
            label = "worker" if device == "cpu" else device
            names.append(f"{label} {counts.get(label, 0)}")
            counts[label] = counts.get(label, 0) + 1
        return names

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "workers": self.workers, "threads": self.threads,
                "devices": self.devices,
                "estimate_ms": round(self.estimate_ms, 3), "bound_ms": round(self.bound_ms, 3),
                "measured_ms": {k: round(v, 3) for k, v in self.measured_ms.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        return cls(data["kind"], [list(w) for w in data.get("workers", [])],
                   list(data.get("threads", [])), list(data.get("devices", [])),
                   data.get("estimate_ms", 0.0), data.get("bound_ms", 0.0),
                   dict(data.get("measured_ms", {})))


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.cache
def cpu_info() -> dict[str, Any]:
    """This host's CPU as ``/proc/cpuinfo`` names it: ``{"model": name, "flags": frozenset of
    feature flags}`` (empty where there is no such file); read once per process."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
                if model and flags:
                    break
    except OSError:
        pass
    return {"model": model, "flags": flags}


def check_kind(kind: str) -> str:
    if kind not in SCHEDULES:
        raise MMCompileError(f"unknown schedule '{kind}'; expected one of {', '.join(SCHEDULES)}")
    return kind
