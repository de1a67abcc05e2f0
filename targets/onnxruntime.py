"""The fallback target: a stage run by onnxruntime.

Where the requested target cannot run a node (an ``LSTM`` or an ``If`` TVM's importer has no
converter for, a float8 cast), the planner places it here, so a model is never refused for one
op among hundreds. The stage's ONNX subgraph is run in an ``InferenceSession`` (CPU execution
provider, onnxruntime's own graph optimizations on unless ``graph_optimizations=false``), with
as many intra-op threads as the other stages get. The artifact holds the subgraph as
``<stage>.onnx``, hashed like every stage file, and loading builds the session again.

onnxruntime is also the reference the compiled models are verified against, so a stage here
computes exactly what verification expects (on CPUs without VNNI with its QDQ ops unfused:
:func:`int8_exact`); what it costs is speed (no fusion across the
stage boundary, onnxruntime's kernels), which ``CompiledModel.report`` shows as the share of
run time spent in fallback stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmcompile.artifact import ArtifactError
from mmcompile.schedule import available_cores, cpu_info
from mmcompile.target import (CompileOptions, Executable, Target, TargetError, TargetOption,
                              register_target)

if TYPE_CHECKING:
    from mmcompile.ir import Graph


def _session(model: bytes, threads: int, optimize: bool):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif not int8_exact():
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def int8_exact() -> bool:
    """Whether onnxruntime's int8 kernels (the QLinearConv / QGemm / QLinearMatMul its graph
    optimizations make of a QDQ graph) sum exactly on this host: with VNNI. Without it (AVX2,
    AVX-512 without VNNI) its u8 x s8 kernels add pairs of products with ``vpmaddubsw``,
    which saturates at int16: measured on znver3, QDQ convolutions and matmuls came out up to
    163 quantization steps off the QDQ graph's own (float) evaluation. There a stage keeps
    its QDQ ops unfused (``session.disable_quant_qdq``) and computes what verification
    expects."""
    flags = cpu_info()["flags"]
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _host(value: Any) -> np.ndarray:
    """A host array onnxruntime accepts, without a copy where the memory is already host."""
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("torch"):
        return value.detach().cpu().numpy()
    if hasattr(value, "__dlpack_device__") and value.__dlpack_device__()[0] == 1:
        return np.from_dlpack(value)
    return value.numpy()  # device memory: onnxruntime's CPU provider needs a host copy


class OnnxRuntimeExecutable(Executable):
    """One stage as an onnxruntime session over its ONNX subgraph."""

    def __init__(self, model: bytes, inputs: list[str], outputs: list[str], threads: int,
                 info: Mapping[str, Any]):
        self.model = model
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.info = dict(info)
        self.session = _session(model, threads, bool(self.info.get("graph_optimizations", True)))

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        results = self.session.run(self.outputs, {n: _host(inputs[n]) for n in self.inputs})
        return dict(zip(self.outputs, results))

    def save(self, directory: Path, stem: str) -> dict[str, str]:
        name = f"{stem}.onnx"
        (directory / name).write_bytes(self.model)
        return {"model": name}

    def describe(self) -> dict[str, Any]:
        return dict(self.info)

    def replica(self) -> OnnxRuntimeExecutable:
        return self  # InferenceSession.run may be called from several threads at once


@register_target
class OnnxRuntimeTarget(Target):
    """onnxruntime's CPU execution provider: runs every op onnxruntime has a kernel for."""

    name = "onnxruntime"
    description = ("onnxruntime (CPU provider): the fallback for nodes the requested target "
                   "cannot run")
    device = "cpu"
    options = (
        TargetOption("graph_optimizations", bool, True,
                     "let onnxruntime optimize the stage's subgraph (false: run it as written)"),
    )

    def compile(self, graph: Graph, options: CompileOptions) -> Executable:
        import onnxruntime as ort
        model = graph.to_onnx().SerializeToString()
        info = {"inputs": [t.name for t in graph.gs.inputs],
                "outputs": [t.name for t in graph.gs.outputs],
                "graph_optimizations": bool(options.config.get("graph_optimizations", True)),
                "versions": {"onnxruntime": ort.__version__},
                "detail": f"onnxruntime {ort.__version__}"}
        try:
            return OnnxRuntimeExecutable(model, info["inputs"], info["outputs"], options.threads,
                                         info)
        except Exception as exc:  # onnxruntime rejects the subgraph: say which stage
            raise TargetError(f"onnxruntime: cannot create a session for {graph.name}: "
                              f"{str(exc).strip().splitlines()[0]}") from exc

    def load(self, directory: Path, files: Mapping[str, str], info: Mapping[str, Any],
             threads: int = 0) -> Executable:
        path = Path(directory) / files["model"]
        try:
            return OnnxRuntimeExecutable(path.read_bytes(), info["inputs"], info["outputs"],
                                         threads, info)
        except KeyError as exc:
            raise ArtifactError(f"{directory}: stage info lacks {exc}") from exc
        except Exception as exc:
            raise ArtifactError(f"cannot load {path} into onnxruntime: {exc}") from exc
