"""An ``onnx.backend`` adapter over :func:`mmcompile.compile`, for onnx's conformance tests.

``onnx.backend.test.BackendTest(MMCompileBackend, __name__)`` runs onnx's node tests through
mmcompile (see ``tests/test_onnx_backend.py``); ``python -m mmcompile.conformance`` measures the
whole op list against TVM's importer alone and onnxruntime.

TVM needs static shapes, and constant values for shape-like operands (Reshape's shape, Slice's
starts, Expand's shape, ...), which onnx's node tests pass as graph *inputs*. So compilation
waits for the first :meth:`MMCompileRep.run`: integer and boolean inputs are frozen to
initializers holding the values given, and so are inputs of any dtype whose values decide a
shape (float ``Resize`` scales, ``Range`` bounds); the other inputs' shapes are fixed to the
arrays given, and the compiled model is cached under those values and shapes. Other dtypes
pass through. The conformance report's TVM-alone baseline freezes the same way, so the two
compare like for like; a frozen test still checks the compiled graph, but mmcompile's constant
folding may then compute all of it ahead of time (through onnxruntime) when every input is
frozen. The fallback target is off (``fallback=None``): a node TVM cannot lower fails its test
rather than passing through onnxruntime, so the counts measure native lowering.
"""

from __future__ import annotations

import hashlib
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from mmcompile.runtime import CompiledModel


class BackendFailure(AssertionError):
    """mmcompile could not compile or run a model. An ``AssertionError``, so unittest (and the
    conformance table) count it as a failed test; the original exception is the ``__cause__``."""


def _freezable(value: Any, dtypes: tuple[str, ...]) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind in dtypes


# Operands whose values decide an output's shape, whatever their dtype: (op, input indices).
_SHAPE_OPERANDS = {"Resize": (1, 2, 3), "Upsample": (1,), "Range": (0, 1, 2), "Loop": (0,)}


def shape_inputs(model: onnx.ModelProto) -> set[str]:
    """Names of the graph inputs whose values reach a shape operand (Resize's scales, sizes
    and roi, Range's bounds, Loop's trip count), directly or through other nodes."""
    producer = {out: node for node in model.graph.node for out in node.output}
    pending = [node.input[i] for node in model.graph.node
               for i in _SHAPE_OPERANDS.get(node.op_type, ()) if i < len(node.input)]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in producer:
            pending.extend(producer[name].input)
    return seen & {i.name for i in model.graph.input}


def freeze_inputs(model: onnx.ModelProto, feeds: Mapping[str, Any],
                  kinds: tuple[str, ...] = ("i", "u", "b"),
                  shapes: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` specialised to ``feeds``.

    Args:
        model: the model; not modified.
        feeds: graph input name -> numpy array.
        kinds: numpy dtype kinds (``"i"`` signed, ``"u"`` unsigned, ``"b"`` bool) whose inputs
            become initializers with the given values.
        shapes: also freeze the inputs that decide output shapes (:func:`shape_inputs`), of
            any dtype (float Resize scales, Range bounds).

    Returns:
        The specialised model: frozen inputs removed from ``graph.input``, every other input's
        shape fixed to the shape of its array.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = []
    frozen_by_use = shape_inputs(model) if shapes else set()
    for value_info in out.graph.input:
        value = feeds.get(value_info.name)
        if _freezable(value, kinds) or (value_info.name in frozen_by_use
                                        and isinstance(value, np.ndarray)):
            out.graph.initializer.append(onnx.numpy_helper.from_array(value, value_info.name))
            continue
        if isinstance(value, np.ndarray) and value_info.type.HasField("tensor_type"):
            dims = value_info.type.tensor_type.shape.dim
            del dims[:]
            for size in value.shape:
                dims.add().dim_value = int(size)
        kept.append(onnx.ValueInfoProto())
        kept[-1].CopyFrom(value_info)  # the originals go with the container cleared below
    del out.graph.input[:]
    out.graph.input.extend(kept)
    return out


def _cache_key(feeds: Mapping[str, Any], kinds: tuple[str, ...], by_value: set[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(feeds):
        value = feeds[name]
        if not isinstance(value, np.ndarray):
            digest.update(f"{name}:{type(value).__name__};".encode())
            continue
        digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        if _freezable(value, kinds) or name in by_value:
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    """``Type: first line``; for a bare ``assert`` (no message), where it failed."""
    cause = exc
    while not str(cause).strip() and cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).strip()
    if text:
        return f"{type(exc).__name__}: {text.splitlines()[0]}"
    frames = traceback.extract_tb(cause.__traceback__)
    where = f" at {'/'.join(Path(frames[-1].filename).parts[-3:])}:{frames[-1].lineno}" \
        if frames else ""
    return f"{type(cause).__name__}{where}"


class MMCompileRep(BackendRep):
    """A model prepared for mmcompile; compiles on first :meth:`run` for the inputs given.

    Args:
        model: the ONNX model (copied).
        passes: the graph pipeline (see ``mmcompile passes``).
        freeze_kinds: numpy dtype kinds frozen to constants (see :func:`freeze_inputs`).
        threads: threads the compiled code may use (0: all cores).
    """

    def __init__(self, model: onnx.ModelProto, passes: str = "default",
                 freeze_kinds: tuple[str, ...] = ("i", "u", "b"), threads: int = 0):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.passes = passes
        self.freeze_kinds = tuple(freeze_kinds)
        self.threads = threads
        inits = {i.name for i in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in inits]
        self.output_names = [o.name for o in model.graph.output]
        self._compiled: dict[str, CompiledModel] = {}
        self._shape_inputs = shape_inputs(self.model)

    def _feeds(self, inputs: Any) -> dict[str, Any]:
        if isinstance(inputs, Mapping):
            return {k: np.asarray(v) if not isinstance(v, (list, tuple)) else v
                    for k, v in inputs.items()}
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if len(inputs) > len(self.input_names):
            raise BackendFailure(f"{len(inputs)} inputs given, the model takes "
                                 f"{len(self.input_names)}: {self.input_names}")
        return {name: np.asarray(v) if not isinstance(v, (list, tuple)) else v
                for name, v in zip(self.input_names, inputs)}

    def compiled_for(self, feeds: Mapping[str, Any]) -> CompiledModel:
        """The compiled model specialised to ``feeds`` (cached).

        Raises:
            BackendFailure: an input is not a tensor, or mmcompile (or TVM under it) failed.
        """
        key = _cache_key(feeds, self.freeze_kinds, self._shape_inputs)
        if key not in self._compiled:
            import mmcompile
            bad = [n for n, v in feeds.items() if not isinstance(v, np.ndarray)]
            if bad:
                raise BackendFailure(f"inputs {bad} are not tensors (sequence/optional inputs "
                                     f"are not supported)")
            model = freeze_inputs(self.model, feeds, self.freeze_kinds)
            # The real inputs, not random ones: compile() may run the model (stage scheduling)
            # and cannot make random data for every dtype (int4, float8).
            example = {i.name: feeds[i.name] for i in model.graph.input if i.name in feeds}
            try:
                # no fallback: conformance measures what mmcompile lowers natively
                self._compiled[key] = mmcompile.compile(model, example, target="cpu",
                                                        passes=self.passes, verify=False,
                                                        threads=self.threads, fallback=None)
            except Exception as exc:  # MMCompileError, or a TVM error that escaped unwrapped
                raise BackendFailure(f"mmcompile failed: {_first_line(exc)}") from exc
        return self._compiled[key]

    def run(self, inputs: Any, **kwargs: Any) -> list[np.ndarray]:
        """Run on positional inputs (graph input order) or a name -> array dict.

        Returns:
            The outputs as numpy arrays, in graph output order.

        Raises:
            BackendFailure: compilation or execution failed.
        """
        feeds = self._feeds(inputs)
        compiled = self.compiled_for(feeds)
        runtime_feeds = {name: feeds[name] for name in compiled.input_names}
        try:
            outputs = compiled.run(runtime_feeds)
        except Exception as exc:
            raise BackendFailure(f"mmcompile run failed: {_first_line(exc)}") from exc
        return [np.asarray(outputs[name]) for name in self.output_names]


class MMCompileBackend(Backend):
    """``onnx.backend`` entry point: ``MMCompileBackend.prepare(model).run(inputs)``.

    Only the CPU target is exposed; the harness's CUDA variants are skipped.
    """

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> MMCompileRep:
        """Check the model and return a rep that compiles on first run.

        Keyword args ``passes``, ``freeze_kinds`` and ``threads`` go to :class:`MMCompileRep`.

        Raises:
            BackendFailure: ``device`` is not supported.
        """
        if not cls.supports_device(device):
            raise BackendFailure(f"mmcompile's onnx backend runs on CPU only, not {device}")
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise BackendFailure(f"model fails onnx.checker: {_first_line(exc)}") from exc
        options = {k: kwargs[k] for k in ("passes", "freeze_kinds", "threads") if k in kwargs}
        return MMCompileRep(model, **options)

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU",
                  **kwargs: Any) -> list[np.ndarray]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device.upper().split(":")[0] == "CPU"


prepare = MMCompileBackend.prepare
run_model = MMCompileBackend.run_model
supports_device = MMCompileBackend.supports_device

