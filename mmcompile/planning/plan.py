"""``plan``: from a model to the stages that targets compile, the one function both
``mmcompile.compile`` and ``mmcompile.tune`` use (the same options give the same stages, so
tuned kernels are the compiled ones).

In order, each step with why it sits there:

1. load the model (frontend) and run the target-independent pipeline (``default``);
   then, when asked, quantize (:mod:`mmcompile.quantize`): after the passes, so that folded
   batch norms and fused layers are what gets calibrated, and before placement, which must
   see the QDQ nodes the targets lower;
2. branch analysis (:mod:`.branches`), when a branch is to be placed or scheduled on its own;
3. placement (:mod:`.placement`): a target per node, the fallback where the target cannot run
   a node; after the passes, which change the nodes;
4. stages (:mod:`.partition`): ``whole`` cuts the graph by target only, ``staged`` by branch
   and target (the branch-parallel candidate, for ``schedule`` ``auto`` / ``parallel``);
5. each stage's target pipeline (``Target.pipeline``: TVM's ``legalize-for-tvm``), on that
   target's stages only, last, so that nothing before it depends on one target.

:func:`with_moves` redoes steps 3-5 with branches moved to other targets (what
:mod:`.moves` weighs when the cost model may move a branch to an accelerator's host).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from mmcompile.errors import InputError, ModelLoadError
from mmcompile.frontend import to_graph
from mmcompile.ir import Graph
from mmcompile.optimize import OptimizeResult, optimize
from mmcompile.planning.branches import assign_branches
from mmcompile.planning.partition import StagePlan, group_nodes, stage_plans
from mmcompile.planning.placement import Placement, place
from mmcompile.schedule import check_kind
from mmcompile.transform import PassContext


@dataclass(frozen=True)
class Request:
    """What placement was asked for (the arguments of :func:`plan` it reads), kept so that
    :func:`with_moves` can place the same graph again."""

    target: str
    target_config: Mapping[str, Any] | None
    fallback: str | None
    placement: Mapping[str, str] | None
    schedule: str


@dataclass
class Plan:
    """What :func:`plan` decided.

    Attributes:
        source: the model as loaded (the reference verification runs in onnxruntime).
        optimized: after the target-independent passes (before any target pipeline).
        optimization: the pipeline's report.
        placement: a target per node, and why.
        whole: the stages cut by target only (one stage, ``main``, when every node runs on
            the requested target).
        staged: the stages cut by branch and target; the same list as ``whole`` when the
            schedule is ``sequential`` or the model has one branch.
        branches: node -> modality branch (empty when no branch was needed).
        request: what placement was asked for.
        moves: branch -> target spec, the branches the planner moved (:func:`with_moves`).
    """

    source: Graph
    optimized: Graph
    optimization: OptimizeResult
    placement: Placement
    whole: list[StagePlan]
    staged: list[StagePlan] = field(default_factory=list)
    quantized: Any = None  # the QuantizedModel, when quantized
    branches: dict[str, str] = field(default_factory=dict)
    request: Request | None = None
    moves: dict[str, str] = field(default_factory=dict)

    def stages(self) -> list[StagePlan]:
        """Every distinct stage of both candidates, the branch stages first (what ``tune``
        extracts kernels from)."""
        return self.staged + [s for s in self.whole if s not in self.staged]

    def fell_back(self) -> dict[str, str]:
        """Node -> why it is not on the target it was meant for."""
        return dict(self.placement.fell_back)


def check_boundary_types(graph: Graph) -> None:
    """Inputs and outputs cross into and out of a compiled model as numpy arrays: a type
    numpy lacks there (bfloat16, float8, 4-bit) fails before any pass or target runs.

    Raises:
        ModelLoadError: naming the tensor and its type.
    """
    for kind, tensors in (("input", graph.gs.inputs), ("output", graph.gs.outputs)):
        for tensor in tensors:
            try:
                np.dtype(tensor.dtype)
            except TypeError:
                name = (onnx.helper.tensor_dtype_to_string(tensor.dtype)
                        if isinstance(tensor.dtype, int) else str(tensor.dtype))
                raise ModelLoadError(
                    f"model {kind} '{tensor.name}' is {name.removeprefix('TensorProto.')}: "
                    f"a compiled model takes and returns numpy arrays, which have no such "
                    f"type; cast it at the model's boundary (to float32, say)") from None


def plan(model: Any, example_inputs: Any = None, *, target: str = "cpu",
         target_config: Mapping[str, Any] | None = None, fallback: str | None = "onnxruntime",
         placement: Mapping[str, str] | None = None, passes: str = "default",
         opt_level: int = 2, disabled_passes: Sequence[str] = (),
         modalities: Mapping[str, str] | None = None,
         input_shapes: Mapping[str, Sequence[int]] | None = None, schedule: str = "auto",
         quantize: str | None = None, calibration: Any = None,
         quantize_options: Mapping[str, Any] | None = None,
         progress: Callable[[str], None] | None = None) -> Plan:
    """Plan ``model``'s stages (see the module docstring for the steps).

    Args:
        model, example_inputs, modalities, input_shapes: as for :func:`mmcompile.compile`.
        target: the requested target, ``name`` or ``name{key=value,...}``.
        target_config: options of the requested target (Python values), over the spec's.
        fallback: the target for nodes the requested one cannot run; None refuses them.
        placement: branch, modality or node name -> target, over ``target``.
        passes, opt_level, disabled_passes: the graph pipeline.
        schedule: ``auto`` / ``parallel`` also plan the branch stages; ``sequential`` not.
        quantize, calibration, quantize_options: as for :func:`mmcompile.compile`.
        progress: called with one-line status messages.

    Raises:
        ModelLoadError, ExportError, ModalityError: the model cannot be read.
        PipelineError, PassError: a pass pipeline failed.
        TargetError: an unknown target or option.
        UnsupportedOpError: a node no allowed target runs.
        InputError, QuantizationError: bad calibration data or quantization options.
    """
    say = progress or (lambda message: None)
    check_kind(schedule)
    if (quantize is None) != (calibration is None):
        raise InputError("quantize and calibration go together: " + (
            "quantize needs calibration samples" if calibration is None else
            "calibration data was given but no quantize scheme (e.g. quantize='int8')"))
    say("loading model")
    source = to_graph(model, example_inputs, modalities=modalities, input_shapes=input_shapes)
    check_boundary_types(source)
    say(f"optimizing graph ({source.num_nodes} nodes)")
    ctx = PassContext(opt_level=opt_level, disabled_passes=frozenset(disabled_passes))
    optimization = optimize(source, passes, ctx=ctx)
    optimized = optimization.graph
    quantized = None
    if quantize is not None:
        from mmcompile.quantize import quantize as quantize_graph
        quantized = quantize_graph(optimized, calibration, scheme=quantize, passes="none",
                                   progress=say,
                                   **_quantize_options(quantize_options))
        optimized = quantized.graph
        say(f"quantized {len(quantized.layers)} layer(s) to {quantize}, "
            f"{len(quantized.float_layers)} kept in float (drop {quantized.drop:.4f})")
    branches = assign_branches(optimized) if placement or schedule != "sequential" else {}
    request = Request(target, target_config, fallback, placement, schedule)
    placed = place(optimized, branches, target, target_config, fallback, placement)
    if placed.fell_back:
        say(f"{len(placed.fell_back)} node(s) fall back to "
            f"{', '.join(placed.fallback_targets())}: "
            + ", ".join(f"{n} ({r})" for n, r in list(placed.fell_back.items())[:3])
            + (", ..." if len(placed.fell_back) > 3 else ""))
    whole, staged = _cut(optimized, branches, placed, schedule)
    return Plan(source, optimized, optimization, placed, whole, staged, quantized, branches,
                request)


def with_moves(planned: Plan, moves: Mapping[str, str]) -> Plan:
    """``planned`` placed again with the branches in ``moves`` (branch -> target spec) on
    those targets, under the user's placement (:func:`~.placement.place`), and cut into
    stages again; the graph passes and quantization are not redone.

    Raises:
        TargetError: a move names an unknown target.
        UnsupportedOpError: a node neither the move's target nor the fallback runs.
    """
    request = planned.request
    if request is None:
        raise ValueError("with_moves needs a plan made by plan()")
    # a copy: a target pipeline runs in place on a stage that is the whole graph
    graph = planned.optimized.copy()
    placed = place(graph, planned.branches, request.target, request.target_config,
                   request.fallback, request.placement, moves)
    whole, staged = _cut(graph, planned.branches, placed, request.schedule)
    return dataclasses.replace(planned, placement=placed, whole=whole, staged=staged,
                               moves=dict(moves))


def _cut(graph: Graph, branches: Mapping[str, str], placed: Placement, schedule: str
         ) -> tuple[list[StagePlan], list[StagePlan]]:
    """Steps 4 and 5: the ``whole`` and ``staged`` stage lists of the placed ``graph``, each
    stage through its target's pipeline."""
    names = {key: choice.name for key, choice in placed.choices.items()}
    staged: list[StagePlan] = []
    if schedule != "sequential" and len(set(branches.values())) > 1:
        labels = {n: (b, placed.nodes[n]) for n, b in branches.items()}
        staged = stage_plans(graph, group_nodes(graph, labels), placed.primary, names)
    whole = stage_plans(graph, group_nodes(graph, {n: ("main", k) for n, k in
                                                   placed.nodes.items()}),
                        placed.primary, names)
    staged = staged or whole
    for stage in staged + [s for s in whole if s not in staged]:
        # last: a target's pipeline sees only its own stages
        pipeline = placed.choices[stage.target].target.pipeline
        if pipeline:
            optimize(stage.graph, pipeline, inplace=True)
    return whole, staged


def _quantize_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check ``quantize_options`` keys against :func:`mmcompile.quantize.quantize`'s."""
    import inspect

    from mmcompile.quantize import QuantizationError
    from mmcompile.quantize import quantize as quantize_graph
    valid = [name for name, p in inspect.signature(quantize_graph).parameters.items()
             if p.kind is p.KEYWORD_ONLY and name not in ("scheme", "progress", "modalities",
                                                           "passes")]
    unknown = sorted(set(options or {}) - set(valid))
    if unknown:
        raise QuantizationError(f"unknown quantize option(s) {', '.join(map(repr, unknown))} "
                                f"(valid: {', '.join(valid)})")
    return dict(options or {})
