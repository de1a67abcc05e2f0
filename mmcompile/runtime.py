"""CompiledModel: runs compiled stages, validates inputs, saves and loads artifacts.

A model is a list of stages in dependency order; each stage reads named tensors produced by the
graph inputs or by earlier stages. Tensors pass between stages as whatever the executables
return (DLPack-capable arrays), without copies. The caller gets back the kind it gave: torch
tensors in -> torch tensors out, numpy in -> numpy out.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcompile.artifact import ArtifactError, read_manifest, write_artifact
from mmcompile.errors import InputError
from mmcompile.executor import WorkerPool, run_parallel, run_stages
from mmcompile.report import format_table
from mmcompile.schedule import Schedule, available_cores, check_kind, plan_parallel
from mmcompile.signature import Signature
from mmcompile.target import Executable, get_target


@dataclass
class Stage:
    """One compiled stage: what it reads and writes, its target and its executable."""

    name: str
    target: str
    inputs: list[str]
    outputs: list[str]
    executable: Executable
    compile_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    depends_on: list[str] = field(default_factory=list)


def _thread_setup(targets: list[str], threads: int) -> Callable[[], None]:
    """What a worker runs once: size its compute pools (no reference to the model)."""
    def setup() -> None:
        for name in targets:
            get_target(name).configure_thread(threads)
    return setup


def _wants_torch(feeds: Mapping[str, Any]) -> bool:
    return any(type(v).__module__.startswith("torch") for v in feeds.values())


def _to_caller(value: Any, torch_out: bool) -> Any:
    if torch_out:
        import torch
        return torch.from_dlpack(value)
    if isinstance(value, np.ndarray):
        return value
    if value.__dlpack_device__()[0] != 1:  # not host memory (a GPU stage): numpy needs a copy
        return value.numpy()
    # Zero-copy: the VM allocates fresh output buffers on every call (checked on TVM 0.27).
    return np.from_dlpack(value)


class CompiledModel:
    """A compiled multimodal model. Call it with keyword inputs (numpy arrays or torch tensors).

    ``cm(**inputs)`` returns one array for single-output models and a tuple otherwise;
    ``cm.run(inputs)`` returns a dict keyed by output name.
    """

    def __init__(self, signature: Signature, stages: list[Stage], target: str,
                 metadata: Mapping[str, Any] | None = None, schedule: Schedule | None = None):
        self.signature = signature
        self.stages = stages
        self.target = target
        self.metadata = dict(metadata or {})
        self._by_name = {s.name: s for s in stages}
        self._pool: WorkerPool | None = None
        # One VM must never be called from two threads at once; calls are serialised per model.
        self._lock = threading.Lock()
        self.schedule = schedule or Schedule("sequential")

    @property
    def schedule(self) -> Schedule:
        """How stages run: sequential, or parallel on long-lived workers."""
        return self._schedule

    @schedule.setter
    def schedule(self, schedule: Schedule) -> None:
        with self._lock:
            self._schedule = schedule
            if self._pool is not None:  # worker thread budgets belong to the old schedule
                self._pool.close()
                self._pool = None

    def close(self) -> None:
        """Stop the worker threads now (they also stop when the model is garbage-collected)."""
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None

    def _workers(self) -> WorkerPool:
        if self._pool is None:
            setups = [_thread_setup(sorted({self._by_name[n].target for n in names}), threads)
                      for names, threads in zip(self._schedule.workers, self._schedule.threads)]
            self._pool = WorkerPool(setups)
            # Workers must not keep the model alive: stop them when it is collected.
            weakref.finalize(self, self._pool.close)
        return self._pool

    def _execute(self, env: dict[str, Any], timeline: list | None = None) -> None:
        def run_one(name: str) -> None:
            stage = self._by_name[name]
            env.update(stage.executable.run({n: env[n] for n in stage.inputs}))

        schedule = self._schedule
        if schedule.kind == "parallel":
            placed = {n for names in schedule.workers for n in names}
            tail = [s.name for s in self.stages if s.name not in placed]
            run_parallel(self._workers(), schedule.workers, tail, run_one, timeline)
        else:
            run_stages([s.name for s in self.stages], run_one, "caller", timeline)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.signature.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.signature.outputs]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on input name -> array; returns output name -> array (same kind as the inputs).

        Raises:
            InputError: a missing/unknown input, wrong rank, shape or dtype, or an index
                outside the table it indexes.
        """
        torch_out = _wants_torch(feeds)
        env: dict[str, Any] = dict(self.signature.validate(feeds))
        with self._lock:
            self._execute(env)
        return {name: _to_caller(env[name], torch_out) for name in self.output_names}

    def profile(self, feeds: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Run once and return per-stage timings: ``stage``, ``lane`` (worker or caller),
        ``start_ms`` and ``end_ms`` relative to the start of the run."""
        env: dict[str, Any] = dict(self.signature.validate(feeds))
        timeline: list = []
        with self._lock:
            start = time.perf_counter()
            self._execute(env, timeline)
        return [{"stage": s, "lane": lane, "start_ms": (a - start) * 1e3,
                 "end_ms": (b - start) * 1e3} for s, lane, a, b in sorted(timeline,
                                                                           key=lambda t: t[2])]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            if len(args) > len(self.input_names):
                raise InputError(f"{len(args)} positional inputs given, the model takes "
                                 f"{len(self.input_names)}: {self.input_names}")
            kwargs = {**dict(zip(self.input_names, args)), **kwargs}
        outputs = list(self.run(kwargs).values())
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def report(self) -> str:
        """Passes, stages and per-stage compile time, as text."""
        lines = [f"target: {self.target}"]
        if self.metadata.get("pipeline"):
            lines.append(f"passes: {self.metadata['pipeline']}")
        if "nodes_before" in self.metadata:
            lines.append(f"graph: {self.metadata['nodes_before']} -> "
                         f"{self.metadata['nodes_after']} nodes after optimization")
        rows = [(s.name, s.target, len(s.inputs), len(s.outputs), f"{s.compile_seconds:.2f}",
                 s.info.get("detail", "")) for s in self.stages]
        lines.append(format_table(["stage", "target", "inputs", "outputs", "compile s", "detail"],
                                  rows))
        schedule = self._schedule
        if schedule.kind == "parallel":
            lanes = "; ".join(f"worker {i} ({t} thread{'s' if t > 1 else ''}): {', '.join(w)}"
                              for i, (w, t) in enumerate(zip(schedule.workers, schedule.threads)))
            lines.append(f"schedule: parallel: {lanes}; then the rest on the caller")
        else:
            lines.append("schedule: sequential")
        if schedule.measured_ms:
            lines.append("measured: " + ", ".join(f"{k} {v:.2f} ms"
                                                  for k, v in schedule.measured_ms.items())
                         + f" (critical-path bound {schedule.bound_ms:.2f} ms)")
            if "parallel" not in schedule.measured_ms and schedule.estimate_ms:
                lines.append(f"parallel schedule predicted {schedule.estimate_ms:.2f} ms from "
                             f"those: branch stages not compiled")
        if self.metadata.get("tuning_db"):
            db = self.metadata["tuning_db"]
            lines.append(f"tuning database: {db['hits']} of {db['kernels']} kernels tuned, "
                         f"from {db['path']} (sha256 {db['sha256'][:16]}...)")
        if self.metadata.get("verification"):
            lines.append("verification: " + self.metadata["verification"])
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact folder (atomically). Returns its path."""
        from mmcompile import __version__

        def write_stages(folder: Path) -> list[dict[str, Any]]:
            entries = []
            for stage in self.stages:
                files = stage.executable.save(folder, stage.name)
                entries.append({"name": stage.name, "target": stage.target,
                                "inputs": stage.inputs, "outputs": stage.outputs,
                                "depends_on": stage.depends_on,
                                "files": files, "compile_seconds": stage.compile_seconds,
                                "info": {**stage.info, **stage.executable.describe()}})
            return entries

        manifest = {"versions": {"mmcompile": __version__, **self.metadata.get("versions", {})},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "target": self.target, "signature": self.signature.to_dict(),
                    "schedule": self._schedule.to_dict(),
                    "metadata": {k: v for k, v in self.metadata.items() if k != "versions"}}
        return write_artifact(path, manifest, write_stages)


def load(path: str | os.PathLike, threads: int = 0, schedule: str | None = None) -> CompiledModel:
    """Load an artifact written by :meth:`CompiledModel.save`; no compiler is needed.

    Args:
        path: the ``.mmc`` folder.
        threads: threads for stages run on the calling thread (0: all available cores).
        schedule: ``"sequential"`` or ``"parallel"`` to override the schedule chosen at compile
            time (``"parallel"`` re-plans from the recorded stage costs).

    Raises:
        ArtifactError: missing, corrupt, tampered with, or built by an incompatible version.
    """
    path = Path(path)
    manifest = read_manifest(path)
    try:
        signature = Signature.from_dict(manifest["signature"])
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: malformed signature in the manifest: {exc}") from exc
    stages = []
    for entry in manifest["stages"]:
        target = get_target(entry["target"])
        executable = target.load(path, entry["files"], {**entry.get("info", {}),
                                                        "versions": manifest["versions"]},
                                 threads=threads)
        stages.append(Stage(entry["name"], entry["target"], list(entry["inputs"]),
                            list(entry["outputs"]), executable, entry.get("compile_seconds", 0.0),
                            entry.get("info", {}), list(entry.get("depends_on", []))))
    metadata = {**manifest.get("metadata", {}), "versions": manifest["versions"]}
    chosen = Schedule.from_dict(manifest.get("schedule", {"kind": "sequential"}))
    model = CompiledModel(signature, stages, manifest["target"], metadata, chosen)
    if schedule is not None and schedule != chosen.kind:
        model.schedule = replan(model, check_kind(schedule), threads)
    return model


def stage_costs(model: CompiledModel) -> dict[str, float]:
    """Each stage's cost in ms as recorded at compile time (1.0 when unknown)."""
    return {s.name: float(s.info.get("cost_ms", 1.0)) for s in model.stages}


def replan(model: CompiledModel, kind: str, threads: int = 0) -> Schedule:
    """A schedule of ``kind`` for ``model``'s stages from their recorded costs."""
    if kind == "sequential":
        return Schedule("sequential")
    order = [s.name for s in model.stages]
    deps = {s.name: s.depends_on for s in model.stages}
    return plan_parallel(order, deps, stage_costs(model), threads or available_cores())
