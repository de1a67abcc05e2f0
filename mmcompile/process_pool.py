"""A small process pool for runs where one task may crash or hang its interpreter (a segfault in
native code, an endless loop): each task runs in a spawned worker, a dead worker costs only its
task, and a task past its timeout is killed. Used by :mod:`mmcompile.conformance` and
:mod:`mmcompile.fuzz`.

``concurrent.futures.ProcessPoolExecutor`` marks the whole pool broken when one worker dies,
and ``multiprocessing.Pool`` hangs on it; neither kills a task that runs too long.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any


def _worker(conn, func: Callable[[Any], Any]) -> None:
    # One thread per worker: the pool already uses the cores, and TVM pins a 1-thread pool.
    os.environ["TVM_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    # TVM's importer prints the failing op and its C++ logs warnings; outcomes carry the reason.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    conn.send("ready")  # task timeouts start after the interpreter is up
    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(func(task))


# -- the process pool --------------------------------------------------------------------------

class _Slot:
    """One worker process and the task it is running."""

    def __init__(self, ctx, func: Callable[[Any], Any]):
        self.ctx, self.func = ctx, func
        self.proc = None
        self.conn = None
        self.task: tuple[int, float] | None = None  # (task index, start time)
        self.done = 0

    def start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, self.func), daemon=True)
        self.proc.start()
        child.close()
        self.conn, self.done = parent, 0
        if not parent.poll(60) or parent.recv() != "ready":
            raise RuntimeError("a worker process did not start within 60 s")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                self.proc.kill()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        self.proc = None


def run_pool(func: Callable[[Any], Any], tasks: Sequence[Any], workers: int = 2,
             timeout: float = 120.0, max_tasks: int = 150,
             on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
    """``[func(task) for task in tasks]``, run in ``workers`` processes, in task order.

    ``func`` must be importable by name (a module-level function or a builtin): workers are
    spawned, not forked. A worker that dies gives its task ``(False, "crashed (exit code N)",
    seconds)``; one that runs longer than ``timeout`` seconds is killed and its task gets
    ``(False, "timeout (> T s)", T)``.
    """
    ctx = mp.get_context("spawn")  # fork would copy the parent's threads and TVM state
    slots = [_Slot(ctx, func) for _ in range(max(1, min(workers, len(tasks))))]
    results: list[Any] = [None] * len(tasks)
    pending = collections.deque(range(len(tasks)))

    def finish(slot: _Slot, result: Any) -> None:
        index = slot.task[0]
        results[index] = result
        slot.task = None
        slot.done += 1
        if on_result:
            on_result(index, result)

    try:
        while pending or any(s.task for s in slots):
            for slot in slots:
                if slot.task is None and pending:
                    if slot.proc is None or slot.done >= max_tasks:
                        slot.stop()
                        slot.start()
                    index = pending.popleft()
                    slot.conn.send(tasks[index])
                    slot.task = (index, time.monotonic())
            busy = [s for s in slots if s.task]
            deadline = min(s.task[1] for s in busy) + timeout
            ready = wait([s.conn for s in busy] + [s.proc.sentinel for s in busy],
                         timeout=max(0.0, deadline - time.monotonic()))
            for slot in busy:
                if slot.conn in ready or slot.conn.poll():
                    try:
                        finish(slot, slot.conn.recv())
                        continue
                    except (EOFError, OSError):
                        pass
                if slot.proc.sentinel in ready or not slot.proc.is_alive():
                    slot.proc.join()
                    code = slot.proc.exitcode
                    finish(slot, (False, f"crashed (exit code {code})",
                                  time.monotonic() - slot.task[1]))
                    slot.stop(kill=True)
                elif time.monotonic() - slot.task[1] > timeout:
                    finish(slot, (False, f"timeout (> {timeout:g} s)", timeout))
                    slot.stop(kill=True)
    finally:
        for slot in slots:
            slot.stop(kill=slot.task is not None)
    return results
