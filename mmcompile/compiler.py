"""``mmcompile.compile`` and ``mmcompile.load``: model -> plan (:mod:`mmcompile.planning`) ->
each stage compiled by its target -> CompiledModel, with verification; artifact -> model.

Verification runs the example inputs (or random ones matching the signature) through
onnxruntime on the graph as loaded, and through the compiled model, and fails with a
per-output report when they differ by more than the tolerance.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mmcompile.errors import InputError, VerificationError
from mmcompile.frontend import SPECIALIZED
from mmcompile.ir import Graph
from mmcompile.planning import Plan, StagePlan, plan
from mmcompile.planning.auto import choose
from mmcompile.reference import compare_outputs, random_inputs, run_onnxruntime
from mmcompile.loading import load  # noqa: F401  (as before)
from mmcompile.runtime import CompiledModel, Stage, host_array
from mmcompile.schedule import available_cores
from mmcompile.signature import Signature
from mmcompile.target import CompileOptions, TargetError

if TYPE_CHECKING:
    from mmcompile.profiles import ProfiledModel

DEFAULT_TOLERANCE = 1e-4


def _as_numpy(inputs: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    if not isinstance(inputs, Mapping):
        inputs = dict(zip(names, inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
    return {name: host_array(value) for name, value in inputs.items()}


def verify_compiled(compiled: CompiledModel, reference: Graph, inputs: Mapping[str, np.ndarray],
                    tolerance: float = DEFAULT_TOLERANCE) -> str:
    """Compare the compiled model with onnxruntime on ``reference``; returns a one-line summary.

    The check is ``max|got - ref| <= tolerance * max(1, max|ref|)`` per output.

    Raises:
        VerificationError: with one line per output (max abs/rel error and where).
    """
    worst, outputs = reference_error(compiled, reference, inputs, tolerance)
    return f"ok, max abs err {worst:.3g} vs onnxruntime over {outputs} output(s)"


def reference_error(compiled: Any, reference: Graph, inputs: Mapping[str, np.ndarray],
                    tolerance: float = DEFAULT_TOLERANCE) -> tuple[float, int]:
    """:func:`verify_compiled`'s check: (largest absolute error, number of outputs).

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
    return max((d.max_abs for d in diffs), default=0.0), len(diffs)


def compile(model: Any, example_inputs: Any = None, *, target: str = "cpu",
            modalities: Mapping[str, str] | None = None, passes: str = "default",
            verify: bool = True, tolerance: float = DEFAULT_TOLERANCE,
            input_shapes: Mapping[str, Sequence[int]] | None = None, opt_level: int = 2,
            disabled_passes: Sequence[str] = (),
            threads: int = 0, target_config: Mapping[str, Any] | None = None,
            fallback: str | None = "onnxruntime", placement: Mapping[str, str] | None = None,
            schedule: str = "auto", measure: bool = True,
            tuning_db: str | os.PathLike | None = None, quantize: str | None = None,
            calibration: Any = None, quantize_options: Mapping[str, Any] | None = None,
            dynamic: Mapping[str, Sequence[int]] | None = None,
            progress: Callable[[str], None] | None = None) -> CompiledModel | ProfiledModel:
    """Compile a multimodal model: plan its stages (:func:`mmcompile.planning.plan`), compile
    each with its target, choose the schedule, verify.

    Args:
        model: a ``torch.nn.Module`` (with ``example_inputs``), a path to ``.onnx``/``.pt2``,
            an ``onnx.ModelProto`` or a :class:`Graph`.
        example_inputs: tuple or dict of tensors; used to trace modules and to verify.
        target: the target, ``name`` or ``name{key=value,...}`` (``cpu``, ``cuda``,
            ``cpu{mcpu=znver4,winograd=false}``; see ``mmcompile targets``).
        modalities: input name -> modality; inferred for inputs not named.
        passes: the graph pipeline run before placement (each target adds its own pipeline
            to its stages).
        verify: compare against onnxruntime on the example (or random) inputs.
        tolerance: verification tolerance, relative to ``max(1, max|ref|)``.
        input_shapes: fix symbolic input dims (e.g. ``{"pixel_values": [1, 3, 224, 224]}``).
        opt_level: PassContext opt level.
        disabled_passes: pass names to skip.
        threads: threads the compiled code may use (0: all available cores).
        target_config: options of ``target`` (over those written in it); an unknown or
            mistyped option is an error naming the valid ones.
        fallback: the target for nodes ``target`` cannot run (default ``onnxruntime``);
            None refuses such a model with :class:`UnsupportedOpError`.
        placement: modality branch (``image``, ``image.1``, ``fusion``) or node name ->
            target, over ``target``; per node wins over per branch.
        schedule: ``"auto"`` (the whole graph; the modality branches are also compiled as
            stages, and kept if faster on concurrent workers, when the whole graph's thread
            scaling predicts they could be), ``"sequential"`` (no branch stages) or
            ``"parallel"`` (modality branches on concurrent workers).
        measure: time the stages on the example inputs for the cost model (else estimate
            from FLOPs and bytes, assuming perfect thread scaling: ``auto`` then keeps the
            whole graph).
        tuning_db: a database folder written by :func:`mmcompile.tune.tune` for this target:
            kernels it tuned use the tuned schedules; the artifact records its SHA-256.
        quantize: ``"int8"``: quantize after the graph passes (:func:`mmcompile.quantize`),
            then place and compile the QDQ graph; verification then compares with the
            quantized graph in onnxruntime (the accuracy against the float model is in the
            report and the artifact).
        calibration: the calibration samples (with ``quantize``): a ``.npz`` path, input
            name -> stacked samples, or a list of feed dicts; a modality may have fewer.
        quantize_options: further options of :func:`mmcompile.quantize` (``method``,
            ``activations``, ``max_drop``, ``holdout``, ``metrics``, ``keep_float``).
        dynamic: serve ranges of named symbolic dims with one artifact instead of fixing them
            to the example's sizes: dim -> ``(low, high)`` or ``(low, size, ..., high)``
            (sizes between the ends get builds of their own), e.g. ``{"batch": (1, 8, 32)}``;
            see :mod:`mmcompile.dynamic`. A torch module can declare only ``batch``.
        progress: called with one-line status messages.

    Returns:
        The :class:`CompiledModel`; with ``dynamic``, a
        :class:`~mmcompile.profiles.ProfiledModel` over several builds.

    Raises:
        ModelLoadError, ExportError, ModalityError: the model cannot be read.
        PipelineError, PassError: the pass pipeline failed.
        TargetError: an unknown target or option, or a target that cannot run here.
        UnsupportedOpError: a node no allowed target can run (named, with the reasons).
        VerificationError: outputs differ from onnxruntime beyond ``tolerance``.
        TuningDBError: ``tuning_db`` is missing, corrupt or for another target.
        InputError, QuantizationError: bad calibration data or quantization options; with
            ``dynamic``: a bad range, a dim no input has, an example outside its range.
    """
    if dynamic is not None:
        return _compile_dynamic(model, example_inputs, dynamic, locals())
    say = progress or (lambda message: None)
    config = dict(target_config or {})
    db_info = None
    if tuning_db is not None:
        from mmcompile.tune.database import database_info
        db_info = database_info(tuning_db)  # a missing or corrupt database fails here, early
        config["tuning_db"] = str(tuning_db)
    planned = plan(model, example_inputs, target=target, target_config=config,
                   fallback=fallback, placement=placement, passes=passes, opt_level=opt_level,
                   disabled_passes=disabled_passes, modalities=modalities,
                   input_shapes=input_shapes, schedule=schedule, quantize=quantize,
                   calibration=calibration, quantize_options=quantize_options, progress=say)
    used = {s.target for s in planned.stages()}
    cannot_run = {k: planned.placement.choices[k].target.why_not_runnable() for k in used}
    cannot_run = {k: why for k, why in cannot_run.items() if why}
    if verify and cannot_run:
        raise _cannot_verify(*next(iter(cannot_run.items())))
    measure = measure and not cannot_run
    # The reference: the model's own semantics; a quantized model's are its QDQ graph's.
    source = planned.quantized.graph if planned.quantized else planned.source
    feeds = (_as_numpy(example_inputs, [t.name for t in source.gs.inputs])
             if example_inputs is not None else random_inputs(source, seed=0))
    metadata = {"pipeline": str(planned.optimization.pipeline),
                "nodes_before": planned.optimization.nodes_before,
                "nodes_after": planned.optimization.nodes_after, "source": source.name}
    fixed = planned.source.annotations.get(SPECIALIZED)
    if fixed:
        metadata["specialized"] = fixed
        say("symbolic dims fixed to the example inputs: " + ", ".join(
            f"{k} {v['declared']} -> {v['shape']}" for k, v in fixed.items()))
    if planned.quantized:
        metadata["quantization"] = planned.quantized.info()
    if planned.placement.fell_back:
        metadata["fallback"] = {"target": ", ".join(planned.placement.fallback_targets()),
                                "nodes": planned.fell_back()}

    def build(plans: Sequence[StagePlan]) -> CompiledModel:
        stages = _compile_stages(plans, planned, threads, say)
        return CompiledModel(Signature.from_graph(planned.optimized), stages,
                             planned.placement.primary, dict(metadata))

    compiled = choose(planned, build, schedule, feeds, threads or available_cores(), measure,
                      say)
    if db_info is not None:  # of the stages kept
        used_db = [st.info.get("tuning", {}) for st in compiled.stages]
        compiled.metadata["tuning_db"] = {**db_info,
                                          "hits": sum(u.get("hits", 0) for u in used_db),
                                          "kernels": sum(u.get("kernels", 0) for u in used_db)}
        say(f"tuning database {tuning_db}: {compiled.metadata['tuning_db']['hits']} of "
            f"{compiled.metadata['tuning_db']['kernels']} kernels tuned")
    if verify:
        say("verifying against onnxruntime")
        compiled.metadata["verification"] = verify_compiled(compiled, source, feeds, tolerance)
    return compiled


def _cannot_verify(target: str, why: str) -> TargetError:
    return TargetError(f"cannot verify a model compiled for '{target}' here: {why}; compile "
                       f"with verify=False (CLI: --no-verify) to build and save it")


def _compile_dynamic(model: Any, example_inputs: Any, dynamic: Mapping[str, Sequence[int]],
                     args: Mapping[str, Any]) -> ProfiledModel:
    """:func:`compile` with ``dynamic``: the same options for every build."""
    from mmcompile.dynamic import compile_dynamic
    from mmcompile.target import resolve_target
    if args["quantize"]:
        raise InputError("quantize= together with dynamic= is not supported: quantize a model "
                         "at one size, or compile the float model for the range")
    if args["verify"] or args["measure"]:
        target, _ = resolve_target(args["target"], args["target_config"])
        why = target.why_not_runnable()
        if why and args["verify"]:
            raise _cannot_verify(args["target"], why)
        measure = args["measure"] and not why
    else:
        measure = False
    config = dict(args["target_config"] or {})
    if args["tuning_db"] is not None:
        config["tuning_db"] = str(args["tuning_db"])
    options = {k: args[k] for k in ("target", "modalities", "passes", "opt_level",
                                    "disabled_passes", "threads", "fallback", "placement",
                                    "schedule")}
    options["target_config"] = config
    return compile_dynamic(model, example_inputs, dynamic, options=options,
                           modalities=args["modalities"], input_shapes=args["input_shapes"],
                           verify=args["verify"], tolerance=args["tolerance"], measure=measure,
                           progress=args["progress"])


def _placement_facts(stage: StagePlan, planned: Plan) -> dict[str, Any]:
    """Why ``stage`` runs where it does, for the report and the manifest."""
    placed = planned.placement
    fell_back = {n: placed.fell_back[n] for n in stage.nodes if n in placed.fell_back}
    by_user = sorted({placed.placed_by_user[n] for n in stage.nodes
                      if n in placed.placed_by_user and n not in fell_back})
    if fell_back:
        reason = f"fallback for {len(fell_back)} node(s) its preferred target cannot run"
    elif by_user:
        reason = f"placed by the user ({', '.join(by_user)})"
    else:
        reason = "the requested target"
    facts: dict[str, Any] = {"reason": reason}
    if fell_back:
        facts.update(fallback=True, fell_back=fell_back)
    return facts


def _compile_stages(plans: Sequence[StagePlan], planned: Plan, threads: int,
                    say: Callable[[str], None]) -> list[Stage]:
    stages = []
    for index, stage_plan in enumerate(plans, 1):
        choice = planned.placement.choices[stage_plan.target]
        say(f"compiling stage '{stage_plan.name}' ({index}/{len(plans)}, "
            f"{stage_plan.graph.num_nodes} nodes) for {choice.key}")
        options = CompileOptions(threads=threads, progress=say, config=choice.options)
        start = time.perf_counter()
        executable = choice.target.compile(stage_plan.graph, options)
        info = {**executable.describe(), "spec": choice.key, "nodes": stage_plan.nodes,
                "placement": _placement_facts(stage_plan, planned)}
        stages.append(Stage(stage_plan.name, choice.name, stage_plan.inputs, stage_plan.outputs,
                            executable, time.perf_counter() - start, info,
                            stage_plan.depends_on, choice.target.device))
    return stages
