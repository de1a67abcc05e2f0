"""MetaSchedule's gradient task scheduler with a wall-clock budget and a stop request, the
measure callback that feeds the progress display, and the cost model's warm start on resume.

MetaSchedule's ``GradientBased`` scheduler (C++) spends trials where the weighted latency falls
fastest, but stops only on a trial count. Terminating its tasks from a callback to stop on time
is unsafe: during the first round-robin pass it hands out task ids without checking whether
they are terminated, and trips an assertion. :class:`BudgetScheduler` reimplements its
``NextTaskId`` (same round-robin start, same gradient, ``alpha=0.2``, window 3) and returns -1
once :attr:`should_stop` is true; MetaSchedule's ``Tune`` then joins the trials in flight and
commits them before returning, so a budget stop or a Ctrl-C loses no measurement.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

from mmcompile.tune.progress import Progress

FAILED_MS = 1e9  # MetaSchedule's latency for a failed trial


def _latency_ms(result) -> float:
    if result.error_msg is not None or not result.run_secs:
        return FAILED_MS
    secs = [float(s) for s in result.run_secs]
    return sum(secs) / len(secs) * 1e3


@derived_object
class ProgressCallback(PyMeasureCallback):
    """After each measured batch: record latencies in :class:`Progress` (which also redraws the
    display and keeps the history the scheduler's gradient uses)."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
              runner_results) -> None:
        self.progress.record(task_id, [_latency_ms(r) for r in runner_results])


@derived_object
class BudgetScheduler(PyTaskScheduler):
    """Gradient-based task selection that stops when ``should_stop()`` returns true.

    Args:
        progress: per-task best-latency history (filled by :class:`ProgressCallback`).
        should_stop: polled before every batch (deadline reached, Ctrl-C, ...).
        alpha, window: MetaSchedule's gradient parameters.
        seed: for ties (every task equally promising, e.g. before any measurement).
    """

    def __init__(self, progress: Progress, should_stop: Callable[[], bool], alpha: float = 0.2,
                 window: int = 3, seed: int = 0) -> None:
        super().__init__()
        self.progress = progress
        self.should_stop = should_stop
        self.alpha = alpha
        self.window = window
        self.rng = random.Random(seed)
        self.round_robin = 0

    def next_task_id(self) -> int:
        scheduler = self._outer()
        n_tasks = len(scheduler.tasks_)
        if self.should_stop():
            return -1
        if self.round_robin < n_tasks:  # every task gets one batch first, as in GradientBased
            # Unlike GradientBased, commit finished batches now (a local runner's are done on
            # return): the display and the cost model need not wait for the whole first pass.
            for task_id in range(self.round_robin):
                scheduler.touch_task(task_id)
            self.round_robin += 1
            return self.round_robin - 1
        if self.round_robin == n_tasks:
            self.round_robin += 1
            for task_id in range(n_tasks):
                if scheduler.tasks_[task_id].runner_futures is not None:
                    scheduler.join_running_task(task_id)
        alive = []
        for task_id in range(n_tasks):
            scheduler.touch_task(task_id)
            if not scheduler.tasks_[task_id].is_terminated:
                alive.append(task_id)
            else:
                self.progress.finish(task_id)
        if not alive or self.should_stop():
            return -1
        task_id = self._pick(alive, scheduler)
        if scheduler.tasks_[task_id].runner_futures is not None:
            scheduler.join_running_task(task_id)
        return task_id

    def _pick(self, alive: list[int], scheduler) -> int:
        grads = []
        for task_id in alive:
            best = self.progress.history(task_id)
            n = len(best)
            if n and best[-1] < FAILED_MS:
                w = self.window
                g1 = (best[n - 1 - w] - best[-1]) / w if n >= 1 + w else 0.0
                g2 = best[-1] / n
                weight = float(scheduler.tasks_[task_id].task_weight)
                grads.append((self.alpha * g1 + (1 - self.alpha) * g2) * weight)
            else:
                grads.append(-1e9)  # nothing valid measured yet
        if max(grads) == min(grads):
            return self.rng.choice(alive)
        return alive[grads.index(max(grads))]


def warm_start(cost_model, contexts, database, limit: int = 256) -> int:
    """Train ``cost_model`` on the best ``limit`` valid records of each task that earlier jobs
    committed (a resumed job would otherwise start from an untrained model and re-explore at
    random). Returns how many records were used.

    Args:
        contexts: the tasks' TuneContexts, whose ``mod`` is the database workload.
        database: the MetaSchedule database.
    """
    from tvm.s_tir.meta_schedule.runner import RunnerResult
    workloads = [database.commit_workload(ctx.mod) for ctx in contexts]
    by_task: list[list] = [[] for _ in contexts]
    for record in database.get_all_tuning_records():  # sorted, fastest first
        if not record.run_secs or min(float(s) for s in record.run_secs) >= 1e9:  # failed
            continue
        for index, workload in enumerate(workloads):
            if record.workload.same_as(workload):
                if len(by_task[index]) < limit:
                    by_task[index].append(record)
                break
    used = 0
    for ctx, records in zip(contexts, by_task):
        if not records:
            continue
        try:
            candidates = [r.as_measure_candidate() for r in records]
        except Exception:  # a trace that no longer replays: leave this task untrained
            continue
        cost_model.update(ctx, candidates, [RunnerResult(r.run_secs, None) for r in records])
        used += len(records)
    return used
