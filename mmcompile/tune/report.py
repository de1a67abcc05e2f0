"""The end-of-job report: per kernel, untuned vs tuned time and trials; for the model, the
latency compiled without and with the database."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmcompile.report import format_table
from mmcompile.tune.progress import TaskStat, fmt_duration


@dataclass
class TuneReport:
    """What a tuning job did.

    Attributes:
        db: database folder; ``sha256`` its digest after the job (what artifacts record).
        job: the job entry of the database meta (trials, budget, status, stop reason).
        trials: trials measured by this call; ``seconds``: its wall time.
        rows: one dict per kernel: name, calls, untuned_ms, tuned_ms, trials, status.
        model_ms: ``{"untuned": ms, "tuned": ms, "hits": n}`` when the model was measured.
        notes: repairs made to the database and target warnings.
    """

    db: str
    job: dict[str, Any]
    trials: int
    seconds: float
    stats: list[TaskStat] = field(repr=False, default_factory=list)
    committed_before: dict[str, int] = field(repr=False, default_factory=dict)
    best_ms: dict[str, float | None] = field(repr=False, default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    model_ms: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    sha256: str = ""
    tasks_total: int = 0
    tasks_known: int = 0

    def fill(self, tasks: Sequence, skipped: Sequence, untuned: Mapping[str, float | None],
             known: int, notes: list[str], db) -> None:
        trials = {s.key: s.trials for s in self.stats}
        skipped_keys = {t.key for t in skipped}
        for task in tasks:
            before, best = untuned.get(task.key), self.best_ms.get(task.key)
            tuned = min(v for v in (before, best) if v is not None) \
                if before is not None or best is not None else None
            if task.key in skipped_keys:
                status = "skipped (small)" if before is not None else "skipped (not measurable)"
            else:
                status = "tuned" if best is not None and before is not None and best < before \
                    else "default kept"
            self.rows.append({"name": task.name, "key": task.key, "calls": task.weight,
                              "stages": list(task.stages), "untuned_ms": before,
                              "tuned_ms": tuned, "trials": trials.get(task.key, 0),
                              "records_before": self.committed_before.get(task.key, 0),
                              "status": status})
        self.tasks_total, self.tasks_known = len(tasks), known
        self.notes = notes
        self.sha256 = db.digest()

    def kernel_ms(self, which: str) -> float | None:
        """Sum over kernels of calls x time (``untuned_ms`` or ``tuned_ms``)."""
        values = [r["calls"] * r[which] for r in self.rows if r[which] is not None]
        return sum(values) if values else None

    def table(self) -> str:
        rows = []
        for r in sorted(self.rows, key=lambda r: -(r["calls"] * (r["untuned_ms"] or 0))):
            speedup = (f"{r['untuned_ms'] / r['tuned_ms']:.2f}x" if r["untuned_ms"]
                       and r["tuned_ms"] else "-")
            rows.append((r["name"], f"{r['calls']:g}", _ms(r["untuned_ms"]), _ms(r["tuned_ms"]),
                         speedup, r["trials"], r["status"]))
        return format_table(["kernel", "calls", "untuned ms", "tuned ms", "speedup",
                             "trials", "status"], rows)

    def summary(self) -> str:
        job = self.job
        lines = [f"tuning job {job['id']} on {self.db}: {self.trials} trials in "
                 f"{fmt_duration(self.seconds)} ({job['trials_done']}/{job['trials']} trials of "
                 f"the job, {job.get('stop_reason', job['status'])})",
                 f"kernels: {self.tasks_total} ({self.tasks_known} already in the database)"]
        before, after = self.kernel_ms("untuned_ms"), self.kernel_ms("tuned_ms")
        if before and after:
            lines.append(f"kernel time per run (sum of calls x time): {before:.3f} ms untuned -> "
                         f"{after:.3f} ms tuned ({before / after:.2f}x)")
        if self.model_ms:
            m = self.model_ms
            lines.append(f"model latency (20th percentile of {m['runs']} runs): "
                         f"{m['untuned']:.3f} ms untuned -> {m['tuned']:.3f} ms with the database "
                         f"({m['untuned'] / m['tuned']:.2f}x, {m.get('hits', '?')} kernel(s) from "
                         f"the database)")
        lines.append(f"database sha256 {self.sha256[:16]}...")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table() + "\n\n" + self.summary()

    def to_dict(self) -> dict[str, Any]:
        return {"db": self.db, "sha256": self.sha256, "job": self.job, "trials": self.trials,
                "seconds": round(self.seconds, 1), "tasks": self.rows,
                "kernel_ms": {"untuned": self.kernel_ms("untuned_ms"),
                              "tuned": self.kernel_ms("tuned_ms")},
                "model_ms": self.model_ms, "notes": self.notes}


def _ms(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def measure_model_latency(graph, target: str, db_path, *, runs: int = 50,
                          say: Callable[[str], None] | None = None,
                          **compile_args: Any) -> dict[str, Any]:
    """Compile ``graph`` without and with the database and time both on the same random
    inputs, alternating runs so machine noise hits both alike; the tuned one is verified
    against onnxruntime."""
    import time

    import numpy as np

    from mmcompile.compiler import compile as compile_model
    from mmcompile.reference import random_inputs
    config = dict(compile_args.pop("target_config", None) or {})
    if say:
        say("compiling the model without and with the database to compare latency")
    plain = compile_model(graph, target=target, verify=False, target_config=config,
                          **compile_args)
    tuned = compile_model(graph, target=target, verify=True, target_config=config,
                          tuning_db=str(db_path), **compile_args)
    feeds = random_inputs(graph, seed=0)
    times: dict[str, list[float]] = {"untuned": [], "tuned": []}
    for _ in range(3):
        plain.run(feeds), tuned.run(feeds)
    for _ in range(runs):
        for name, model in (("untuned", plain), ("tuned", tuned)):
            start = time.perf_counter()
            model.run(feeds)
            times[name].append((time.perf_counter() - start) * 1e3)
    hits = (tuned.metadata.get("tuning_db") or {}).get("hits")
    # The 20th percentile, not the median: on a shared machine the median of a few-ms model
    # swung 1.5-6.5 ms between rounds while the low percentiles stayed within 10%.
    return {"untuned": float(np.percentile(times["untuned"], 20)),
            "tuned": float(np.percentile(times["tuned"], 20)),
            "untuned_median": float(np.median(times["untuned"])),
            "tuned_median": float(np.median(times["tuned"])), "hits": hits, "runs": runs}
