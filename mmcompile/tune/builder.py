"""A MetaSchedule builder whose worker processes start once, and a light tensor-intrinsic import.

The stock ``LocalBuilder`` starts a fresh process pool for every batch, and each worker runs
``import tvm.s_tir.tensor_intrin``: that registers every tensor intrinsic TVM ships (CUDA alone
took 82 s of a 130 s import on the 2-core CI machine), longer than the build timeout, so every
candidate failed. :class:`PoolBuilder` keeps one pool for the whole job (each worker imports
``tvm`` once, ~6 s) and builds without that import: a candidate reaching the builder is already
scheduled, tensorized blocks included, so lowering needs no intrinsic registry. Workers are
replaced after ``max_uses`` builds to bound TVM's per-process memory growth; a build that hangs
is killed after ``timeout_sec`` and only that candidate fails.

Measured on the fusion stage of the late-fusion example (2 cores): 0.1-0.2 s to build and
0.1-0.4 s to export one candidate; two workers build a 64-candidate batch in ~10 s.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import types

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.builder import BuilderInput, BuilderResult, PyBuilder
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind


def import_cpu_tensor_intrinsics() -> None:
    """Register only the x86 tensor intrinsics (VNNI, AVX-512 dot products) that MetaSchedule's
    CPU schedule rules look up, without the package ``__init__`` that registers all of them.

    ``TuneContext`` does ``import tvm.s_tir.tensor_intrin``; once the package is in
    ``sys.modules`` that import is free. Submodules stay importable by name (``__path__`` is the
    real folder), so a later ``import tvm.s_tir.tensor_intrin.cuda`` still works.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm.s_tir
    package = types.ModuleType(name, "CPU tensor intrinsics only (see mmcompile.tune.builder)")
    package.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
    sys.modules[name] = package
    tvm.s_tir.tensor_intrin = package
    try:
        importlib.import_module(f"{name}.x86")
    except Exception:
        del sys.modules[name]  # fall back to the full import on first use
        raise


def build_candidate(mod, target) -> str:
    """Build one scheduled candidate into a shared library; returns its path.

    Runs in a pool worker. MetaSchedule's ``default_build`` minus the tensor-intrinsic import;
    unlike its ``default_export`` (a tar of objects, linked by each runner when loading) the
    library is linked here, in the parallel build pool, which took ~0.3 s off every serial
    measurement. Runners must share the builder's architecture, as they must anyway.
    """
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    library = tvm.driver.build(mod, target=target)
    path = os.path.join(tempfile.mkdtemp(prefix="mmc-tune-"), "candidate.so")
    library.export_library(path)
    return path


def ignore_sigint() -> None:
    """Pool-worker initializer. Ctrl-C reaches the terminal's whole process group; workers
    ignore it so the trials in flight finish and the job stops cleanly (see ``tune``)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_ready(hold_s: float) -> int:
    import time
    importlib.import_module("tvm.driver")  # what makes a fresh worker slow
    time.sleep(hold_s)  # keep this worker busy so the next job starts another one
    return os.getpid()


@derived_object
class PoolBuilder(PyBuilder):
    """Builds candidates in a process pool that lives as long as the builder.

    Args:
        max_workers: build processes (default: available cores).
        timeout_sec: a build running longer is killed and reported as a build error.
        max_uses: builds per worker process before it is replaced.
    """

    def __init__(self, max_workers: int | None = None, timeout_sec: float = 60.0,
                 max_uses: int = 256) -> None:
        super().__init__()
        self.max_workers = max_workers or len(os.sched_getaffinity(0))
        self.timeout_sec = timeout_sec
        self.max_uses = max_uses
        self._pool: PopenPoolExecutor | None = None

    def _executor(self) -> PopenPoolExecutor:
        if self._pool is None:
            self._pool = PopenPoolExecutor(max_workers=self.max_workers, timeout=self.timeout_sec,
                                           maximum_process_uses=self.max_uses,
                                           initializer=ignore_sigint)
        return self._pool

    def warm_up(self) -> None:
        """Start every worker now and wait until each has imported TVM: a worker starting
        while a runner measures on this machine steals a core and skews the measurement
        (seen: 5.4 ms instead of 2.5 ms)."""
        pool = self._executor()
        futures = [pool.submit(_worker_ready, 0.5) for _ in range(self.max_workers)]
        for future in futures:
            future.result()

    def build(self, build_inputs: list[BuilderInput]) -> list[BuilderResult]:
        results = []
        jobs = [(inp.mod, inp.target) for inp in build_inputs]
        for item in self._executor().map_with_error_catching(lambda job: build_candidate(*job),
                                                             jobs):
            if item.status == StatusKind.COMPLETE:
                results.append(BuilderResult(item.value, None))
            elif item.status == StatusKind.TIMEOUT:
                results.append(BuilderResult(None, f"PoolBuilder: timeout after "
                                                   f"{self.timeout_sec:g} s"))
            else:
                results.append(BuilderResult(None, f"PoolBuilder: {item.value}"))
        return results

    def shutdown(self) -> None:
        """Stop the worker processes (also done when the builder is garbage-collected)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
