"""The TVM targets: ONNX stage -> Relax (TVM's ONNX importer) -> scheduled TIR -> library.

Lowering: ``from_onnx`` with weights baked in as constants, ``DecomposeOpsForInference``, the
``zero`` pipeline (legalize to TIR, fuse) and single-element reductions made elementwise
(:mod:`.unit_reductions`), then schedules (CPU: :mod:`.schedules`; CUDA: dlight
GPU rules), then ``tvm.compile``. The graph passes in front (``legalize-for-tvm``,
``fold-constants``) have already removed what the importer rejects.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmcompile.target import (SUPPORTED, CompileOptions, Executable, Support, Target, TargetError,
                              TargetOption, register_target)
from mmcompile.targets.tvm.executable import (TVMExecutable, configure_threads,
                                              configure_worker_thread, load_executable,
                                              native_log_to)

if TYPE_CHECKING:
    from mmcompile.ir import Graph


@functools.lru_cache(maxsize=None)
def supported_ops() -> frozenset[str]:
    """Op types TVM's Relax ONNX importer has a converter for."""
    from tvm.relax.frontend.onnx import onnx_frontend
    return frozenset(onnx_frontend._get_convert_map())


@functools.lru_cache(maxsize=None)
def _no_dtype() -> dict[int, str]:
    """ONNX element types TVM has no dtype for (its importer fails on them): string, complex,
    float8, 4-bit integers and float4."""
    import onnx
    kinds = {onnx.TensorProto.STRING: "string", onnx.TensorProto.COMPLEX64: "complex64",
             onnx.TensorProto.COMPLEX128: "complex128"}
    for name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "UINT4",
                 "INT4", "FLOAT4E2M1"):
        if hasattr(onnx.TensorProto, name):
            kinds[getattr(onnx.TensorProto, name)] = name.lower()
    return kinds


def _elem_type(tensor) -> int | None:
    import onnx
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        return None


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"


def import_relax(graph: Graph, target_name: str, converters=None):
    """The Relax module for ``graph`` (TVM's ONNX importer, with ``converters``, a context
    manager that adds converters, active), or TargetError naming the cause."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), (converters or contextlib.nullcontext()):
            # (the importer prints the failing op on stdout)
            mod = from_onnx(graph.to_onnx(), keep_params_in_input=False)
    except Exception as exc:
        failing = re.search(r"Error converting operator (\w+)", log.getvalue())
        where = f" while converting {failing.group(1)}" if failing else ""
        raise TargetError(f"{target_name}: TVM's ONNX importer failed on {graph.name}{where}: "
                          f"{_first_line(exc)}") from exc
    return relax.transform.DecomposeOpsForInference()(mod)


class _TVMTarget(Target):
    device = "cpu"
    pipeline = "legalize-for-tvm"
    # How the Relax VM runs ``main``: "bytecode" (interpreted) or "compiled" (to native code)
    exec_mode = "bytecode"
    native: ClassVar[dict[str, Callable]] = {}  # op -> refusal(node, graph): ops lowered here

    def supports(self, node, graph: Graph) -> Support:
        """An op TVM's ONNX importer converts (or this target lowers itself, ``native``), that
        :mod:`.legalize` can make importable, on element types TVM has."""
        if node.op in self.native:
            reason = self.native[node.op](node, graph)
            return Support(False, f"{node.op}: {reason}") if reason else SUPPORTED
        if node.op not in supported_ops():
            return Support(False, f"TVM {_tvm_version()}'s ONNX importer has no converter for "
                                  f"{node.op}")
        from mmcompile.targets.tvm import legalize
        reason = legalize.refusal(node, graph)
        if reason:
            return Support(False, f"{node.op}: {reason}")
        for tensor in (*node.inputs, *node.outputs):
            kind = _no_dtype().get(_elem_type(tensor))
            if kind is not None:
                return Support(False, f"TVM has no {kind} type (tensor '{tensor.name}')")
        return SUPPORTED

    def _tvm_target(self, options: CompileOptions):
        raise NotImplementedError

    def _converters(self, target):
        """A context manager adding this target's own importer converters (None: none)."""
        return None

    def _schedule(self, mod, target):
        raise NotImplementedError

    def _lower(self, mod, target, options: CompileOptions):
        """Relax (after import) -> (scheduled module, facts for the manifest): the zero
        pipeline, then the schedules."""
        from mmcompile.targets.tvm.lowering import legalize_and_fuse
        return self._schedule(legalize_and_fuse(mod, target), target), {}

    def compile(self, graph: Graph, options: CompileOptions) -> Executable:
        from tvm import relax
        configure_threads(options.threads)
        target = self._tvm_target(options)
        unknown = [t.name for t in graph.gs.inputs if t.shape is None]
        if unknown:  # TVM imports no tensor of unknown rank (an assertion deep in lowering)
            raise TargetError(
                f"{self.name}: the input(s) {', '.join(repr(n) for n in unknown)} of stage "
                f"{graph.name} have no known shape: another target computes them and shape "
                f"inference cannot tell their shape; place their producers on '{self.name}' "
                f"too, or fix the shapes they depend on")
        options.progress(f"importing {graph.name} into Relax")
        mod = import_relax(graph, self.name, self._converters(target))
        options.progress("lowering and scheduling")
        with native_log_to([]):
            mod, facts = self._lower(mod, target, options)
        if "tuning" in facts:
            options.progress(f"tuning database: {facts['tuning']['hits']} of "
                             f"{facts['tuning']['kernels']} kernels tuned")
        if "int8" in facts:
            options.progress(f"int8 kernels: {facts['int8']['kernels']} quantized "
                             f"contraction(s), {facts['int8']['instructions']}")
        options.progress(f"generating code for {target.kind.name}")
        try:
            # In the target's scope: TVM's CUDA compile callback reads the arch from it.
            with target, native_log_to([]):
                executable = relax.build(mod, target, exec_mode=self.exec_mode)
        except Exception as exc:
            raise TargetError(f"{self.name}: code generation failed for {graph.name}: "
                              f"{_first_line(exc)}") from exc
        info = {"inputs": [t.name for t in graph.gs.inputs],
                "outputs": [t.name for t in graph.gs.outputs],
                "tvm_target": str(target), "versions": {"tvm": _tvm_version()},
                "detail": self._detail(target), **facts}
        return self._executable(executable, info, options)

    def _detail(self, target) -> str:
        return str(target.attrs.get("mcpu", ""))

    def _executable(self, executable, info: dict[str, Any], options: CompileOptions) -> Executable:
        return TVMExecutable(executable, info["inputs"], info["outputs"], self.device, info)

    def load(self, directory: Path, files: Mapping[str, str], info: Mapping[str, Any],
             threads: int = 0) -> Executable:
        return load_executable(directory, files, info, self.device, threads)

    def configure_thread(self, threads: int) -> None:
        configure_worker_thread(threads)


def _tvm_version() -> str:
    import tvm
    return tvm.__version__


def _recurrent_refusal(node, graph) -> str | None:
    from mmcompile.targets.tvm.recurrent import refusal  # imports TVM: only when planning
    return refusal(node, graph)


def _body_refusal(body, graph, what: str = "body") -> str | None:
    """Why the CPU target cannot run a node of a control-flow body (or branch), or None."""
    target = TVMCpuTarget()
    for inner in body.nodes:
        support = target.supports(inner, graph)
        if not support:
            return f"its {what} node '{inner.name}' ({inner.op}): {support.reason}"
    return None


def _loop_refusal(node, graph) -> str | None:
    """A ``Loop`` / ``Scan`` is unrolled by legalize-for-tvm (:mod:`.unroll`) when its
    iteration count is a compile-time constant and every node of its body runs here."""
    from mmcompile.targets.tvm import unroll
    check = unroll.loop_refusal if node.op == "Loop" else unroll.scan_refusal
    return check(node, graph) or _body_refusal(node.attrs["body"], graph)


def _if_refusal(node, graph) -> str | None:
    """An ``If`` whose condition is only known at run time: TVM's importer turns it into Relax
    control flow (``relax.If``, both branches compiled, one run) when every node of both
    branches is one the CPU target supports and the branches give outputs of one rank and
    type. (An ``If`` on a constant condition never gets here: fold-constants inlines the
    branch taken.)"""
    branches = [node.attrs.get("then_branch"), node.attrs.get("else_branch")]
    if any(b is None for b in branches):
        return "a branch is missing"
    for branch in branches:
        reason = _body_refusal(branch, graph, "branch")
        if reason:
            return reason
    then_out, else_out = (b.outputs for b in branches)
    for a, b in zip(then_out, else_out):
        if a.dtype != b.dtype or (a.shape is not None and b.shape is not None
                                  and len(a.shape) != len(b.shape)):
            return f"its branches give outputs of different types ({a.name}, {b.name})"
    return None


@register_target
class TVMCpuTarget(_TVMTarget):
    """x86/ARM CPUs through LLVM, with the host CPU detected by name (``config["mcpu"]``
    overrides it)."""

    name = "cpu"
    description = "CPU via TVM + LLVM (host CPU detected, parallel + vectorized schedules)"
    # ``main`` compiled to native code rather than interpreted: its ~250 VM instructions per
    # call at batch 1 (kernel calls, tensor allocations, kills) run without dispatch.
    # Same-process A/B of saved artifacts, batch 1, outputs identical: MOSEI-TFN 0.960x,
    # CLIP 0.982x, MobileNet-text 0.980x.
    exec_mode = "compiled"
    native = {"LSTM": _recurrent_refusal, "GRU": _recurrent_refusal, "RNN": _recurrent_refusal,
              "If": _if_refusal, "Loop": _loop_refusal, "Scan": _loop_refusal}
    options = (
        TargetOption("mcpu", str, None, "LLVM CPU name instead of the detected host CPU "
                                        "(e.g. skylake-avx512, znver4)"),
        TargetOption("winograd", bool, True, "3x3 / 5x5 stride-1 convolutions as Winograd "
                                             "F(4x4, r x r); false sums them directly"),
        TargetOption("fast_math", bool, True, "polynomial exp/erf/tanh/sigmoid fused into their "
                                              "producers; false keeps libm's"),
        TargetOption("tuning_db", str, None, "a database folder written by 'mmcompile tune' "
                                             "(compile --tuning-db sets it)"),
    )

    def _tvm_target(self, options: CompileOptions):
        from mmcompile.targets.tvm.host import llvm_target
        return llvm_target(options.config.get("mcpu"), options.threads)

    def _converters(self, target):
        from mmcompile.targets.tvm.recurrent import converters
        from mmcompile.targets.tvm.schedule_util import lanes_for
        return converters(lanes_for(target))

    def _schedule(self, mod, target):
        from mmcompile.targets.tvm.schedules import schedule_cpu
        return schedule_cpu(mod, target)

    def _lower(self, mod, target, options: CompileOptions):
        from mmcompile.targets.tvm.lowering import lower_cpu, lowering_options
        return lower_cpu(mod, target, **lowering_options(options.config),
                         tuning_db=options.config.get("tuning_db"))


@register_target
class TVMCudaTarget(_TVMTarget):
    """NVIDIA GPUs through TVM's CUDA codegen. Kernels are compiled to device code (fatbin) with
    nvcc at build time, on machines without a GPU too (see :mod:`.cuda`); such a machine can
    save the model but not run it (running, ``verify=True`` and loading fail there, saying why).

    Config: ``arch`` (``sm_XY``; default: the local GPU's, else ``sm_80``).
    """

    name = "cuda"
    description = "NVIDIA GPU via TVM CUDA codegen (device code compiled with nvcc at build time)"
    device = "cuda"
    options = (
        TargetOption("arch", str, None, "GPU architecture sm_XY (default: the local GPU's, "
                                        "else sm_80)"),
    )

    def compile(self, graph: Graph, options: CompileOptions) -> Executable:
        """Compile in-process where TVM's CUDA runtime loads (a GPU driver is installed), else in
        a helper process with a stub driver.

        Raises:
            TargetError: nvcc or a host C compiler is missing, or code generation failed.
        """
        from mmcompile.targets.tvm import cuda
        cuda.find_nvcc()
        cuda.find_c_compiler()
        if cuda.runtime_loaded()[0]:
            return self.compile_here(graph, options)
        return cuda.compile_in_child(graph, options)

    def compile_here(self, graph: Graph, options: CompileOptions) -> Executable:
        """Compile in this process; TVM's CUDA runtime must be loaded (it is what runs nvcc)."""
        from mmcompile.targets.tvm import cuda
        loaded, why = cuda.runtime_loaded()
        if not loaded:
            raise TargetError(f"cuda: TVM's CUDA runtime does not load ({why}); without it TVM "
                              f"would store CUDA source instead of device code")
        with cuda.nvcc_build(cuda.find_nvcc()):
            return super().compile(graph, options)

    def why_not_runnable(self) -> str | None:
        """None where compiled stages can run on this machine, else the reason (no GPU)."""
        from mmcompile.targets.tvm.cuda import missing_device
        return missing_device()

    def _tvm_target(self, options: CompileOptions):
        import tvm
        from mmcompile.targets.tvm.cuda import DEFAULT_ARCH, local_arch
        from mmcompile.targets.tvm.host import llvm_target
        arch = options.config.get("arch") or local_arch() or DEFAULT_ARCH
        try:
            return tvm.target.Target({"kind": "cuda", "arch": arch}, host=llvm_target())
        except Exception as exc:
            raise TargetError(f"cuda: bad arch {arch!r} (expected sm_XY, e.g. sm_80): "
                              f"{_first_line(exc)}") from exc

    def _detail(self, target) -> str:
        return str(target.attrs.get("arch", ""))

    def _schedule(self, mod, target):
        from mmcompile.targets.tvm.schedules import schedule_cuda
        return schedule_cuda(mod, target)

    def _executable(self, executable, info: dict[str, Any], options: CompileOptions) -> Executable:
        from mmcompile.targets.tvm.cuda import CudaExecutable
        return CudaExecutable.export(executable, {**info, "arch": info["detail"]})

    def load(self, directory: Path, files: Mapping[str, str], info: Mapping[str, Any],
             threads: int = 0) -> Executable:
        from mmcompile.targets.tvm.cuda import CudaExecutable
        return CudaExecutable.load(directory, files, info, threads)
