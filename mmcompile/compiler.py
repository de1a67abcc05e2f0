"""``mmcompile.compile``: frontend -> passes -> target -> CompiledModel, with verification.

Verification runs the example inputs (or random ones matching the signature) through
onnxruntime on the graph as loaded, and through the compiled model, and fails with a
per-output report when they differ by more than the tolerance.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from mmcompile.errors import MMCompileError, VerificationError
from mmcompile.frontend import from_onnx_model, load_graph, trace
from mmcompile.ir import Graph
from mmcompile.optimize import optimize
from mmcompile.reference import compare_outputs, random_inputs, run_onnxruntime
from mmcompile.plan import StagePlan, partition
from mmcompile.runtime import CompiledModel, Stage
from mmcompile.autoschedule import faster, parallel_prospect, parallel_schedule, promising
from mmcompile.schedule import Schedule, available_cores, check_kind
from mmcompile.signature import Signature
from mmcompile.target import CompileOptions, TargetError, get_target
from mmcompile.transform import PassContext

DEFAULT_TOLERANCE = 1e-4


def to_graph(model: Any, example_inputs: Any = None, *,
             modalities: Mapping[str, str] | None = None,
             input_shapes: Mapping[str, Sequence[int]] | None = None) -> Graph:
    """Any supported model form -> Graph: a Graph, an ONNX ModelProto, a path (.onnx/.pt2), or a
    torch module with ``example_inputs``."""
    if isinstance(model, Graph):
        return model
    if isinstance(model, onnx.ModelProto):
        return from_onnx_model(model, modalities, input_shapes=input_shapes)
    if isinstance(model, (str, os.PathLike)):
        return load_graph(model, modalities, input_shapes=input_shapes)
    if example_inputs is None:
        raise MMCompileError(f"compiling a {type(model).__name__} needs example_inputs "
                             f"(a tuple or dict of tensors) to trace it")
    return trace(model, example_inputs, modalities)


def _as_numpy(inputs: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    if not isinstance(inputs, Mapping):
        inputs = dict(zip(names, inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
    out = {}
    for name, value in inputs.items():
        if type(value).__module__.startswith("torch"):
            value = value.detach().cpu().numpy()
        out[name] = np.asarray(value)
    return out


def verify_compiled(compiled: CompiledModel, reference: Graph, inputs: Mapping[str, np.ndarray],
                    tolerance: float = DEFAULT_TOLERANCE) -> str:
    """Compare the compiled model with onnxruntime on ``reference``; returns a one-line summary.

    The check is ``max|got - ref| <= tolerance * max(1, max|ref|)`` per output.

    Raises:
        VerificationError: with one line per output (max abs/rel error and where).
    """
    expected = run_onnxruntime(reference, inputs)
    got = compiled.run(inputs)
    diffs = compare_outputs(expected, got)
    failed = [d for d in diffs if not d.ok(tolerance, 0.0) and not d.ok(0.0, tolerance)]
    lines = [str(d) for d in diffs]
    if failed:
        raise VerificationError("compiled model differs from onnxruntime beyond tolerance "
                                f"{tolerance:g}:\n  " + "\n  ".join(lines))
    worst = max((d.max_abs for d in diffs), default=0.0)
    return f"ok, max abs err {worst:.3g} vs onnxruntime over {len(diffs)} output(s)"


def compile(model: Any, example_inputs: Any = None, *, target: str = "cpu",
            modalities: Mapping[str, str] | None = None, passes: str = "default",
            verify: bool = True, tolerance: float = DEFAULT_TOLERANCE,
            input_shapes: Mapping[str, Sequence[int]] | None = None, opt_level: int = 2,
            disabled_passes: Sequence[str] = (),
            threads: int = 0, target_config: Mapping[str, Any] | None = None,
            schedule: str = "auto", measure: bool = True,
            tuning_db: str | os.PathLike | None = None,
            progress: Callable[[str], None] | None = None) -> CompiledModel:
    """Compile a multimodal model for a target.

    Args:
        model: a ``torch.nn.Module`` (with ``example_inputs``), a path to ``.onnx``/``.pt2``,
            an ``onnx.ModelProto`` or a :class:`Graph`.
        example_inputs: tuple or dict of tensors; used to trace modules and to verify.
        target: registered target name (``cpu``, ``cuda``; see ``mmcompile targets``).
        modalities: input name -> modality; inferred for inputs not named.
        passes: the graph pipeline run before lowering.
        verify: compare against onnxruntime on the example (or random) inputs.
        tolerance: verification tolerance, relative to ``max(1, max|ref|)``.
        input_shapes: fix symbolic input dims (e.g. ``{"pixel_values": [1, 3, 224, 224]}``).
        opt_level: PassContext opt level.
        disabled_passes: pass names to skip.
        threads: threads the compiled code may use (0: all available cores).
        target_config: target-specific options.
        schedule: ``"auto"`` (the whole graph; the modality branches are also compiled as
            stages, and kept if faster on concurrent workers, when the whole graph's thread
            scaling predicts they could be), ``"sequential"`` (one stage, no partitioning) or
            ``"parallel"`` (modality branches on concurrent workers).
        measure: time the stages on the example inputs for the cost model (else estimate
            from FLOPs and bytes, assuming perfect thread scaling: ``auto`` then keeps the
            whole graph).
        tuning_db: a database folder written by :func:`mmcompile.tune.tune` for this target:
            kernels it tuned use the tuned schedules; the artifact records its SHA-256.
        progress: called with one-line status messages.

    Returns:
        The :class:`CompiledModel`.

    Raises:
        ModelLoadError, ExportError, ModalityError: the model cannot be read.
        PipelineError, PassError: the pass pipeline failed.
        UnsupportedOpError: the target cannot lower a node (named, with the target).
        VerificationError: outputs differ from onnxruntime beyond ``tolerance``.
        TuningDBError: ``tuning_db`` is missing, corrupt or for another target.
    """
    say = progress or (lambda message: None)
    say("loading model")
    graph = to_graph(model, example_inputs, modalities=modalities, input_shapes=input_shapes)
    backend = get_target(target)
    cannot_run = backend.why_not_runnable()
    if verify and cannot_run:
        raise TargetError(f"cannot verify a model compiled for '{target}' here: {cannot_run}; "
                          f"compile with verify=False (CLI: --no-verify) to build and save it")
    measure = measure and cannot_run is None
    say(f"optimizing graph ({graph.num_nodes} nodes)")
    result = optimize(graph, passes, ctx=PassContext(opt_level=opt_level,
                                                     disabled_passes=frozenset(disabled_passes)))
    optimized = result.graph
    backend.check(optimized)
    check_kind(schedule)
    whole_plans = partition(optimized)  # one stage: the graph as it is
    plans = whole_plans
    if schedule != "sequential":
        optimize(optimized, "annotate-branches", inplace=True)
        plans = partition(optimized)
    config = dict(target_config or {})
    db_info = None
    if tuning_db is not None:
        from mmcompile.tune.database import database_info
        db_info = database_info(tuning_db)  # a missing or corrupt database fails here, early
        config["tuning_db"] = str(tuning_db)
    options = CompileOptions(threads=threads, progress=say, config=config)
    feeds = (_as_numpy(example_inputs, [t.name for t in graph.gs.inputs])
             if example_inputs is not None else random_inputs(graph, seed=0))
    metadata = {"pipeline": str(result.pipeline), "nodes_before": result.nodes_before,
                "nodes_after": result.nodes_after, "source": graph.name}
    cores = threads or available_cores()
    if schedule == "auto" and len(plans) > 1:
        compiled = _auto(plans, whole_plans, backend, options, metadata, optimized, feeds,
                         cores, measure, say)
    else:
        compiled = _compiled(plans, backend, options, metadata, optimized, say)
        if len(plans) > 1:
            say(f"scheduling {len(plans)} stages ({schedule})")
            compiled.schedule = parallel_schedule(compiled, feeds, plans, cores, measure)
    if db_info is not None:  # of the stages kept
        used = [st.info.get("tuning", {}) for st in compiled.stages]
        compiled.metadata["tuning_db"] = {**db_info,
                                          "hits": sum(u.get("hits", 0) for u in used),
                                          "kernels": sum(u.get("kernels", 0) for u in used)}
        say(f"tuning database {tuning_db}: {compiled.metadata['tuning_db']['hits']} of "
            f"{compiled.metadata['tuning_db']['kernels']} kernels tuned")
    if verify:
        say("verifying against onnxruntime")
        compiled.metadata["verification"] = verify_compiled(compiled, graph, feeds, tolerance)
    return compiled


def _compile_stages(plans: Sequence[StagePlan], backend, options: CompileOptions,
                    say: Callable[[str], None]) -> list[Stage]:
    stages = []
    for index, plan in enumerate(plans, 1):
        say(f"compiling stage '{plan.name}' ({index}/{len(plans)}, {plan.graph.num_nodes} nodes) "
            f"for {backend.name}")
        start = time.perf_counter()
        executable = backend.compile(plan.graph, options)
        stages.append(Stage(plan.name, backend.name, plan.inputs, plan.outputs, executable,
                            time.perf_counter() - start, executable.describe(), plan.depends_on))
    return stages


def _compiled(plans: Sequence[StagePlan], backend, options: CompileOptions,
              metadata: Mapping[str, Any], graph: Graph,
              say: Callable[[str], None]) -> CompiledModel:
    stages = _compile_stages(plans, backend, options, say)
    return CompiledModel(Signature.from_graph(graph), stages, backend.name,
                         {**metadata, "versions": stages[0].info.get("versions", {})})


def _auto(plans: Sequence[StagePlan], whole_plans: Sequence[StagePlan], backend,
          options: CompileOptions, metadata: Mapping[str, Any], graph: Graph,
          feeds: Mapping[str, np.ndarray], cores: int, measure: bool,
          say: Callable[[str], None]) -> CompiledModel:
    """``schedule="auto"``: the graph compiled whole (one VM call, no stage boundaries:
    measured 0.1-0.15 ms faster than the same stages one after another), and the branch
    stages on their parallel schedule only when the whole graph's thread scaling says they
    could be faster (see :mod:`mmcompile.autoschedule`); then the faster of the two."""
    whole = _compiled(whole_plans, backend, options, metadata, graph, say)
    say(f"estimating the parallel schedule of {len(plans)} stages")
    prospect = parallel_prospect(whole, plans, feeds, cores, measure)
    if not promising(prospect):
        whole.schedule = Schedule("sequential", estimate_ms=prospect.estimate_ms,
                                  bound_ms=prospect.bound_ms, measured_ms=prospect.measured_ms)
        times = ", ".join(f"{k} {v:.2f} ms" for k, v in prospect.measured_ms.items())
        say(f"schedule: sequential (parallel predicted {prospect.estimate_ms:.2f} ms"
            + (f" from the whole graph at {times})" if times else ")")
            + "; branch stages not compiled")
        return whole
    staged = _compiled(plans, backend, options, metadata, graph, say)
    staged.schedule = parallel_schedule(staged, feeds, plans, cores, measure)
    if staged.schedule.kind != "parallel":
        staged.close()
        return whole
    return faster(staged, whole, feeds, say)
