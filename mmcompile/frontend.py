"""Frontends: torch modules, ``.onnx`` files and ``.pt2`` (torch.export) files -> :class:`Graph`.

Everything becomes ONNX first: ``torch.onnx.export`` with the dynamo exporter (opset 18 by
default: TVM's ONNX importer rejects the opset-23 ``Attention`` op that newer opsets produce). The
model is checked with ``onnx.checker``, input shapes can be fixed (which lets constant folding
turn the exporter's shape arithmetic into constants), shapes are inferred, and inputs are tagged
with modalities.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from mmcompile.errors import ExportError, MMCompileError, ModelLoadError
from mmcompile.ir import PROTO_LIMIT, Graph
from mmcompile.transform.rewrite import has_static_shape

DEFAULT_OPSET = 18

ExampleInputs = Sequence[Any] | Mapping[str, Any] | Any


def _as_torch(value: Any) -> Any:
    import torch
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return value


def _export(module: Any, example_inputs: ExampleInputs, path: Path, opset: int,
            dynamic_batch: bool) -> None:
    import torch
    if isinstance(example_inputs, Mapping):
        args: tuple = ()
        kwargs = {k: _as_torch(v) for k, v in example_inputs.items()}
    else:
        if not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)
        args, kwargs = tuple(_as_torch(v) for v in example_inputs), {}
    dynamic_shapes = None
    if dynamic_batch:
        # torch.export specialises size-1 dims: a batch traced at 1 would silently stay 1.
        def widen(t: Any) -> Any:
            return torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.shape[:1] == (1,) else t
        args, kwargs = tuple(widen(a) for a in args), {k: widen(v) for k, v in kwargs.items()}
        batch = torch.export.Dim("batch")
        if kwargs:
            dynamic_shapes = {k: {0: batch} for k in kwargs}
        else:
            dynamic_shapes = tuple({0: batch} for _ in args)
    if hasattr(module, "eval"):
        module.eval()
    # The exporter chats on stdout and warns about optional torchvision ops on stderr: keep both
    # off the user's terminal (its real failures arrive as exceptions).
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, f=str(path), kwargs=kwargs, dynamo=True,
                              opset_version=opset, dynamic_shapes=dynamic_shapes,
                              external_data=True)
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's type and first line: torch wraps the real error in two layers of
    generic text (with terminal colour codes)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def trace(module: Any, example_inputs: ExampleInputs, modalities: Mapping[str, str] | None = None,
          *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
          name: str | None = None) -> Graph:
    """Export a ``torch.nn.Module`` (or ``torch.export.ExportedProgram``) to the graph IR.

    Args:
        module: the model; it is put in eval mode.
        example_inputs: a tuple of positional inputs or a dict of keyword inputs (torch tensors
            or numpy arrays). Graph input names are the forward() argument names.
        modalities: input name -> modality; inferred for inputs not named.
        opset: ONNX opset to export with.
        dynamic_batch: make dimension 0 of every input symbolic.
        name: name used in messages (default: the module's class name).

    Returns:
        The :class:`Graph`, shape-inferred and modality-tagged.

    Raises:
        ExportError: torch.onnx.export failed (the exporter's message is included).
        ModalityError: ``modalities`` names a missing input.
    """
    name = name or type(module).__name__
    with tempfile.TemporaryDirectory(prefix="mmcompile-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            _export(module, example_inputs, path, opset, dynamic_batch)
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed for {name}: {_root_cause(exc)}") from exc
        model = onnx.load(str(path))  # loads external weights while the folder still exists
    return from_onnx_model(model, modalities, name=name)


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX file (external data is loaded from beside it).

    Raises:
        ModelLoadError: missing file, not ONNX, or fails ``onnx.checker``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no such model file: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # DecodeError, missing external data, ...
        raise ModelLoadError(f"{path} is not a readable ONNX model: {exc}") from exc
    if not model.graph.output or not model.opset_import:
        raise ModelLoadError(f"{path} is not an ONNX model (no graph outputs or opset imports)")
    try:
        if model.ByteSize() < PROTO_LIMIT:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelLoadError(f"{path} fails onnx.checker: {first}") from exc
    return model


def set_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]],
                     name: str = "model") -> None:
    """Fix the shapes of graph inputs in place (e.g. a symbolic batch -> 1).

    Raises:
        ModelLoadError: an unknown input name, or a rank that differs from the model's.
    """
    by_name = {i.name: i for i in model.graph.input}
    for input_name, shape in shapes.items():
        if input_name not in by_name:
            raise ModelLoadError(f"--input-shape names '{input_name}', but {name} has inputs "
                                 f"{list(by_name)}")
        dims = by_name[input_name].type.tensor_type.shape.dim
        if len(dims) and len(dims) != len(shape):
            raise ModelLoadError(f"input '{input_name}' of {name} has rank {len(dims)}, "
                                 f"but shape {list(shape)} was given")
        del dims[:]
        for size in shape:
            dims.add().dim_value = int(size)
    # Some exporters (Paddle2ONNX) write an unknown dim as dim_value -1; once the inputs are
    # pinned, shape inference derives the real size and the strict checker refuses the
    # mismatch ("Inferred shape and existing shape differ: (1) vs (-1)"). -1 means unknown:
    # say so.
    for value in (*model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()


def _copied(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def from_onnx_model(model: onnx.ModelProto, modalities: Mapping[str, str] | None = None, *,
                    name: str = "model",
                    input_shapes: Mapping[str, Sequence[int]] | None = None) -> Graph:
    """Shape-infer an already checked ModelProto and wrap it as a :class:`Graph` (``model``
    itself is left as it is)."""
    if input_shapes:
        model = _copied(model)
        set_input_shapes(model, input_shapes, name)
    if model.ByteSize() < PROTO_LIMIT:
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except onnx.shape_inference.InferenceError as exc:
            raise ModelLoadError(f"{name}: ONNX shape inference failed: {exc}") from exc
    return Graph.from_onnx(model, modalities, name=name)


def load_graph(path: str | os.PathLike, modalities: Mapping[str, str] | None = None, *,
               input_shapes: Mapping[str, Sequence[int]] | None = None,
               opset: int = DEFAULT_OPSET) -> Graph:
    """Load a ``.onnx`` file or a ``.pt2`` file saved by ``torch.export.save``.

    Args:
        path: the model file.
        modalities: input name -> modality; inferred for inputs not named.
        input_shapes: input name -> static shape, for models exported with symbolic dims.
        opset: opset used to export ``.pt2`` programs.

    Raises:
        ModelLoadError: unreadable, not a model, fails the checker, or bad ``input_shapes``.
        ExportError: a ``.pt2`` program cannot be exported to ONNX.
        ModalityError: ``modalities`` names a missing input.
    """
    path = Path(path)
    if path.suffix == ".pt2":
        return _load_pt2(path, modalities, input_shapes, opset)
    model = load_onnx(path)
    return from_onnx_model(model, modalities, name=path.name, input_shapes=input_shapes)


def _load_pt2(path: Path, modalities: Mapping[str, str] | None,
              input_shapes: Mapping[str, Sequence[int]] | None, opset: int) -> Graph:
    import torch
    if not path.is_file():
        raise ModelLoadError(f"no such model file: {path}")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a torch.export program: {exc}") from exc
    graph = trace(program, (), modalities, opset=opset, name=path.name)
    if input_shapes:
        model = graph.to_onnx()
        return from_onnx_model(model, modalities, name=path.name, input_shapes=input_shapes)
    return graph


def _declared(info: onnx.ValueInfoProto) -> list[int | str] | None:
    """An input's declared dims (ints, or names / "?" where symbolic); None without a shape."""
    kind = info.type.WhichOneof("value")
    if kind != "tensor_type" or not info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in info.type.tensor_type.shape.dim]


def example_shapes(model: onnx.ModelProto, example_inputs: Any,
                   explicit: Mapping[str, Sequence[int]] | None = None,
                   name: str = "model") -> dict[str, dict[str, list]]:
    """The inputs of ``model`` whose declared shape has symbolic (or unknown) dims, each with
    its declared dims and the shape of its example: ``{input: {"declared": [...], "shape":
    [...]}}``. Inputs in ``explicit`` (``input_shapes``) are left to it.

    Raises:
        InputError: an example's rank, or a static dim, differs from the model's.
    """
    from mmcompile.errors import InputError
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if isinstance(example_inputs, Mapping):
        given = dict(example_inputs)
    else:
        values = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        given = dict(zip((i.name for i in inputs), values))
    found = {}
    for info in inputs:
        value = given.get(info.name)
        if value is None or info.name in (explicit or {}) or not hasattr(value, "shape"):
            continue
        shape = [int(d) for d in value.shape]
        declared = _declared(info)
        if declared is not None and len(declared) != len(shape):
            raise InputError(f"example input '{info.name}' has rank {len(shape)}, but {name} "
                             f"declares {declared}")
        if declared is not None:
            for dim, size in zip(declared, shape):
                if isinstance(dim, int) and dim > 0 and dim != size:
                    raise InputError(f"example input '{info.name}' has shape {shape}, but "
                                     f"{name} declares {declared}")
        if declared is None or any(not isinstance(d, int) or d <= 0 for d in declared):
            found[info.name] = {"declared": declared, "shape": shape}
    return found


SPECIALIZED = "specialized_inputs"  # graph annotation: inputs fixed to their example's shape


def to_graph(model: Any, example_inputs: Any = None, *,
             modalities: Mapping[str, str] | None = None,
             input_shapes: Mapping[str, Sequence[int]] | None = None,
             specialize: bool = True) -> Graph:
    """Any supported model form -> Graph: a Graph, an ONNX ModelProto, a path (.onnx/.pt2), or a
    torch module with ``example_inputs``.

    With ``specialize`` (the default) and example inputs, symbolic input dims (``batch``,
    ``sequence``, ``-1``) of an ONNX model, a Graph or a ``.pt2`` program are fixed to the
    examples' shapes, as ``input_shapes`` would (which wins where both name an input): shapes
    then fold and TVM compiles static kernels. What was fixed is recorded in
    ``graph.annotations["specialized_inputs"]``.

    Raises:
        ModelLoadError, ExportError, ModalityError: the model cannot be read.
        InputError: an example input contradicts the model's declared shape.
    """
    if isinstance(model, (str, os.PathLike)) and Path(model).suffix == ".pt2":
        model = load_graph(model, modalities, input_shapes=input_shapes)
    onnx_model, name = None, "model"
    if isinstance(model, Graph):
        # a traced graph with a symbolic batch (trace(dynamic_batch=True)) is specialised like
        # an ONNX file: left symbolic, av_mnist at batch 8 ran 258 ms against 2.2 ms pinned
        symbolic = not all(has_static_shape(t) for t in model.gs.inputs)
        if not input_shapes and (not specialize or example_inputs is None or not symbolic):
            return model
        onnx_model, name = model.to_onnx(), model.name
    elif isinstance(model, onnx.ModelProto):
        onnx_model = model
    elif isinstance(model, (str, os.PathLike)):
        onnx_model, name = load_onnx(model), Path(model).name
    if onnx_model is not None:
        fixed = (example_shapes(onnx_model, example_inputs, input_shapes, name)
                 if specialize and example_inputs is not None else {})
        shapes = {**{k: v["shape"] for k, v in fixed.items()}, **dict(input_shapes or {})}
        graph = from_onnx_model(onnx_model, modalities, name=name, input_shapes=shapes)
        if fixed:
            graph.annotations[SPECIALIZED] = fixed
        return graph
    if example_inputs is None:
        raise MMCompileError(f"compiling a {type(model).__name__} needs example_inputs "
                             f"(a tuple or dict of tensors) to trace it")
    return trace(model, example_inputs, modalities)
