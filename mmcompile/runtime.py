"""CompiledModel: runs compiled stages, validates inputs, saves and loads artifacts.

A model is a list of stages in dependency order, each with its own target; each stage reads
named tensors produced by the graph inputs or by earlier stages. It runs the
:class:`~mmcompile.schedule.Schedule` it is given (made by :mod:`mmcompile.planning`); it plans
nothing itself.

Tensors pass between stages as whatever the executables return (DLPack-capable arrays), without
copies where both sides use the same memory (a TVM CPU stage's output is an onnxruntime
stage's input as is). Where they do not (a GPU stage's output read by a CPU stage), the
consuming executable copies it in (``Executable.copy_in``), and ``profile`` shows each such
copy with its time and size. The caller gets back the kind it gave: torch tensors in -> torch
tensors out, numpy in -> numpy out.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mmcompile.artifact import ArtifactError, write_artifact
from mmcompile.errors import InputError
from mmcompile.executor import StageError, WorkerPool, run_parallel, run_stages
from mmcompile.report import format_table, quantization_lines
from mmcompile.schedule import Schedule, check_kind
from mmcompile.signature import Signature
from mmcompile.target import Executable, get_target

@dataclass
class Stage:
    """One compiled stage: what it reads and writes, its target (registered name) and the
    device that target runs on, and its executable. ``info`` holds the manifest facts: the
    target as placed (``spec``), ``nodes``, ``cost_ms``, ``placement`` (why it is here)."""

    name: str
    target: str
    inputs: list[str]
    outputs: list[str]
    executable: Executable
    compile_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    depends_on: list[str] = field(default_factory=list)
    device: str = "cpu"


def _device_type(value: Any) -> int:
    """The DLPack device type of an array (1: host memory)."""
    if isinstance(value, np.ndarray) or not hasattr(value, "__dlpack_device__"):
        return 1
    return int(value.__dlpack_device__()[0])


def _thread_setup(targets: list[str], threads: int) -> Callable[[], None]:
    """What a worker runs once: size its compute pools (no reference to the model)."""
    def setup() -> None:
        for name in targets:
            get_target(name).configure_thread(threads)
    return setup


def wants_torch(feeds: Mapping[str, Any]) -> bool:
    """Whether the caller passed torch tensors (and so gets torch tensors back)."""
    return any(type(v).__module__.startswith("torch") for v in feeds.values())


# torch dtypes Tensor.numpy() can view (by name: torch is imported only by its callers)
_NUMPY_DTYPE_NAMES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32",
                                "int64", "uint8", "bool", "complex64", "complex128"})


def host_views(feeds: Mapping[str, Any]) -> dict[str, Any]:
    """``feeds`` with each torch tensor in host memory of a dtype numpy has as a numpy view of
    it (any other value as it is): the call then takes the numpy path. The torch path (DLPack
    device queries, per-stage closures), run right after the kernels with cold caches, cost
    0.1-0.2 ms more per call at batch 1 (AV-MNIST through torch.compile: 0.88 -> 0.75 ms).
    The caller still gets torch tensors back (:func:`wants_torch` on the original feeds)."""
    return {name: _host_view(value) if type(value).__module__.startswith("torch") else value
            for name, value in feeds.items()}


def _host_view(value: Any) -> Any:
    if (value.device.type != "cpu" or value.is_conj() or value.is_neg()
            or str(value.dtype).removeprefix("torch.") not in _NUMPY_DTYPE_NAMES):
        return value
    return value.detach().numpy()


def host_array(value: Any) -> np.ndarray:
    """``value`` (numpy, torch, or anything with DLPack on the host) as a numpy array."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        return value.detach().cpu().numpy()
    return np.from_dlpack(value) if hasattr(value, "__dlpack_device__") else np.asarray(value)


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


class ModelCalls:
    """How a model with a ``signature`` and ``run`` is called: what
    :class:`CompiledModel` and the dispatcher over builds
    (:class:`~mmcompile.profiles.ProfiledModel`) share."""

    signature: Signature

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.signature.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.signature.outputs]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            if len(args) > len(self.input_names):
                raise InputError(f"{len(args)} positional inputs given, the model takes "
                                 f"{len(self.input_names)}: {self.input_names}")
            kwargs = {**dict(zip(self.input_names, args)), **kwargs}
        outputs = list(self.run(kwargs).values())
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


class CompiledModel(ModelCalls):
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
            executable = stage.executable
            wanted = executable.memory_device_type
            feeds = {}
            for tensor in stage.inputs:
                value = env[tensor]
                if _device_type(value) != wanted:  # across a memory boundary: an explicit copy
                    start = time.perf_counter()
                    value = executable.copy_in(value)
                    if timeline is not None:
                        timeline.append((f"copy {tensor} -> {name}", "copies", start,
                                         time.perf_counter()))
                feeds[tensor] = value
            env.update(executable.run(feeds))

        schedule = self._schedule
        if schedule.kind == "parallel":
            placed = {n for names in schedule.workers for n in names}
            tail = [s.name for s in self.stages if s.name not in placed]
            run_parallel(self._workers(), schedule.workers, tail, run_one, timeline,
                         schedule.lane_names())
        else:
            run_stages([s.name for s in self.stages], run_one, "caller", timeline)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on input name -> array; returns output name -> array (same kind as the inputs).

        Raises:
            InputError: a missing/unknown input, wrong rank, shape or dtype, or an index
                outside the table it indexes.
        """
        torch_out = wants_torch(feeds)
        if torch_out:
            feeds = host_views(feeds)
        return self._run_ready(self.signature.validate(feeds), torch_out)

    def _run_ready(self, ready: Mapping[str, Any], torch_out: bool) -> dict[str, Any]:
        """:meth:`run` on inputs already validated (a dispatcher over builds validates once)."""
        single = self._single_stage
        with self._lock:
            if single is not None and self._schedule.kind != "parallel" \
                    and all(type(v) is np.ndarray for v in ready.values()):
                # The common call (one host stage, numpy inputs) without the general
                # path's environment and per-stage closures: ~10 us of a 0.45 ms call.
                try:
                    env = single.executable.run(ready)
                except StageError:
                    raise
                except BaseException as exc:  # as run_stages reports it
                    raise StageError(single.name, exc) from exc
            else:
                env = dict(ready)
                self._execute(env)
        return {name: _to_caller(env[name], torch_out) for name in self._outputs}

    @cached_property
    def _single_stage(self) -> Stage | None:
        """The one stage, when there is one, it runs on host memory and it computes every
        output: :meth:`_run_ready` then calls it directly."""
        if len(self.stages) != 1:
            return None
        stage = self.stages[0]
        if stage.executable.memory_device_type != 1 or not set(self._outputs) <= set(
                stage.outputs):
            return None
        return stage

    @cached_property
    def _outputs(self) -> list[str]:
        return self.output_names

    def profile(self, feeds: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Run once and return per-stage timings: ``stage``, ``target``, ``lane`` (a worker,
        a device lane or the caller), ``start_ms`` and ``end_ms`` relative to the start of the
        run. Copies between memories are entries of their own (lane ``copies``, target
        ``copy``)."""
        env: dict[str, Any] = dict(self.signature.validate(feeds))
        timeline: list = []
        with self._lock:
            start = time.perf_counter()
            self._execute(env, timeline)
        return [{"stage": s, "target": self._by_name[s].target if s in self._by_name else "copy",
                 "lane": lane, "start_ms": (a - start) * 1e3, "end_ms": (b - start) * 1e3}
                for s, lane, a, b in sorted(timeline, key=lambda t: t[2])]

    def time_shares(self) -> dict[str, float] | None:
        """Each stage's share of one run's time, from the costs measured at compile time
        (None when they were not measured)."""
        if len(self.stages) == 1:
            return {self.stages[0].name: 1.0}
        costs = {s.name: s.info.get("cost_ms") for s in self.stages}
        if any(c is None for c in costs.values()) or not sum(costs.values()):
            return None
        total = sum(costs.values())
        return {name: cost / total for name, cost in costs.items()}

    def fallback_nodes(self) -> dict[str, str]:
        """Node -> why it is not on its preferred target, over every stage."""
        found: dict[str, str] = {}
        for stage in self.stages:
            found.update(stage.info.get("placement", {}).get("fell_back", {}))
        return found

    def report(self) -> str:
        """Passes, stages (target, nodes, share of the run time, compile time, why there),
        the schedule, the nodes that fell back, verification; as text."""
        lines = [f"target: {self.target}"]
        if self.metadata.get("pipeline"):
            lines.append(f"passes: {self.metadata['pipeline']}")
        if "nodes_before" in self.metadata:
            lines.append(f"graph: {self.metadata['nodes_before']} -> "
                         f"{self.metadata['nodes_after']} nodes after optimization")
        if self.metadata.get("specialized"):
            lines.append("shapes: symbolic dims fixed to the example inputs ("
                         + ", ".join(f"{k} {v['declared']} -> {v['shape']}"
                                     for k, v in self.metadata["specialized"].items())
                         + "); input_shapes= / --input-shape sets others")
        if self.metadata.get("quantization"):
            lines += quantization_lines(self.metadata["quantization"])
        shares = self.time_shares()
        rows = [(s.name, s.info.get("spec", s.target), len(s.info.get("nodes", [])) or "-",
                 f"{100 * shares[s.name]:.0f}%" if shares else "-", f"{s.compile_seconds:.2f}",
                 s.info.get("placement", {}).get("reason", ""), s.info.get("detail", ""))
                for s in self.stages]
        lines.append(format_table(["stage", "target", "nodes", "time", "compile s", "why",
                                   "detail"], rows))
        schedule = self._schedule
        if schedule.kind == "parallel":
            lanes = "; ".join(f"{lane} ({t} thread{'s' if t > 1 else ''}): {', '.join(w)}"
                              for lane, w, t in zip(schedule.lane_names(), schedule.workers,
                                                    schedule.threads))
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
        fell_back = self.fallback_nodes()
        if fell_back:
            fallback = {s.name for s in self.stages if s.info.get("placement", {}).get("fallback")}
            share = f"{100 * sum(shares[n] for n in fallback):.0f}%" if shares else "unmeasured"
            lines.append(f"fallback: {len(fell_back)} node(s) in {len(fallback)} stage(s), "
                         f"{share} of the run time:")
            lines += [f"  {node}: {reason}" for node, reason in fell_back.items()]
        if self.metadata.get("tuning_db"):
            db = self.metadata["tuning_db"]
            lines.append(f"tuning database: {db['hits']} of {db['kernels']} kernels tuned, "
                         f"from {db['path']} (sha256 {db['sha256'][:16]}...)")
        if self.metadata.get("verification"):
            lines.append("verification: " + self.metadata["verification"])
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact folder (atomically). Returns its path."""
        manifest = manifest_head(self.stages, self.metadata, self.target, self.signature,
                                 self._schedule)
        return write_artifact(path, manifest, self._stage_entries)

    def _stage_entries(self, folder: Path, prefix: str = "") -> list[dict[str, Any]]:
        """Write each stage's files into ``folder`` (names start with ``prefix``: an artifact
        with several builds) and return their manifest entries."""
        entries = []
        for stage in self.stages:
            files = stage.executable.save(folder, prefix + stage.name)
            entries.append({"name": stage.name, "target": stage.target,
                            "inputs": stage.inputs, "outputs": stage.outputs,
                            "depends_on": stage.depends_on,
                            "files": files, "compile_seconds": stage.compile_seconds,
                            "info": {**stage.info, **stage.executable.describe()}})
        return entries


def manifest_head(stages, metadata: Mapping[str, Any], target: str, signature: Signature,
                  schedule: Schedule) -> dict[str, Any]:
    """The manifest fields every artifact has: versions (mmcompile's, the stages', the
    metadata's), creation time, target, signature, schedule and metadata."""
    from mmcompile import __version__
    versions = {k: v for s in stages for k, v in s.info.get("versions", {}).items()}
    return {"versions": {"mmcompile": __version__, **versions, **metadata.get("versions", {})},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": target, "signature": signature.to_dict(), "schedule": schedule.to_dict(),
            "metadata": {k: v for k, v in metadata.items() if k != "versions"}}


def model_from_entries(path: Path, manifest: Mapping[str, Any], entries: list[dict[str, Any]],
                       threads: int = 0, schedule: str | None = None) -> CompiledModel:
    """A :class:`CompiledModel` from manifest stage ``entries`` (checked by
    :func:`~mmcompile.artifact.read_manifest`) and the manifest's signature, schedule and
    metadata; ``load`` for one build.

    Raises:
        ArtifactError: a malformed signature.
    """
    try:
        signature = Signature.from_dict(manifest["signature"])
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: malformed signature in the manifest: {exc}") from exc
    stages = []
    for entry in entries:
        target = get_target(entry["target"])
        executable = target.load(path, entry["files"], {**entry.get("info", {}),
                                                        "versions": manifest["versions"]},
                                 threads=threads)
        stages.append(Stage(entry["name"], entry["target"], list(entry["inputs"]),
                            list(entry["outputs"]), executable, entry.get("compile_seconds", 0.0),
                            entry.get("info", {}), list(entry.get("depends_on", [])),
                            target.device))
    metadata = {**manifest.get("metadata", {}), "versions": manifest["versions"]}
    chosen = Schedule.from_dict(manifest.get("schedule", {"kind": "sequential"}))
    model = CompiledModel(signature, stages, manifest["target"], metadata, chosen)
    if schedule is not None and check_kind(schedule) != model.schedule.kind:
        from mmcompile.planning.parallel import replan
        model.schedule = replan(model, schedule, threads)
    return model
