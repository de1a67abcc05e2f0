"""Running stages side by side on long-lived worker threads.

Each worker is a daemon thread that lives as long as the compiled model (TVM keeps one thread
pool per calling thread, so short-lived threads would each leak a pool) and sizes its pool once,
through its targets' ``configure_thread``. A worker runs its stages in order; the calling thread
waits for all workers, then runs the stages that depend on them (the fusion) with every core.
A failing stage is reported once, naming the stage, after every worker has finished its job,
so no worker is left hanging.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from mmcompile.errors import MMCompileError


class StageError(MMCompileError):
    """A stage failed while running; names the stage and the original error."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage '{stage}' failed: {type(cause).__name__}: {cause}")
        self.stage = stage


Job = Callable[[], Any]


class _Worker(threading.Thread):
    def __init__(self, name: str, setup: Callable[[], None]):
        super().__init__(name=name, daemon=True)
        self.jobs: queue.Queue[tuple[Job, Future] | None] = queue.Queue()
        self.setup = setup

    def run(self) -> None:
        try:
            self.setup()
            failed: BaseException | None = None
        except BaseException as exc:  # every job then fails with it, rather than waiting forever
            failed = StageError(f"<{self.name} setup>", exc)
        while True:
            item = self.jobs.get()
            if item is None:
                return
            job, future = item
            if failed is not None:
                future.set_exception(failed)
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # reported by the caller, never lost in the thread
                future.set_exception(exc)
            del item, job, future  # hold nothing of the model between jobs


class WorkerPool:
    """``len(setups)`` long-lived workers; ``setups[i]`` runs once on worker i before any job."""

    def __init__(self, setups: Sequence[Callable[[], None]]):
        self.workers = [_Worker(f"mmcompile-worker-{i}", setup) for i, setup in enumerate(setups)]
        for worker in self.workers:
            worker.start()

    def submit(self, index: int, job: Job) -> Future:
        future: Future = Future()
        self.workers[index].jobs.put((job, future))
        return future

    def close(self) -> None:
        for worker in self.workers:
            worker.jobs.put(None)
        for worker in self.workers:
            worker.join(timeout=5)


def run_stages(names: Sequence[str], run_one: Callable[[str], None],
               lane: str, timeline: list | None) -> None:
    """Run stages in order on this thread, recording (stage, lane, start, end) if asked."""
    for name in names:
        start = time.perf_counter()
        try:
            run_one(name)
        except StageError:
            raise
        except BaseException as exc:
            raise StageError(name, exc) from exc
        if timeline is not None:
            timeline.append((name, lane, start, time.perf_counter()))


def run_parallel(pool: WorkerPool, workers: Sequence[Sequence[str]], tail: Sequence[str],
                 run_one: Callable[[str], None], timeline: list | None = None,
                 lanes: Sequence[str] | None = None) -> None:
    """Workers' stage lists side by side, then ``tail`` on the calling thread; ``lanes``
    names the workers in the timeline (``worker 0``, ``cuda 0``)."""
    lanes = lanes or [f"worker {i}" for i in range(len(workers))]
    futures = [pool.submit(i, lambda names=names, i=i: run_stages(names, run_one, lanes[i],
                                                                   timeline))
               for i, names in enumerate(workers)]
    errors = []
    for future in futures:  # wait for every worker before reporting anything
        exc = future.exception()
        if exc is not None:
            errors.append(exc)
    if errors:
        raise errors[0]
    run_stages(tail, run_one, "caller", timeline)
