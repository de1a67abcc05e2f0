"""``mmcompile.compile``: a model -> a compiled model, one static build
(:func:`mmcompile.build.compile_static`) or, for declared dim ranges (``dynamic=``), several
and a dispatcher over them (:mod:`mmcompile.dynamic`). ``mmcompile.load`` is in
:mod:`mmcompile.loading`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mmcompile.build import DEFAULT_TOLERANCE, cannot_verify, compile_static
from mmcompile.errors import InputError
from mmcompile.loading import load  # noqa: F401  (as before)
from mmcompile.runtime import CompiledModel

if TYPE_CHECKING:
    from mmcompile.profiles import ProfiledModel


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
    return compile_static(
        model, example_inputs, target=target, modalities=modalities, passes=passes,
        verify=verify, tolerance=tolerance, input_shapes=input_shapes, opt_level=opt_level,
        disabled_passes=disabled_passes, threads=threads, target_config=target_config,
        fallback=fallback, placement=placement, schedule=schedule, measure=measure,
        tuning_db=tuning_db, quantize=quantize, calibration=calibration,
        quantize_options=quantize_options, progress=progress)


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
            raise cannot_verify(args["target"], why)
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
