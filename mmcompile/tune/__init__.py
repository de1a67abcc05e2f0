"""``mmcompile.tune``: search faster kernel schedules for a model and keep them in a database
that ``compile(..., tuning_db=...)`` applies.

The job plans the model exactly as :func:`mmcompile.compile` does (:func:`mmcompile.planning.plan`:
same passes, same placement, same stages),
asks the target's tuner for the kernels of every stage, merges kernels shared by stages or
already known to the database, measures each one's default schedule, and spends the trial
budget with MetaSchedule across the kernels worth it (see :mod:`.tasks`). Everything measured is
committed to the database as it comes (see :mod:`.database`); ``resume=True`` continues the
model's last unfinished job with what is left of its trials and time.

A target offers tuning through a ``tuning`` module beside its own, exposing
``make_tuner(target, options)`` (TVM: ``mmcompile.targets.tvm.tuning``); the core does not name it.

The long job (CI runs only ``tests/test_tune.py``, with budgets of 4-24 trials)::

    mmcompile tune model.onnx --db tuning/ --time-budget 30m     # ~1500 trials on 2 busy cores
    mmcompile tune model.onnx --db tuning/ --resume              # after Ctrl-C, a kill, a crash
    mmcompile compile model.onnx -o model.mmc --tuning-db tuning/

Give ``tune`` the pipeline options (``--passes``, ``--input-shape``, ``--schedule``, ...) that
``compile`` will get: they decide the kernels.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from mmcompile.target import CompileOptions
from mmcompile.tune.database import TuningDB, TuningDBError, TuningError, database_info, now
from mmcompile.tune.progress import Progress, TaskStat
from mmcompile.tune.report import TuneReport, measure_model_latency
from mmcompile.tune.tasks import Task, merge, select

__all__ = ["TuneReport", "TuningDB", "TuningDBError", "TuningError", "database_info",
           "find_tuner", "parse_duration", "tune"]

DEFAULT_TRIALS = 2000


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"`` -> seconds.

    Raises:
        TuningError: not a duration.
    """
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*"
                         r"(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or parts is None or not any(parts.groups()):
        raise TuningError(f"expected a duration like 90s, 30m, 2h or 1h30m, got '{text}'")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def find_tuner(backend, options: CompileOptions):
    """The tuner of ``backend``: ``make_tuner`` of the ``tuning`` module beside its class."""
    package = type(backend).__module__.rpartition(".")[0]
    try:
        module = importlib.import_module(f"{package}.tuning")
    except ModuleNotFoundError:
        raise TuningError(f"target '{backend.name}' does not support tuning") from None
    return module.make_tuner(backend, options)


class _Stop:
    """Ends the search at the deadline or on the first Ctrl-C (trials in flight are still
    measured and committed); a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self, deadline: float | None, progress: Progress) -> None:
        self.deadline, self.progress, self.reason = deadline, progress, ""
        self._previous = None

    def __call__(self) -> bool:
        if not self.reason and self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = "time budget reached"
        return bool(self.reason)

    def _on_sigint(self, signum, frame) -> None:
        if self.reason == "interrupted":
            raise KeyboardInterrupt
        self.reason = "interrupted"
        self.progress.say("interrupted: finishing the trials in flight (Ctrl-C again to abort)")

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _model_key(graph) -> str:
    return hashlib.sha256(graph.to_onnx().SerializeToString()).hexdigest()[:16]


def _job(db: TuningDB, model_key: str, resume: bool, trials: int | None,
         time_budget_s: float | None, task_keys: list[str], committed: int) -> dict[str, Any]:
    """The job to run: the model's last unfinished one (``resume``) or a new one."""
    if resume:
        jobs = [j for j in db.meta["jobs"] if j["model"] == model_key]
        if not jobs:
            raise TuningDBError(f"nothing to resume: {db.path} has no tuning job for this model")
        job = jobs[-1]
        job["trials_done"] = max(job.get("trials_done", 0),
                                 committed - job["records_at_start"])
        if job["status"] != "finished":
            job["status"] = "running"
        return job
    job = {"id": len(db.meta["jobs"]) + 1, "model": model_key,
           "trials": DEFAULT_TRIALS if trials is None else int(trials),
           "time_budget_s": time_budget_s, "tasks": task_keys, "records_at_start": committed,
           "trials_done": 0, "elapsed_s": 0.0, "status": "running", "started": now()}
    db.meta["jobs"].append(job)
    return job


def tune(model: Any, *, db: str | os.PathLike, target: str = "cpu", trials: int | None = None,
         time_budget: float | None = None, resume: bool = False, rpc_tracker: str | None = None,
         rpc_key: str | None = None, passes: str = "default", opt_level: int = 2,
         disabled_passes: Sequence[str] = (), modalities: Mapping[str, str] | None = None,
         input_shapes: Mapping[str, Sequence[int]] | None = None, schedule: str = "auto",
         threads: int = 0, target_config: Mapping[str, Any] | None = None,
         fallback: str | None = "onnxruntime", trials_per_iter: int = 64, cost_model: str = "xgb", min_share: float = 0.005,
         measure_model: bool = True, seed: int = 0,
         progress: TextIO | None = sys.stderr) -> TuneReport:
    """Tune a model's kernels into the database folder ``db``.

    Args:
        model: as for :func:`mmcompile.compile` (path, ModelProto, Graph).
        db: database folder (created unless ``resume``).
        trials: trials for this job (default 2000); ``resume`` takes the stored job's.
        time_budget: wall-clock seconds for the search (None: trials only).
        resume: continue the model's last unfinished job in ``db``.
        rpc_tracker, rpc_key: measure on the servers registered with this TVM RPC tracker
            (``HOST:PORT``) under this key instead of on this machine.
        passes, opt_level, disabled_passes, modalities, input_shapes, schedule, threads,
            target_config, fallback: as for compile; they decide the stages and kernels, so
            give compile the same ones.
        trials_per_iter: candidates measured per batch.
        cost_model: ``"xgb"`` (MetaSchedule's learned model) or ``"random"`` (for tests).
        min_share: skip kernels below this share of the model's untuned time.
        measure_model: compile the model with and without the database and time both.
        seed: search seed.
        progress: stream for the status lines (None: silent).

    Returns:
        A :class:`TuneReport` (per-task untuned and tuned times, trials, model latencies).

    Raises:
        TuningDBError: the database is corrupt, foreign, in use or for another target.
        TuningError: bad options, an unreachable RPC tracker, nothing to tune.
    """
    from mmcompile.tune.runners import parse_tracker
    started = time.monotonic()
    rpc = parse_tracker(rpc_tracker, rpc_key) if rpc_tracker else None
    from mmcompile.planning import plan
    planned = plan(model, target=target, target_config=target_config, fallback=fallback,
                   passes=passes, opt_level=opt_level, disabled_passes=disabled_passes,
                   modalities=modalities, input_shapes=input_shapes, schedule=schedule)
    graph = planned.source
    choice = planned.placement.choices[planned.placement.primary]
    backend = choice.target
    options = CompileOptions(threads=threads, config=choice.options)
    # the requested target's stages: the fallback's run in onnxruntime, nothing to tune
    plans = [p for p in planned.stages() if p.target == planned.placement.primary]
    tuner = find_tuner(backend, options)
    host = {**tuner.host_info(), "measured_on": str(rpc) if rpc else "local"}
    tdb = TuningDB.open(db, create=not resume, target=tuner.target_info(), host=host)
    say = (lambda message: print(message, file=progress, flush=True)) if progress else None
    with tdb.lock():
        notes = list(tdb.repaired)
        notes += tdb.check_target(tuner.target_info(), (*tuner.strict_keys, "num-cores"), host)
        tasks = merge([(p.name, tuner.extract(p.graph)) for p in plans], tuner.same)
        if not tasks:
            raise TuningError(f"{graph.name} has no kernels to tune")
        known = sum(t.key in tdb.meta["tasks"] for t in tasks)
        key = _model_key(graph)
        tdb.meta["models"].setdefault(key, {"name": graph.name, "first_seen": now()}).update(
            stages={p.name: [t.key for t in tasks if p.name in t.stages] for p in plans},
            last_seen=now())
        with tuner.session(tdb, rpc, cost_model, seed) as session:
            if getattr(session, "dropped", 0):
                notes.append(f"removed {session.dropped} record(s) filed under a same-shaped "
                             f"kernel whose blocks are named otherwise (they do not replay)")
            # Unknown kernels, and kernels whose default schedule changed (a newer mmcompile).
            fresh = [t for t in tasks if tdb.meta["tasks"].get(t.key, {}).get("untuned_ms")
                     is None or tdb.meta["tasks"][t.key].get("default") != t.default]
            if fresh:
                if say:
                    say(f"measuring the default schedule of {len(fresh)} kernel(s)")
                measured = session.measure_default(fresh)
                for t in fresh:
                    tdb.meta["tasks"][t.key] = {"untuned_ms": measured[t.key],
                                                "default": t.default}
            for t in tasks:
                tdb.meta["tasks"][t.key].update(name=t.name)
            untuned = {t.key: tdb.meta["tasks"][t.key].get("untuned_ms") for t in tasks}
            chosen, skipped = select(tasks, untuned, min_share)
            counts = session.committed(chosen)
            job = _job(tdb, key, resume, trials, time_budget, [t.key for t in chosen],
                       sum(counts.values()))
            tdb.save_meta()
            report = _search(tdb, session, job, chosen, untuned, counts, trials_per_iter,
                             started, progress)
            report.best_ms = session.best_ms(tasks)
        report.fill(tasks, skipped, untuned, known, notes + report.notes, tdb)
    if measure_model and report.job["status"] != "interrupted":
        report.model_ms = measure_model_latency(
            graph, target, tdb.path, passes=passes, opt_level=opt_level,
            disabled_passes=disabled_passes, schedule=schedule, threads=threads,
            target_config=target_config, fallback=fallback, say=say)
    return report


def _search(tdb: TuningDB, session, job: dict[str, Any], tasks: list[Task],
            untuned: Mapping[str, float | None], counts: Mapping[str, int],
            trials_per_iter: int, started: float, stream: TextIO | None) -> TuneReport:
    """Spend what is left of ``job`` on ``tasks``; returns the report's job part."""
    best = session.best_ms(tasks)
    stats = [TaskStat(t.key, t.name, t.weight, untuned.get(t.key), best.get(t.key))
             for t in tasks]
    left = max(0, job["trials"] - job["trials_done"])
    budget = job["time_budget_s"]
    time_left = None if budget is None else max(0.0, budget - job["elapsed_s"])
    elapsed_before, done_before = job["elapsed_s"], job["trials_done"]
    progress = Progress(stats, left, time_left, stream)

    def heartbeat() -> None:  # the meta file follows the job, so --resume knows what is left
        job.update(trials_done=done_before + progress.trials,
                   elapsed_s=round(elapsed_before + progress.elapsed_s, 1), updated=now())
        tdb.save_meta()

    progress.on_batch = heartbeat
    deadline = None if time_left is None else time.monotonic() + time_left
    stop_reason, notes = ("finished", []) if tasks else ("nothing worth tuning", [])
    if tasks and left > 0 and (time_left is None or time_left > 0):
        per_iter = max(1, min(trials_per_iter, left // max(1, len(tasks)) or 1))
        progress.say(f"tuning {len(tasks)} kernel(s): {left} trials"
                     + (f", {time_left / 60:.1f} min" if time_left is not None else "")
                     + f", {per_iter} per batch")
        with _Stop(deadline, progress) as stop:
            notes = session.tune(tasks, left, per_iter, progress, stop)
        stop_reason = stop.reason or "finished"
    heartbeat()
    job["status"] = "interrupted" if stop_reason == "interrupted" else "finished"
    job["stop_reason"] = stop_reason
    tdb.save_meta()
    return TuneReport(db=str(tdb.path), job=dict(job), trials=progress.trials,
                      seconds=time.monotonic() - started, stats=stats,
                      committed_before=dict(counts), notes=notes)
