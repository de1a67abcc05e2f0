"""The engines a benchmark child process can run, in a registry keyed by name.

An engine works in three steps, which the runner times separately:

1. ``import_libraries``: import its framework and size its thread pools (not counted as
   compile time for any engine; reported as ``import_s``);
2. ``load``: get the model in hand: the ONNX path, or the torch module rebuilt from the suite by
   name (building a module from code is not compilation either);
3. ``prepare``: whatever must happen before the first result: ORT session creation,
   ``torch.compile`` (lazy: its work happens in the first call), ``mmcompile.compile``. The
   runner counts ``prepare`` plus the first call as ``compile_s``.

This module imports no mmcompile code at the top: the runner loads it by path, so that the
onnxruntime child's peak memory is onnxruntime's, not onnxruntime's plus mmcompile's imports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

RunFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class Engine(ABC):
    """One way of running a workload.

    Attributes:
        name: the name used by ``--against``/``--engines`` and in results.
        needs_module: the engine runs the torch module, so model files cannot use it.
        int8: the engine runs the workload's quantized (QDQ) file, checked against that
            file's own outputs and measured against the float model's.
        baseline: the engine imports mmcompile from ``bench --baseline``'s checkout.
        variants: configurations run in separate processes; the fastest is reported.
    """

    name: ClassVar[str] = ""
    needs_module: ClassVar[bool] = False
    int8: ClassVar[bool] = False  # runs the workload's QDQ int8 file
    baseline: ClassVar[bool] = False  # mmcompile from another checkout
    variants: ClassVar[tuple[str, ...]] = ("default",)

    @abstractmethod
    def import_libraries(self, job: Mapping[str, Any]) -> None:
        """Import the framework and set its thread count to ``job["threads"]``."""

    def load(self, job: Mapping[str, Any]) -> Any:
        """The model as this engine takes it (default: the ONNX file's path, or the QDQ
        file's for an int8 engine)."""
        return job["qdq"] if self.int8 else job["onnx"]

    @abstractmethod
    def prepare(self, model: Any, job: Mapping[str, Any]) -> tuple[RunFn, dict[str, Any]]:
        """Everything before the first call; returns (run, facts for the result row)."""


_ENGINES: dict[str, type[Engine]] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    """Class decorator; two engines with one name is an error."""
    if cls.name in _ENGINES and _ENGINES[cls.name] is not cls:
        raise ValueError(f"benchmark engine '{cls.name}' is registered twice")
    _ENGINES[cls.name] = cls
    return cls


def engine_names() -> list[str]:
    return list(_ENGINES)


def baseline_engines(engines: list[str]) -> list[str]:
    """``engines`` with the ``--baseline`` twin of each mmcompile engine it holds
    (``mmcompile-baseline`` before ``mmcompile``, ``mmcompile-int8-baseline`` before
    ``mmcompile-int8``), or ``mmcompile-baseline`` last when it holds neither."""
    out = list(engines)
    for twin in (name for name, cls in _ENGINES.items() if cls.baseline):
        engine = twin.removesuffix("-baseline")
        if engine in out and twin not in out:
            out.insert(out.index(engine), twin)
    if not any(_ENGINES[e].baseline for e in out if e in _ENGINES):
        out.append("mmcompile-baseline")
    return out


def get_engine(name: str) -> type[Engine]:
    """The engine class called ``name``; KeyError names the known engines."""
    try:
        return _ENGINES[name]
    except KeyError:
        raise KeyError(f"unknown engine '{name}'; known engines: {', '.join(_ENGINES)}") from None


@register_engine
class MMCompileEngine(Engine):
    """``mmcompile.compile`` on the ONNX file for the cpu target, verification off (outputs are
    checked by the harness instead), then :meth:`CompiledModel.run` on numpy arrays."""

    name = "mmcompile"
    schedule = "auto"

    def tuning_db(self, job: Mapping[str, Any]) -> str | None:
        return None

    def import_libraries(self, job: Mapping[str, Any]) -> None:
        import tvm  # noqa: F401  (importing TVM takes seconds; it is not compilation)

        import mmcompile
        mmcompile.registered_targets()

    def prepare(self, model: Any, job: Mapping[str, Any]) -> tuple[RunFn, dict[str, Any]]:
        import inspect

        import mmcompile
        options = {"target": "cpu", "verify": False, "threads": job["threads"],
                   "schedule": self.schedule, "tuning_db": self.tuning_db(job),
                   "fallback": job.get("fallback", "onnxruntime")}
        # an earlier mmcompile (mmcompile-baseline) may not have every option yet
        accepted = inspect.signature(mmcompile.compile).parameters
        compiled = mmcompile.compile(model, **{k: v for k, v in options.items()
                                               if k in accepted})

        def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: np.asarray(v) for k, v in compiled.run(feeds).items()}

        stage = compiled.stages[0]
        targets = sorted({s.info.get("spec", s.target) for s in compiled.stages})
        return run, {"detail": f"{'+'.join(targets)} {stage.info.get('detail', '')}".strip(),
                     "nodes": f"{compiled.metadata.get('nodes_before')} -> "
                              f"{compiled.metadata.get('nodes_after')}",
                     "schedule": compiled.schedule.to_dict(),
                     "stages": {s.name: s.info.get("cost_ms") for s in compiled.stages},
                     "fallback_nodes": len(compiled.fallback_nodes())
                     if hasattr(compiled, "fallback_nodes") else 0}


@register_engine
class MMCompileSequentialEngine(MMCompileEngine):
    """mmcompile with the modality-branch stages run one after another."""

    name = "mmcompile-sequential"
    schedule = "sequential"


@register_engine
class MMCompileParallelEngine(MMCompileEngine):
    """mmcompile with the modality-branch stages run side by side (issue: branch scheduling)."""

    name = "mmcompile-parallel"
    schedule = "parallel"


@register_engine
class MMCompileTunedEngine(MMCompileEngine):
    """mmcompile with the schedules of ``bench --tuning-db`` (issue: autotuning)."""

    name = "mmcompile-tuned"

    def tuning_db(self, job: Mapping[str, Any]) -> str | None:
        return job["tuning_db"]


@register_engine
class MMCompileBaselineEngine(MMCompileEngine):
    """mmcompile from another checkout (``bench --baseline``), in lock-step with this one."""

    name = "mmcompile-baseline"
    baseline = True


@register_engine
class OnnxRuntimeEngine(Engine):
    """onnxruntime's CPU provider with every graph optimization (ORT_ENABLE_ALL). Sequential and
    parallel execution run as separate processes and the faster is reported, since which wins
    depends on the model (parallel mode can run independent modality branches side by side)."""

    name = "onnxruntime"
    variants = ("sequential", "parallel")

    def import_libraries(self, job: Mapping[str, Any]) -> None:
        import onnxruntime  # noqa: F401

    def prepare(self, model: Any, job: Mapping[str, Any]) -> tuple[RunFn, dict[str, Any]]:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = job["threads"]
        if job["variant"] == "parallel":
            opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
            opts.inter_op_num_threads = job["threads"]
        else:
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]

        def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return dict(zip(names, session.run(names, dict(feeds))))

        return run, {"detail": f"ORT_ENABLE_ALL, {job['variant']}"}


@register_engine
class OnnxRuntimeInt8Engine(OnnxRuntimeEngine):
    """onnxruntime on the workload's QDQ int8 file (from ``mmcompile.quantize``): its graph
    optimizations fuse the QDQ pairs into its int8 kernels."""

    name = "onnxruntime-int8"
    int8 = True


@register_engine
class MMCompileInt8Engine(MMCompileEngine):
    """mmcompile compiling the same QDQ int8 file as ``onnxruntime-int8``."""

    name = "mmcompile-int8"
    int8 = True


@register_engine
class MMCompileInt8BaselineEngine(MMCompileInt8Engine):
    """``mmcompile-int8`` from another checkout (``bench --baseline``), in lock-step."""

    name = "mmcompile-int8-baseline"
    baseline = True


@register_engine
class TorchEngine(Engine):
    """PyTorch eager on the suite module, under ``torch.inference_mode``."""

    name = "torch"
    needs_module = True
    mode = "eager"

    def import_libraries(self, job: Mapping[str, Any]) -> None:
        import torch
        torch.set_num_threads(job["threads"])
        import mmcompile.bench.suite  # noqa: F401  (builds the module by name)

    def load(self, job: Mapping[str, Any]) -> Any:
        from mmcompile.bench.suite import build
        module, _ = build(job["suite_model"], job["batch"])
        return module

    def wrap(self, module: Any) -> Any:
        return module

    def prepare(self, model: Any, job: Mapping[str, Any]) -> tuple[RunFn, dict[str, Any]]:
        import torch
        fn = self.wrap(model)
        names = list(job["output_names"])

        def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            with torch.inference_mode():
                out = fn(**{k: torch.from_numpy(v) for k, v in feeds.items()})
            outs = out if isinstance(out, (tuple, list)) else (out,)
            return {n: o.numpy() for n, o in zip(names, outs, strict=True)}

        return run, {"detail": f"torch {torch.__version__}, {self.mode}"}


@register_engine
class TorchCompileEngine(TorchEngine):
    """``torch.compile`` (inductor, default mode) in a process whose inductor cache folder is
    empty: its compile time (the first call) is the cold one."""

    name = "torch-compile"
    mode = "inductor"

    def import_libraries(self, job: Mapping[str, Any]) -> None:
        super().import_libraries(job)
        import torch._dynamo  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401

    def wrap(self, module: Any) -> Any:
        import torch
        return torch.compile(module)


@register_engine
class TorchCompileMMCompileEngine(TorchCompileEngine):
    """``torch.compile(module, backend="mmcompile")`` (:mod:`mmcompile.torch_backend`): each
    graph dynamo captures is compiled by mmcompile for the cpu target with the job's threads,
    verification off as for the ``mmcompile`` engine (the harness checks outputs). As for
    ``torch-compile``, the compilation happens in the first call."""

    name = "torch-compile-mmcompile"
    mode = "mmcompile backend"

    def import_libraries(self, job: Mapping[str, Any]) -> None:
        TorchEngine.import_libraries(self, job)
        import torch._dynamo  # noqa: F401
        import tvm  # noqa: F401  (importing TVM takes seconds; it is not compilation)

        import mmcompile
        import mmcompile.torch_backend
        mmcompile.registered_targets()

    def prepare(self, model: Any, job: Mapping[str, Any]) -> tuple[RunFn, dict[str, Any]]:
        self.options = {"target": "cpu", "threads": job["threads"], "verify": False,
                        "fallback": job.get("fallback", "onnxruntime")}
        return super().prepare(model, job)

    def wrap(self, module: Any) -> Any:
        import torch
        return torch.compile(module, backend="mmcompile", options=self.options)
