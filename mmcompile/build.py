"""One static build: model -> plan (:mod:`mmcompile.planning`) -> each stage compiled by its
target -> :class:`~mmcompile.runtime.CompiledModel`, with its schedule chosen and verified.

:func:`mmcompile.compile` is this for one set of shapes; for declared dim ranges
(``dynamic=``) :mod:`mmcompile.dynamic` makes several such builds and a dispatcher over them.
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

from mmcompile.errors import VerificationError
from mmcompile.frontend import SPECIALIZED
from mmcompile.ir import Graph
from mmcompile.planning import Plan, StagePlan, plan
from mmcompile.planning.auto import choose
from mmcompile.reference import compare_outputs, random_inputs, run_onnxruntime
from mmcompile.runtime import CompiledModel, Stage, host_array
from mmcompile.schedule import available_cores
from mmcompile.signature import Signature
from mmcompile.target import CompileOptions, TargetError

DEFAULT_TOLERANCE = 1e-4


def as_numpy(inputs: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
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


def compile_static(model: Any, example_inputs: Any = None, *, target: str = "cpu",
                   modalities: Mapping[str, str] | None = None, passes: str = "default",
                   verify: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                   input_shapes: Mapping[str, Sequence[int]] | None = None, opt_level: int = 2,
                   disabled_passes: Sequence[str] = (), threads: int = 0,
                   target_config: Mapping[str, Any] | None = None,
                   fallback: str | None = "onnxruntime",
                   placement: Mapping[str, str] | None = None, schedule: str = "auto",
                   measure: bool = True, tuning_db: str | os.PathLike | None = None,
                   quantize: str | None = None, calibration: Any = None,
                   quantize_options: Mapping[str, Any] | None = None,
                   progress: Callable[[str], None] | None = None) -> CompiledModel:
    """:func:`mmcompile.compile` without ``dynamic``: one build at the example's (or the
    given) shapes; the arguments, result and errors are :func:`mmcompile.compile`'s."""
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
        raise cannot_verify(*next(iter(cannot_run.items())))
    measure = measure and not cannot_run
    # The reference: the model's own semantics; a quantized model's are its QDQ graph's.
    source = planned.quantized.graph if planned.quantized else planned.source
    feeds = (as_numpy(example_inputs, [t.name for t in source.gs.inputs])
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


def cannot_verify(target: str, why: str) -> TargetError:
    return TargetError(f"cannot verify a model compiled for '{target}' here: {why}; compile "
                       f"with verify=False (CLI: --no-verify) to build and save it")


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
