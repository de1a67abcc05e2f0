"""MetaSchedule tuning for the ``cpu`` target, and applying a tuning database when compiling.

Tasks are what :meth:`TVMCpuTarget.compile` builds: each stage is imported into Relax and
fused by :func:`~mmcompile.targets.tvm.lowering.fuse_cpu` (fast-math rewrite, ``zero``
pipeline), and every fused PrimFunc is a task (``relax_integration.extract_tasks``). Each
task's default schedule (the rules of :func:`~mmcompile.targets.tvm.schedules.schedule_cpu`)
is measured first; the database meta keeps that time, and :func:`apply_database` uses a tuned
schedule only where it beat it, so a database never makes a kernel slower than untuned
mmcompile (up to measurement noise).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mmcompile.schedule import available_cores
from mmcompile.target import CompileOptions
from mmcompile.targets.tvm.executable import native_log_to
from mmcompile.tune.database import TuningDB, TuningError, host_facts
from mmcompile.tune.tasks import Task

STRICT_KEYS = ("kind", "mcpu")  # another CPU architecture: the schedules may not even run


def target_info(target) -> dict[str, Any]:
    """What a database records about the target it was measured for."""
    return {"target": str(target), "kind": target.kind.name,
            "mcpu": str(target.attrs.get("mcpu", "")),
            "num-cores": int(target.attrs.get("num-cores", 0))}


def host_info() -> dict[str, Any]:
    """The machine measuring: CPU model, LLVM CPU name, hostname, usable cores."""
    from mmcompile.targets.tvm.host import host_cpu
    return {**host_facts(), "mcpu": host_cpu()["mcpu"]}


def task_key(mod) -> str:
    import tvm_ffi
    return f"{tvm_ffi.structural_hash(mod) & (2**64 - 1):016x}"


def default_schedule(func, target):
    """``schedule_cpu``'s choice for one PrimFunc, as a Schedule with its trace (the function
    unchanged when no rule applies)."""
    from tvm import s_tir

    from mmcompile.targets.tvm.schedules import cpu_rules
    with target:
        for rule in cpu_rules():
            sch = rule.apply(func, target, False)
            if sch is not None:
                return sch[0] if isinstance(sch, list) else sch
    return s_tir.Schedule(func)


def make_tuner(backend, options: CompileOptions) -> CpuTuner:
    """The tuner for ``backend`` (found by :func:`mmcompile.tune.tune` beside the target).

    Raises:
        TuningError: the target has no tuner (only ``cpu`` has one).
    """
    if backend.name != "cpu":
        raise TuningError(f"tuning is implemented for the 'cpu' target only, not "
                          f"'{backend.name}'")
    return CpuTuner(options)


class CpuTuner:
    """Extracts tasks from stages and opens tuning sessions for one LLVM target."""

    strict_keys = STRICT_KEYS

    def __init__(self, options: CompileOptions) -> None:
        from mmcompile.targets.tvm.host import llvm_target
        self.threads = options.threads or available_cores()
        self.target = llvm_target(options.config.get("mcpu"), options.threads)
        self.config = options.config  # fast_math, winograd: see lowering_options

    def target_info(self) -> dict[str, Any]:
        return target_info(self.target)

    def host_info(self) -> dict[str, Any]:
        return host_info()

    def extract(self, graph) -> list[Task]:
        """The stage's tasks: the fused kernels ``lower_cpu`` would schedule."""
        from tvm.s_tir import meta_schedule as ms

        from mmcompile.targets.tvm.lowering import fuse_cpu, lowering_options
        from mmcompile.targets.tvm.target import import_relax
        mod = import_relax(graph, "cpu")
        with native_log_to([]):
            mod = fuse_cpu(mod, self.target, **lowering_options(self.config))
            with self.target:
                extracted = ms.relax_integration.extract_tasks(mod, self.target)
        return [Task(task_key(t.dispatched[0]), str(t.task_name), float(t.weight),
                     t.dispatched[0], default=self.default_key(t.dispatched[0]))
                for t in extracted]

    def default_key(self, workload) -> str:
        """Fingerprint of the untuned schedule of ``workload``: the database's untuned time
        holds while this does not change."""
        return task_key(default_schedule(workload["main"], self.target).mod)

    @staticmethod
    def same(a, b) -> bool:
        import tvm_ffi
        return bool(tvm_ffi.structural_equal(a, b))

    def session(self, db: TuningDB, rpc=None, cost_model: str = "xgb",
                seed: int = 0) -> TuningSession:
        return TuningSession(self, db, rpc, cost_model, seed)


class TuningSession:
    """A MetaSchedule database, builder and runner for one job. Close it (or use ``with``)."""

    def __init__(self, tuner: CpuTuner, db: TuningDB, rpc, cost_model: str, seed: int) -> None:
        from tvm.s_tir import meta_schedule as ms

        from mmcompile.tune.builder import PoolBuilder, import_cpu_tensor_intrinsics
        from mmcompile.tune.runners import make_runner
        import_cpu_tensor_intrinsics()
        self.tuner, self.db, self.seed, self.cost_model = tuner, db, seed, cost_model
        self.target = tuner.target
        self.dropped = 0
        with native_log_to([]):
            try:
                self.database = ms.database.JSONDatabase(work_dir=str(db.path))
            except Exception:  # noqa: BLE001 - records that do not replay (see _read_records)
                self.dropped = _drop_unloadable_records(db)
                self.database = ms.database.JSONDatabase(work_dir=str(db.path))
        self.builder = PoolBuilder(max_workers=tuner.threads)
        with ThreadPoolExecutor(1) as pool:  # both start processes that import TVM (~6 s)
            runner = pool.submit(make_runner, rpc, tuner.threads)
            self.builder.warm_up()
            self.runner = runner.result()

    def __enter__(self) -> TuningSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.builder.shutdown()
        inner = getattr(self.runner, "inner", None)
        pool = getattr(inner, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def committed(self, tasks: Sequence[Task]) -> dict[str, int]:
        """Records (measured trials) in the database per task, from any job."""
        workloads = [(t.key, self.database.commit_workload(t.payload)) for t in tasks]
        counts = dict.fromkeys((k for k, _ in workloads), 0)
        for record in self.database.get_all_tuning_records():
            for key, workload in workloads:
                if record.workload.same_as(workload):
                    counts[key] += 1
                    break
        return counts

    def best_ms(self, tasks: Sequence[Task]) -> dict[str, float | None]:
        best: dict[str, float | None] = {}
        for task in tasks:
            top = self.database.get_top_k(self.database.commit_workload(task.payload), 1)
            best[task.key] = _mean_ms(top[0].run_secs) if top else None
        return best

    def measure_default(self, tasks: Sequence[Task], rounds: int = 3) -> dict[str, float | None]:
        """Latency of each task's default schedule, measured like a trial; the best of
        ``rounds`` measurements, as a tuned time is the best of many (None: failed)."""
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo
        from tvm.s_tir.meta_schedule.builder import BuilderInput
        from tvm.s_tir.meta_schedule.runner import RunnerInput
        from mmcompile.targets.tvm.cpu_amx import configure_tiles
        from mmcompile.targets.tvm.vector_tails import split_guarded_vectors
        funcs = [t.payload["main"] for t in tasks]
        schedules = [default_schedule(f, self.target) for f in funcs]
        built = self.builder.build([BuilderInput(configure_tiles(split_guarded_vectors(s.mod)),
                                                 self.target)
                                    for s in schedules])  # as schedule_cpu builds them
        ok = [i for i, b in enumerate(built) if b.error_msg is None]
        inputs = [RunnerInput(built[i].artifact_path, "cpu", ArgInfo.from_prim_func(funcs[i]))
                  for i in ok]
        result: dict[str, float | None] = {t.key: None for t in tasks}
        todo = list(range(len(ok)))
        for _ in range(rounds):
            for j, future in zip(todo, self.runner.run([inputs[j] for j in todo])):
                run = future.result()
                if run.error_msg is None and run.run_secs:
                    ms, key = _mean_ms(run.run_secs), tasks[ok[j]].key
                    result[key] = ms if result[key] is None else min(ms, result[key])
            # A kernel that failed (a gather crashing on random indices) fails again, and each
            # failure restarts the runner process: measure it once only.
            todo = [j for j in todo if result[tasks[ok[j]].key] is not None]
        for i in ok:
            shutil.rmtree(os.path.dirname(str(built[i].artifact_path)), ignore_errors=True)
        return result

    def tune(self, tasks: Sequence[Task], trials: int, trials_per_iter: int, progress,
             should_stop: Callable[[], bool]) -> list[str]:
        """Run MetaSchedule on ``tasks`` until ``trials`` more trials or ``should_stop()``;
        returns notes for the report."""
        import logging

        from tvm.s_tir import meta_schedule as ms

        from mmcompile.tune.progress import native_stderr_to, task_logger
        from mmcompile.tune.scheduler import BudgetScheduler, ProgressCallback, warm_start
        # MetaSchedule logs every trial at INFO to the console; keep that in db/logs only.
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
        loggers = [task_logger(self.db.path / "logs", f"{t.key}-{t.name}") for t in tasks]
        # MetaSchedule's population (512) costs ~6 s of mutation per batch on 2 cores whatever
        # the batch size; small batches get a smaller one.
        population = max(64, min(512, 8 * trials_per_iter))
        contexts = [ms.TuneContext(mod=t.payload, target=self.target,
                                   space_generator="post-order-apply",
                                   search_strategy=ms.search_strategy.EvolutionarySearch(
                                       population_size=population,
                                       init_min_unmeasured=min(50, population // 4)),
                                   task_name=t.name,
                                   logger=logger, rand_state=self.seed + i,
                                   num_threads=self.tuner.threads).clone()
                    for i, (t, logger) in enumerate(zip(tasks, loggers))]
        cost_model = ms.CostModel.create(self.cost_model, num_tuning_cores=self.tuner.threads) \
            if self.cost_model == "xgb" else ms.CostModel.create(self.cost_model)
        notes = []
        if self.cost_model == "xgb" and warm_start(cost_model, contexts, self.database):
            notes.append(f"cost model trained on {cost_model.data_size} earlier measurements")
            progress.say(notes[-1])
        callbacks = [*ms.MeasureCallback.create("default"), ProgressCallback(progress)]
        with native_stderr_to(self.db.path / "logs" / "tvm.log", progress):
            ms.tune_tasks(tasks=contexts, task_weights=[t.weight for t in tasks],
                          work_dir=str(self.db.path), max_trials_global=trials,
                          max_trials_per_task=trials, num_trials_per_iter=trials_per_iter,
                          builder=self.builder, runner=self.runner, database=self.database,
                          cost_model=cost_model, measure_callbacks=callbacks,
                          task_scheduler=BudgetScheduler(progress, should_stop, seed=self.seed))
        return notes


def _mean_ms(run_secs) -> float:
    values = [float(s) for s in run_secs]
    return sum(values) / len(values) * 1e3


_LOADED: dict[tuple[str, str], Any] = {}


def _json_database(db: TuningDB):
    from tvm.s_tir import meta_schedule as ms
    key = (str(db.path.resolve()), db.digest())
    if key not in _LOADED:
        _LOADED.clear()  # one database at a time: a model compiles with one
        with db.clean_copy() as folder, native_log_to([]):
            try:
                _LOADED[key] = ms.database.JSONDatabase(work_dir=str(folder),
                                                        allow_missing=False)
            except Exception:  # noqa: BLE001 - a record that does not load: see _read_records
                _LOADED[key], _, dropped = _read_records(folder)
                warnings.warn(f"tuning database {db.path}: {dropped} record(s) do not replay on "
                              f"their kernel and are ignored ('mmcompile tune' removes them)",
                              stacklevel=3)
    return _LOADED[key]


def _read_records(folder) -> tuple[Any, list[str], int]:
    """Load a MetaSchedule JSON database record by record into memory, skipping records whose
    trace does not replay on the workload they are filed under.

    MetaSchedule files a record under an existing workload when the kernels are structurally
    equal, ignoring block names; a trace tuned on ``lv90_sum`` then fails to replay on the
    stored ``lv56_sum`` kernel, and ``JSONDatabase`` refuses the whole database (measured
    after a 12-minute CLIP job: ``parallel_for_dynamic error``).

    Returns:
        ``(MemoryDatabase, record lines kept, records dropped)``.
    """
    import json

    from tvm.s_tir import meta_schedule as ms
    from mmcompile.tune.database import RECORDS, WORKLOADS
    memory = ms.database.MemoryDatabase()
    workloads, committed = [], []
    for line in (folder / WORKLOADS).read_text().splitlines():
        if line.strip():
            workloads.append(ms.database.Workload.from_json(json.loads(line)))
            committed.append(memory.commit_workload(workloads[-1].mod))
    kept, dropped = [], 0
    records = folder / RECORDS
    for line in (records.read_text().splitlines() if records.exists() else []):
        if not line.strip():
            continue
        index, data = json.loads(line)
        try:
            record = ms.database.TuningRecord.from_json(data, workloads[index])
        except Exception:  # noqa: BLE001 - TVM raises several types for a bad trace
            dropped += 1
            continue
        memory.commit_tuning_record(ms.database.TuningRecord(
            record.trace, committed[index], record.run_secs, record.target, record.args_info))
        kept.append(line)
    return memory, kept, dropped


def _drop_unloadable_records(db: TuningDB) -> int:
    """Rewrite the records file without the records :func:`_read_records` skips (the job
    holds the database lock); returns how many were dropped."""
    import os
    import tempfile

    from mmcompile.tune.database import RECORDS
    _, kept, dropped = _read_records(db.path)
    if dropped:
        fd, tmp = tempfile.mkstemp(dir=db.path, prefix=".records-")
        with os.fdopen(fd, "w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, db.path / RECORDS)
    return dropped


def apply_database(mod, target, db_path) -> tuple[Any, int]:
    """Give the PrimFuncs of ``mod`` (after the ``zero`` pipeline) the tuned schedule the
    database at ``db_path`` holds for them, where it beat the default schedule; the others stay
    unscheduled for ``schedule_cpu``. Returns ``(mod, hits)``, hits = functions replaced.

    Each record's trace is replayed here rather than by ``MetaScheduleApplyDatabase``: a
    workload matches structurally, ignoring block names, but a trace looks blocks up by name,
    so a record tuned on one layer can fail to replay on an identical layer whose blocks are
    named differently (measured: ``Cannot find a block with the name: lv56_sum`` on CLIP's
    layer norms, aborting the compile). Such a kernel keeps its default schedule.

    Raises:
        TuningDBError: the database is missing, corrupt or was measured for another CPU
            architecture (a different core count or host CPU only warns).
    """
    from tvm import s_tir, tirx
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod
    db = TuningDB.open(db_path)
    for note in db.check_target(target_info(target), STRICT_KEYS, host_info()):
        warnings.warn(note, stacklevel=2)
    source = _json_database(db)
    hits, stale, unreplayable = 0, 0, 0
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or (func.attrs and
                                                   func.attrs.get("tirx.is_scheduled")):
            continue
        workload = _normalize_mod(func)
        if not source.has_workload(workload):
            continue
        top = source.get_top_k(source.commit_workload(workload), 1)
        known = db.meta["tasks"].get(task_key(workload), {})
        untuned = known.get("untuned_ms")
        if known.get("default") != task_key(default_schedule(workload["main"], target).mod):
            stale, untuned = stale + 1, None  # the default changed since: cannot compare
        if not top or (untuned is not None and _mean_ms(top[0].run_secs) >= untuned):
            continue
        try:
            with target, native_log_to([]):
                sch = s_tir.Schedule(workload)
                top[0].trace.apply_to_schedule(sch, remove_postproc=False)
        except Exception:  # noqa: BLE001 - TVM raises several types; the default still works
            unreplayable += 1
            continue
        tuned = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        if not (func.attrs and "global_symbol" in func.attrs):  # normalizing named it "main"
            tuned = tuned.without_attr("global_symbol")
        updates[gv] = tuned
        hits += 1
    if stale:
        warnings.warn(f"tuning database {db.path}: the default schedule of {stale} kernel(s) "
                      f"changed since it was measured (a newer mmcompile?); their tuned "
                      f"schedules are used unchecked: 'mmcompile tune' again re-measures them",
                      stacklevel=2)
    if unreplayable:
        warnings.warn(f"tuning database {db.path}: {unreplayable} tuned schedule(s) did not "
                      f"replay on a structurally identical kernel; those keep the default",
                      stacklevel=2)
    for gv, func in updates.items():
        mod[gv] = func
    return mod, hits
