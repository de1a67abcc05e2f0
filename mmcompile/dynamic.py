"""Compiling for declared dim ranges (``compile(..., dynamic={"batch": (1, 8, 32)})``, CLI
``--dynamic batch=1:8:32``): one artifact, a static build per chosen size, a dispatcher
(:mod:`mmcompile.profiles`) that serves every size of the range.

Why static builds and not TVM Relax's symbolic shapes: measured on the suite (CPU target, 2
cores), a build with the batch left symbolic ran av_mnist at 40.5 ms (batch 1) and 327 ms
(batch 8) against 0.88 and 8.0 ms for builds pinned to those batches, mm_imdb at 29.5 / 416 ms
against 1.13 / 9.5 ms: the CPU target's schedules need static shapes. So:

1. Each declared dim is checked on the reference graph with onnxruntime: are its rows
   independent (the outputs for a batch of 5 equal those for 2 and 3 run apart, joined along one
   output axis)? Then sizes between the builds are served by splitting a call into calls of
   built sizes, the last padded (``split``; further independent dims are padded, ``pad``).
   Otherwise (attention over the dim without a mask, a mean over it) padding would change the
   numbers: sizes with a build use it, the rest a build with that dim left symbolic (``exact``).
2. Builds: the range ends and the sizes named between them (``(1, 8, 32)``); for an
   ``exact`` dim, the example's size too. Where cores are idle, worker processes
   (fresh interpreters) compile the last builds while this process compiles the first ones;
   threads cannot share TVM's lowering (its TE tag scope is process-global). Builds here
   measure their schedule as a static build does; those in workers estimate it.
3. The dispatcher is verified against onnxruntime at every build's size and at one size between
   builds per dim.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from mmcompile.dynamic_builds import (compile_builds, graph_inputs, in_case, pin,
                                      spare_cores)
from mmcompile.errors import InputError, MMCompileError
from mmcompile.profiles import DynamicDim, Profile, ProfiledModel, RangedSignature

MAX_BUILDS = 16
SPLIT_TOLERANCE = 1e-4  # relative to max(1, max|ref|): onnxruntime's own batch-size noise is ~1e-7


def parse_dynamic(dynamic: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Check declared ranges: dim name -> ``(low, high)`` or ``(low, size, ..., high)``.

    Returns:
        dim name -> the sizes, ascending and distinct (the first is the low end, the last the
        high end, those between are sizes to build for).

    Raises:
        InputError: not a mapping of names to 2+ positive integers in ascending order.
    """
    if not isinstance(dynamic, Mapping) or not dynamic:
        raise InputError(f"dynamic must map dim names to (low, high) ranges, e.g. "
                         f"{{'batch': (1, 32)}}; got {dynamic!r}")
    ranges = {}
    for name, spec in dynamic.items():
        sizes = list(spec) if isinstance(spec, (tuple, list)) else None
        if (not isinstance(name, str) or not name or sizes is None or len(sizes) < 2
                or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                           for s in sizes)):
            raise InputError(f"dynamic['{name}'] must be (low, high) or (low, size, ..., high) "
                             f"in integers, got {spec!r}")
        if sizes[0] < 1:
            raise InputError(f"dynamic['{name}']: the low end must be at least 1, got {sizes[0]}")
        if sizes[0] > sizes[-1]:
            raise InputError(f"dynamic['{name}']: low {sizes[0]} is above high {sizes[-1]}")
        if any(s < sizes[0] or s > sizes[-1] for s in sizes[1:-1]):
            raise InputError(f"dynamic['{name}']: sizes to build for {sizes[1:-1]} must lie in "
                             f"{sizes[0]}..{sizes[-1]}")
        ranges[name] = tuple(sorted({int(s) for s in sizes}))
    return ranges


def parse_dynamic_flags(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``--dynamic`` values (``batch=1:32``, ``batch=1:8:32,sequence=1:512``; repeatable) ->
    the ranges of :func:`parse_dynamic`.

    Raises:
        InputError: bad syntax, a dim given twice, or a bad range.
    """
    found: dict[str, list[int]] = {}
    for item in items:
        for part in item.split(","):
            name, sep, value = part.strip().partition("=")
            try:
                sizes = [int(v) for v in value.split(":")]
            except ValueError:
                sizes = []
            if not sep or not name.strip() or len(sizes) < 2:
                raise InputError(f"expected DIM=LOW:HIGH or DIM=LOW:SIZE:...:HIGH for "
                                 f"--dynamic (e.g. batch=1:32), got '{part.strip()}'")
            if name.strip() in found:
                raise InputError(f"--dynamic gives dim '{name.strip()}' twice")
            found[name.strip()] = sizes
    return parse_dynamic({k: tuple(v) for k, v in found.items()})


def default_points(low: int, high: int) -> tuple[int, ...]:
    """Build sizes for a range named by its ends: the ends (TensorRT's min and max). Each build
    costs a compile, and on the CPU target a batch of n runs about as fast as n calls at batch
    1 (av_mnist: 8.0 ms at batch 8, 0.88 ms at batch 1), so sizes between are split into calls
    of the ends unless the user names sizes to build for (``(1, 8, 32)``)."""
    return tuple(sorted({low, high}))


# -- the model's dims ---------------------------------------------------------------------------

def symbolic_dims(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Named symbolic dims of ``model``'s inputs: dim name -> {input: axis}."""
    found: dict[str, dict[str, int]] = {}
    for info in graph_inputs(model):
        for axis, dim in enumerate(info.type.tensor_type.shape.dim):
            if dim.dim_param and not dim.HasField("dim_value"):
                found.setdefault(dim.dim_param, {})[info.name] = axis
    return found


def resize(feeds: Mapping[str, np.ndarray], axes: Mapping[str, int], size: int
           ) -> dict[str, np.ndarray]:
    """``feeds`` with the dim at ``axes`` (input -> axis) cut or repeated cyclically to
    ``size`` (repeating keeps every value one the model was given: token ids, masks)."""
    out = dict(feeds)
    for name, axis in axes.items():
        value = feeds[name]
        out[name] = np.take(value, np.arange(size) % value.shape[axis], axis=axis)
    return out


def _session(model: onnx.ModelProto) -> Callable[[Mapping[str, np.ndarray]], dict]:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, dict(feeds))))


def check_independent(run: Callable[[Mapping[str, np.ndarray]], dict],
                      feeds: Mapping[str, np.ndarray], axes: Mapping[str, int]
                      ) -> tuple[dict[str, int] | None, str]:
    """Whether rows along a dim are independent in the reference: outputs for 5 rows equal
    those for the first 2 and the last 3 run apart, joined along one axis of each output.

    Args:
        run: the reference (input name -> array, to output name -> array).
        feeds: inputs with the dim at 5 (distinct rows).
        axes: input -> the dim's axis.

    Returns:
        (output -> its axis along the dim, reason) when independent, else (None, reason).
    """
    take = lambda lo, hi: {k: (np.take(v, np.arange(lo, hi), axis=axes[k]) if k in axes else v)
                           for k, v in feeds.items()}
    try:
        full, first, rest = run(feeds), run(take(0, 2)), run(take(2, 5))
    except Exception as exc:  # noqa: BLE001  (the model refuses other sizes: not independent)
        return None, f"onnxruntime fails on 2 or 3 rows: {type(exc).__name__}"
    found = {}
    for name, value in full.items():
        a, b = np.asarray(first[name]), np.asarray(rest[name])
        value = np.asarray(value)
        axis = next((k for k in range(value.ndim) if value.shape[k] == 5 and a.shape[k] == 2
                     and b.shape[k] == 3 and a.ndim == b.ndim == value.ndim
                     and all(a.shape[j] == value.shape[j] for j in range(value.ndim) if j != k)),
                    None)
        if axis is None:
            return None, f"output '{name}' has no axis that follows the dim"
        joined = np.concatenate([a, b], axis=axis)
        scale = max(1.0, float(np.max(np.abs(value))) if value.size else 0.0)
        if not np.allclose(joined, value, rtol=0, atol=SPLIT_TOLERANCE * scale, equal_nan=True):
            return None, (f"output '{name}' changes when rows are run apart (rows are mixed: "
                          f"attention, a mean or a norm over the dim)")
        found[name] = axis
    return found, "rows independent (checked with onnxruntime)"


# -- building -----------------------------------------------------------------------------------

def _source(model: Any, example_inputs: Any, ranges: Mapping[str, tuple[int, ...]],
            modalities: Mapping[str, str] | None,
            input_shapes: Mapping[str, Sequence[int]] | None) -> tuple[onnx.ModelProto, str]:
    """The model as ONNX with its declared dims symbolic, and its name."""
    from mmcompile.frontend import load_graph, load_onnx, set_input_shapes, trace
    from mmcompile.ir import Graph
    if isinstance(model, Graph):
        proto, name = model.to_onnx(), model.name
    elif isinstance(model, onnx.ModelProto):
        proto, name = model, "model"
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        proto = (load_graph(path, modalities).to_onnx() if path.suffix == ".pt2"
                 else load_onnx(path))
        name = path.name
    else:
        name = type(model).__name__
        if set(ranges) != {"batch"}:
            raise InputError(f"a torch module ({name}) can have only 'batch' (dim 0 of every "
                             f"input) declared dynamic, got {sorted(ranges)}; for other dims "
                             f"export it to ONNX with named dynamic axes and compile the file")
        if example_inputs is None:
            raise MMCompileError(f"compiling a {name} needs example_inputs to trace it")
        proto = trace(model, example_inputs, modalities, dynamic_batch=True,
                      name=name).to_onnx()
    if input_shapes:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        set_input_shapes(copy, input_shapes, name)
        proto = copy
    return proto, name


def _plan_dims(proto: onnx.ModelProto, name: str, ranges: Mapping[str, tuple[int, ...]],
               found: Mapping[str, Mapping[str, int]], random_at: Callable[[str, int], dict],
               example_sizes: Mapping[str, int]) -> list[DynamicDim]:
    """Each declared dim's mode (split / pad / exact) and build sizes; ``found``: the model's
    named symbolic dims (:func:`symbolic_dims`), ``proto``: the model with the others fixed."""
    run = _session(proto)
    dims, split_taken = [], False
    for dim_name, sizes in ranges.items():
        if dim_name not in found:
            known = ", ".join(f"'{d}' ({', '.join(f'{i} dim {a}' for i, a in where.items())})"
                              for d, where in found.items()) or "none"
            raise InputError(f"dynamic names dim '{dim_name}', but no input of {name} has a dim "
                             f"of that name; its named symbolic dims: {known}")
        low, high = sizes[0], sizes[-1]
        axes = found[dim_name]
        outputs, reason = (None, "a single size") if low == high else \
            check_independent(run, random_at(dim_name, 5), axes)
        if outputs is not None:
            mode = "pad" if split_taken else "split"
            split_taken = True
            points = sizes if len(sizes) > 2 else default_points(low, high)
        else:
            # the declared sizes (ends and named ones) and the example's; the symbolic build
            # serves the rest (CLIP at batch 8 of (1, 8) ran there 2.3x slower than static)
            mode, outputs = "exact", {}
            points = tuple(sorted({*sizes, *((example_sizes[dim_name],)
                                             if dim_name in example_sizes else ())}))
        dims.append(DynamicDim(dim_name, low, high, points, mode, dict(axes), outputs, reason))
    return dims


def _builds(dims: Sequence[DynamicDim]) -> list[dict[str, int | None]]:
    """Every combination of the dims' build sizes (None: symbolic, for an exact dim's rest)."""
    combos: list[dict[str, int | None]] = [{}]
    for dim in dims:
        choices: list[int | None] = list(dim.points) + ([None] if dim.symbolic else [])
        combos = [{**c, dim.name: size} for c in combos for size in choices]
    return combos


def _measure(profiles: Sequence[Profile], rounds: int = 7) -> None:
    """Set each static build's ``cost_ms``: the median of ``rounds`` calls, taken in turns
    (round-robin), so that a burst of load on the machine hits every build alike."""
    timed = [p for p in profiles if None not in p.sizes.values()]
    feeds = [p.model.signature.random_inputs() for p in timed]
    times: list[list[float]] = [[] for _ in timed]
    for round_ in range(rounds + 2):
        for profile, inputs, spent in zip(timed, feeds, times):
            start = time.perf_counter()
            profile.model.run(inputs)
            if round_ >= 2:  # the first calls pay for loading and thread start-up
                spent.append(time.perf_counter() - start)
    for profile, spent in zip(timed, times):
        profile.cost_ms = statistics.median(spent) * 1e3


def compile_dynamic(model: Any, example_inputs: Any, dynamic: Mapping[str, Any], *,
                    options: Mapping[str, Any], modalities: Mapping[str, str] | None = None,
                    input_shapes: Mapping[str, Sequence[int]] | None = None, verify: bool = True,
                    tolerance: float = 1e-4, measure: bool = True, workers: int | None = None,
                    progress: Callable[[str], None] | None = None) -> ProfiledModel:
    """Compile ``model`` for the dim ranges in ``dynamic`` (see the module docstring).

    Args:
        model, example_inputs, modalities, input_shapes: as for :func:`mmcompile.compile`;
            the example's sizes of declared dims must lie in their ranges, and its sizes of
            other symbolic dims are fixed as usual.
        dynamic: dim name -> ``(low, high)`` or ``(low, size, ..., high)``.
        options: further :func:`mmcompile.compile` keywords for every build (target, passes,
            schedule, ...).
        verify, tolerance: check the dispatcher against onnxruntime (every build's size and
            one size between builds per dim).
        measure: time the builds (their costs choose how calls are split) and let the builds
            made in this process measure their schedules.
        workers: worker processes for builds (default: :func:`spare_cores`).
        progress: called with one-line status messages.

    Returns:
        The :class:`~mmcompile.profiles.ProfiledModel`.

    Raises:
        InputError: a bad range, a dim no input has, an example outside its range, too many
            builds.
        MMCompileError: as :func:`mmcompile.compile` for any build (named).
    """
    from mmcompile.build import as_numpy
    from mmcompile.frontend import from_onnx_model
    from mmcompile.reference import random_inputs
    from mmcompile.signature import Signature
    say = progress or (lambda message: None)
    started = time.perf_counter()
    ranges = parse_dynamic(dynamic)
    proto, name = _source(model, example_inputs, ranges, modalities, input_shapes)
    found = symbolic_dims(proto)
    names = [i.name for i in graph_inputs(proto)]
    feeds = as_numpy(example_inputs, names) if example_inputs is not None else None
    declared_axes = {(i, a) for d in ranges if d in found for i, a in found[d].items()}
    fixed, specialized = _fix_others(proto, feeds, declared_axes, name)
    ranged = pin(proto, fixed)
    source = from_onnx_model(ranged, modalities, name=name)
    example_sizes: dict[str, int] = {}
    if feeds is not None:
        for dim_name, sizes in ranges.items():
            for input_name, axis in found.get(dim_name, {}).items():
                size = int(feeds[input_name].shape[axis])
                if not sizes[0] <= size <= sizes[-1]:
                    raise InputError(f"example input '{input_name}' has {dim_name} = {size}, "
                                     f"outside the declared range {sizes[0]}..{sizes[-1]}")
                example_sizes[dim_name] = size

    def random_at(dim_name: str, size: int) -> dict[str, np.ndarray]:
        pins = {**{i: dict(a) for i, a in fixed.items()}}
        for other, sizes in ranges.items():
            for input_name, axis in found.get(other, {}).items():
                pins.setdefault(input_name, {})[axis] = (
                    size if other == dim_name else example_sizes.get(other, sizes[0]))
        return random_inputs(from_onnx_model(pin(proto, pins), name=name), seed=1)

    say("checking which declared dims can be padded: " + ", ".join(ranges))
    dims = _plan_dims(ranged, name, ranges, found, random_at, example_sizes)
    for dim in dims:
        say(f"dynamic {dim.describe()}")
    builds = _builds(dims)
    if len(builds) > MAX_BUILDS:
        raise InputError(f"the declared ranges need {len(builds)} builds (at most {MAX_BUILDS}): "
                         f"name fewer sizes, or fewer dims that cannot be padded")

    folder = Path(tempfile.mkdtemp(prefix="mmcompile-dynamic-"))
    try:
        models, used = compile_builds(builds, dims, ranged, name, folder, options, measure,
                                      spare_cores() if workers is None else workers, say)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    profiles = [Profile(sizes, built) for sizes, built in zip(builds, models)]
    if measure:
        say("timing each build (its cost decides how calls between builds are split)")
        _measure(profiles)
    base = Signature.from_graph(source)
    outputs = []
    for spec in base.outputs:  # shape inference names an output's batch 'unk__0': say 'batch'
        shape = list(spec.shape)
        for dim in dims:
            if spec.name in dim.outputs:
                shape[dim.outputs[spec.name]] = dim.name
        outputs.append(replace(spec, shape=tuple(shape)))
    signature = RangedSignature(base.inputs, tuple(outputs),
                                tuple((d.name, d.low, d.high) for d in dims))
    first = models[0].metadata
    metadata = {k: first[k] for k in ("pipeline", "source") if k in first}
    metadata.update(source=name, dynamic=[d.to_dict() for d in dims], workers=used)
    if specialized:
        metadata["specialized"] = specialized
    compiled = ProfiledModel(signature, dims, profiles, models[0].target, metadata)
    # Worker-built libraries are loaded from the scratch folder: it lives as long as the model.
    weakref.finalize(compiled, shutil.rmtree, str(folder), True)
    if verify:
        compiled.metadata["verification"] = _verify(compiled, source, feeds, dims, tolerance,
                                                    random_at, say)
    compiled.metadata["compile_seconds"] = time.perf_counter() - started
    return compiled


def _fix_others(proto: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None,
                declared: set[tuple[str, int]], name: str
                ) -> tuple[dict[str, dict[int, int]], dict[str, dict[str, list]]]:
    """Symbolic dims not declared dynamic are fixed to the example's sizes (1 without an
    example), as without ``dynamic=``. Returns (input -> {axis: size}, the report's entry:
    input -> {"declared": dims, "shape": dims after fixing})."""
    from mmcompile.frontend import example_shapes
    shapes = example_shapes(proto, feeds, None, name) if feeds is not None else {}
    fixed: dict[str, dict[int, int]] = {}
    report: dict[str, dict[str, list]] = {}
    for info in graph_inputs(proto):
        dims = info.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if (info.name, axis) in declared or (dim.HasField("dim_value") and dim.dim_value > 0):
                continue
            size = shapes[info.name]["shape"][axis] if info.name in shapes else 1
            fixed.setdefault(info.name, {})[axis] = size
        if info.name in fixed:
            declared_dims = [d.dim_param or (d.dim_value if d.dim_value > 0 else "?")
                             for d in dims]
            report[info.name] = {"declared": declared_dims,
                                 "shape": [fixed[info.name].get(a, d)
                                           for a, d in enumerate(declared_dims)]}
    return fixed, report


def _verify(compiled: ProfiledModel, source: Any, feeds: Mapping[str, np.ndarray] | None,
            dims: Sequence[DynamicDim], tolerance: float, random_at: Callable,
            say: Callable[[str], None]) -> str:
    """Compare the dispatcher with onnxruntime at every build's sizes and one size between
    builds per dim; the inputs are the example's, cut or repeated to each size."""
    base = feeds if feeds is not None else random_at(dims[0].name, dims[0].low)
    cases: list[dict[str, int]] = []
    for profile in compiled.profiles:
        case = {}
        for dim in dims:
            size = profile.sizes[dim.name]
            if size is None:  # the symbolic build: a size with no build of its own
                size = next(s for s in range(dim.low, dim.high + 1) if s not in dim.points)
            case[dim.name] = size
        cases.append(case)
    for dim in dims:
        between = [s for s in range(dim.low, dim.high + 1) if s not in dim.points]
        if between and dim.mode != "exact":
            cases.append({**cases[0], dim.name: between[-1]})
    from mmcompile.build import reference_error
    worst, checked = [], []
    for case in cases:
        inputs = dict(base)
        for dim in dims:
            inputs = resize(inputs, dim.inputs, case[dim.name])
        label = ", ".join(f"{k}={v}" for k, v in case.items())
        say(f"verifying against onnxruntime at {label}")
        try:
            worst.append(reference_error(compiled, source, inputs, tolerance)[0])
        except MMCompileError as exc:
            raise in_case(exc, f"at {label}") from exc
        checked.append(label)
    return (f"ok at {len(checked)} sizes ({'; '.join(checked)}), max abs err {max(worst):.3g} "
            f"vs onnxruntime")
