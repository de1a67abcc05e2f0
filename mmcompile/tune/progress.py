"""Tuning progress: per-task trial counts and best latencies, a compact status line, an ETA;
and where the job's other output goes (TVM's native warnings and MetaSchedule's per-task search
logs: files in the database's ``logs/``).

One line per measured batch (at most every ``interval_s`` seconds), e.g.::

    [   3:10] trials 192/2000  tasks 3/15 started, 0 done  ETA 26:49 | fused_conv1d_add_relu
    0.0172 ms (0.04019 untuned, 2.34x)

(one line, wrapped here) so the log of a long job stays readable when redirected to a file.
The same object keeps the best-latency history the task scheduler's gradient uses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

FAILED_MS = 1e9


@dataclass
class TaskStat:
    """One tuned task as the display and the report see it.

    Attributes:
        key: the task's id in the database (structural hash).
        name: a readable name (the fused function's, e.g. ``fused_matmul_add_gelu``).
        weight: how many times the model calls it.
        untuned_ms: latency of the default (untuned) schedule, if measured.
        best_ms: best latency measured so far (this job or earlier ones).
        trials: trials measured in this job.
        done: the search ended for this task (its budget or search space is exhausted).
    """

    key: str
    name: str
    weight: float
    untuned_ms: float | None = None
    best_ms: float | None = None
    trials: int = 0
    done: bool = False
    history: list[float] = field(default_factory=list)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Collects measurements and prints the status line.

    Args:
        tasks: the tasks being tuned, in the scheduler's task-id order.
        trials: this job's trial budget.
        time_budget_s: this job's wall-clock budget (None: none).
        stream: where status lines go (None: nowhere).
        interval_s: minimum seconds between two status lines.
        on_batch: called after each batch (the database meta file's heartbeat).
    """

    def __init__(self, tasks: list[TaskStat], trials: int, time_budget_s: float | None = None,
                 stream: TextIO | None = sys.stderr, interval_s: float = 2.0,
                 on_batch: Callable[[], None] | None = None) -> None:
        self.tasks = tasks
        self.trials_budget = trials
        self.time_budget_s = time_budget_s
        self.stream = stream
        self.interval_s = interval_s
        self.on_batch = on_batch
        self.started = time.monotonic()
        self._last_print = 0.0

    @property
    def trials(self) -> int:
        return sum(t.trials for t in self.tasks)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def history(self, index: int) -> list[float]:
        return self.tasks[index].history

    def record(self, index: int, latencies_ms: list[float]) -> None:
        """One measured batch of task ``index`` (failed trials as ``1e9``)."""
        task = self.tasks[index]
        task.trials += len(latencies_ms)
        valid = [ms for ms in latencies_ms if ms < FAILED_MS]
        if valid and (task.best_ms is None or min(valid) < task.best_ms):
            task.best_ms = min(valid)
        task.history.append(task.best_ms if task.best_ms is not None else FAILED_MS)
        if self.on_batch is not None:
            self.on_batch()
        self.show(index)

    def finish(self, index: int) -> None:
        self.tasks[index].done = True

    def eta_s(self) -> float | None:
        """Seconds left: by trial rate, capped by the time budget."""
        elapsed, done = self.elapsed_s, self.trials
        left = None
        if done:
            left = elapsed / done * max(0, self.trials_budget - done)
        if self.time_budget_s is not None:
            budget_left = max(0.0, self.time_budget_s - elapsed)
            left = budget_left if left is None else min(left, budget_left)
        return left

    def line(self, index: int | None = None) -> str:
        started = sum(t.trials > 0 for t in self.tasks)
        done = sum(t.done for t in self.tasks)
        text = (f"[{fmt_duration(self.elapsed_s):>7}] trials {self.trials}/{self.trials_budget}  "
                f"tasks {started}/{len(self.tasks)} started, {done} done  "
                f"ETA {fmt_duration(self.eta_s())}")
        if index is not None:
            text += " | " + describe(self.tasks[index])
        return text

    def show(self, index: int | None = None, force: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if force or now - self._last_print >= self.interval_s:
            self._last_print = now
            print(self.line(index), file=self.stream, flush=True)

    def say(self, message: str) -> None:
        if self.stream is not None:
            print(f"[{fmt_duration(self.elapsed_s):>7}] {message}", file=self.stream, flush=True)


def describe(task: TaskStat) -> str:
    """``name best (untuned, speedup)`` for one task."""
    best = f"{task.best_ms:.4g} ms" if task.best_ms is not None else "no valid trial yet"
    if task.untuned_ms and task.best_ms:
        return (f"{task.name} {best} ({task.untuned_ms:.4g} untuned, "
                f"{task.untuned_ms / task.best_ms:.2f}x)")
    return f"{task.name} {best}"


@contextlib.contextmanager
def native_stderr_to(path: Path, progress: Progress) -> Iterator[None]:
    """Send what TVM's C++ code writes to file descriptor 2 (a warning per design space,
    e.g. "Unknown schedule rule meta_schedule.pool_max") to ``path``, keeping the progress
    display on the original stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    previous = progress.stream
    if previous is sys.stderr:
        progress.stream = terminal
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)
        progress.stream = previous
        terminal.close()


def task_logger(folder: Path, name: str) -> logging.Logger:
    """A logger writing to ``folder/<name>.log`` only, for one task's search log (MetaSchedule's
    own helper builds a logging config from the handler names it finds and fails on unnamed
    ones, such as pytest's)."""
    folder.mkdir(exist_ok=True)
    path = str(folder / f"{name}.log")
    logger = logging.getLogger(f"mmcompile.tune.task.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(getattr(h, "baseFilename", None) == path for h in logger.handlers):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger
