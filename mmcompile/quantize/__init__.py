"""Post-training int8 quantization to QDQ ONNX: ``mmcompile.quantize`` and ``compile(...,
quantize="int8")``.

What is onnxruntime's and what is ours:

- onnxruntime's quantization tooling does the quantization proper: its calibrators (MinMax,
  Percentile, Entropy) and its QDQ quantizer (symmetric per-channel int8 weights, int8 or
  uint8 activations, int32 bias), so the output is the QDQ format onnxruntime and TensorRT
  both run.
- Ours: calibration per modality branch (:mod:`.ranges`: a modality may have fewer samples;
  each tensor is calibrated on the samples that reach it, and the ranges handed to the
  quantizer as its calibration cache), checked calibration data (:mod:`.calibration`), the
  accuracy budget (:mod:`.sensitivity`: the drop with each layer alone int8, on held-back
  samples; :mod:`.accuracy`: the most sensitive layers kept in float until ``max_drop``
  holds, how many found by doubling and bisection; the models measured on the way are cut
  from the all-int8 one, only the final one is asked of the quantizer), and the report.

The layers are ranked on every other held-back sample, and a head of them holds the budget when
it holds on the other samples and on the ranking ones too. Ranked and checked on the same rows,
the search kept the layers whose quantization flipped those rows' near-tied argmaxes, and the
budget held there but not on new inputs: MM-IMDb at batch 1 (400 held-back rows), 8 layers
kept, top-1 agreement 99.5% on those rows and 97.5% on 400 new ones, hardly better than all
int8 (97.3%); ranked and checked apart, 15 layers kept, 100% on the new ones. Checked on the
other half alone (320 rows), g2p-id's BERT stopped at 2 layers by luck (98.3% on new words);
on both halves it keeps 8 (99.5%).

The quantized graph is a plain ONNX graph: ``compile`` places and lowers it like any other.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from mmcompile.errors import InputError, MMCompileError
from mmcompile.ir import Graph
from mmcompile.quantize.accuracy import (
    METRICS,
    OutputAccuracy,
    compare,
    default_metrics,
    drop,
    drop_at_least,
    keep_in_float,
    unresolved,
)
from mmcompile.quantize.calibration import CalibrationSet, load_calibration
from mmcompile.quantize.ranges import METHODS, branch_ranges, ort_method
from mmcompile.quantize.sensitivity import cut, sensitivities
from mmcompile.reference import onnxruntime_session, run_onnxruntime_many

SCHEMES = ("int8",)
ACTIVATIONS = ("uint8", "int8")
# The layers int8 pays for; the ops between them (softmax, layer norm, GELU, ...) stay float
# and are fused with the (de)quantization around them, as onnxruntime and TensorRT do.
OP_TYPES = ("Conv", "MatMul", "Gemm")
# Float ops worth naming in the report (the rest, reshapes and elementwise, go unmentioned).
_NOTABLE_FLOAT = frozenset({"Softmax", "LayerNormalization", "Gelu", "BatchNormalization",
                            "InstanceNormalization", "GroupNormalization", "ConvTranspose",
                            "LSTM", "GRU", "RNN", "Einsum", "Attention"})
DEFAULT_MAX_DROP = 0.01
DEFAULT_HOLDOUT = 0.2
_BOUND_EVERY = 2  # samples between the budget search's looks at a lower bound
# Per-channel DequantizeLinear (its ``axis``) is opset 13; older graphs are converted first.
QDQ_OPSET = 13


class QuantizationError(MMCompileError):
    """Quantization cannot proceed (a bad option, or onnxruntime's quantizer failed)."""


@dataclass
class QuantizedModel:
    """A model quantized to QDQ int8, and how.

    Attributes:
        graph: the quantized graph (QDQ ONNX), modality tags kept.
        float_graph: the float graph it was quantized from.
        method, activations: calibration method, activation type.
        samples: modality -> calibration samples used (held-back ones not included).
        held_back: modality -> samples held back for the accuracy figures (0: measured on
            the calibration samples themselves, when a modality has one sample).
        sha256: hash of the calibration data.
        accuracy: per output, the final model against the float one.
        all_int8: the same, with every layer quantized (before the budget).
        float_layers: layer kept in float -> why.
        float_ops: op type -> nodes that are float because the scheme does not quantize them.
        sensitivity: layer -> the drop with that layer alone quantized (when measured).
        layers: the quantized layers.
        unresolved: outputs judged by top-1 on too few held-back rows to show a
            ``max_drop`` on the half that checks the budget (see
            :func:`.accuracy.unresolved`).
    """

    graph: Graph
    float_graph: Graph
    method: str
    activations: str
    samples: dict[str, int]
    held_back: dict[str, int]
    sha256: str
    accuracy: list[OutputAccuracy]
    all_int8: list[OutputAccuracy]
    max_drop: float | None
    float_layers: dict[str, str] = field(default_factory=dict)
    float_ops: dict[str, int] = field(default_factory=dict)
    sensitivity: dict[str, float] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    scheme: str = "int8"
    unresolved: list[str] = field(default_factory=list)

    @property
    def drop(self) -> float:
        return drop(self.accuracy)

    def info(self) -> dict[str, Any]:
        """What artifacts record (JSON-able)."""
        return {"scheme": self.scheme, "method": self.method, "activations": self.activations,
                "weights": "int8 symmetric per channel", "samples": self.samples,
                "held_back": self.held_back, "calibration_sha256": self.sha256,
                "layers_int8": len(self.layers), "float_layers": self.float_layers,
                "max_drop": self.max_drop, "drop": round(self.drop, 6),
                "accuracy": [a.to_dict() for a in self.accuracy],
                **({"unresolved": self.unresolved} if self.unresolved else {})}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the QDQ model (atomically; checked first)."""
        return self.graph.save(path)

    def report(self) -> str:
        """Calibration, per-output accuracy, and what stayed in float and why."""
        held = sum(self.held_back.values())
        lines = [f"{self.graph.name}: {self.scheme} (QDQ), weights int8 symmetric per channel, "
                 f"activations {self.activations}, calibration {self.method}",
                 "calibration samples: " + ", ".join(f"{m} {n}" for m, n in self.samples.items())
                 + (f"; accuracy on {held} held-back sample(s)" if held else
                    "; accuracy on the calibration samples (none could be held back)"),
                 f"layers: {len(self.layers)} int8, {len(self.float_layers)} kept in float",
                 "accuracy against the float model:"]
        lines += [f"  {a}" for a in self.accuracy]
        if self.unresolved:
            lines.append(f"  warning: {', '.join(self.unresolved)}: too few held-back rows to "
                         f"show a top-1 drop of {self.max_drop} (the budget is blind there)")
        if self.float_layers:
            lines.append(f"  with every layer int8, the drop was {drop(self.all_int8):.4f} "
                         f"(budget {self.max_drop}); now {self.drop:.4f}")
            lines.append("kept in float:")
            lines += [f"  {name}: {why}" for name, why in self.float_layers.items()]
        if self.float_ops:
            lines.append("float by scheme (not " + "/".join(OP_TYPES) + "; fused with the "
                         "(de)quantization around them): "
                         + ", ".join(f"{op} x{n}" for op, n in self.float_ops.items()))
        if self.sensitivity:
            worst = sorted(self.sensitivity.items(), key=lambda kv: -kv[1])[:5]
            lines.append("most sensitive layers (drop with that layer alone int8): "
                         + ", ".join(f"{n} {v:.4f}" for n, v in worst))
        return "\n".join(lines)


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer warns on the root logger (pre-processing hints)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _check_options(scheme: str, method: str, activations: str, max_drop: float | None,
                   holdout: float, metrics: Mapping[str, str], outputs: Sequence[str]) -> None:
    def one_of(what: str, value: Any, valid: Sequence[str]) -> None:
        if value not in valid:
            raise QuantizationError(f"unknown {what} {value!r} (valid: {', '.join(valid)})")
    one_of("scheme", scheme, SCHEMES)
    one_of("calibration method", method, METHODS)
    one_of("activation type", activations, ACTIVATIONS)
    if max_drop is not None and not 0 <= max_drop < 1:
        raise QuantizationError(f"max_drop must be in [0, 1), got {max_drop}")
    if not 0 <= holdout < 1:
        raise QuantizationError(f"holdout must be in [0, 1), got {holdout}")
    for name, metric in metrics.items():
        if name not in outputs:
            raise QuantizationError(f"metrics names {name!r}, not an output (outputs: "
                                    f"{', '.join(outputs)})")
        one_of(f"metric for {name!r}", metric, METRICS)


class _Quantizer:
    """Builds QDQ models from one float model and one set of ranges."""

    def __init__(self, graph: Graph, model: onnx.ModelProto, ranges, method: str,
                 activations: str, workdir: Path):
        from onnxruntime.quantization.calibrate import save_tensors_data
        self.graph, self.method, self.activations = graph, method, activations
        self.workdir = workdir
        self.model = model  # graph as ONNX
        self.cache = workdir / "ranges.json"
        save_tensors_data(ranges, self.cache)

    def build(self, exclude: Sequence[str] = ()) -> Graph:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        out = self.workdir / "quantized.onnx"
        act = QuantType.QUInt8 if self.activations == "uint8" else QuantType.QInt8
        try:
            with _quiet():
                quantize_static(self.model, out, None, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(OP_TYPES), per_channel=True,
                                activation_type=act, weight_type=QuantType.QInt8,
                                nodes_to_exclude=list(exclude),
                                calibrate_method=ort_method(self.method),
                                calibration_cache_path=self.cache,
                                extra_options={"WeightSymmetric": True,
                                               "ActivationSymmetric": self.activations == "int8"})
        except Exception as exc:  # onnxruntime raises plain exceptions for graphs it cannot take
            raise QuantizationError(f"onnxruntime's quantizer failed on {self.graph.name}: "
                                    f"{type(exc).__name__}: {exc}") from exc
        model = onnx.load(out)
        tags = {k: v.modality for k, v in self.graph.modalities.items()}
        result = Graph.from_onnx(model, tags, name=self.graph.name)
        result.annotations = dict(self.graph.annotations)
        return result


def quantize(model: Any, calibration: Any, *, scheme: str = "int8", method: str = "minmax",
             activations: str = "uint8", max_drop: float | None = DEFAULT_MAX_DROP,
             holdout: float = DEFAULT_HOLDOUT, metrics: Mapping[str, str] | None = None,
             keep_float: Sequence[str] = (), modalities: Mapping[str, str] | None = None,
             passes: str = "default", progress: Callable[[str], None] | None = None
             ) -> QuantizedModel:
    """Quantize ``model`` to QDQ int8 with post-training static calibration.

    Args:
        model: a :class:`Graph` or anything ``compile`` takes; run through the ``passes``
            pipeline first (folded batch norms quantize better; ``"none"`` quantizes it as
            it is).
        calibration: samples (see :func:`.calibration.load_calibration`): a ``.npz`` path,
            input name -> stacked samples, or a list of feed dicts; a modality may have fewer.
        scheme: ``int8``.
        method: ``minmax``, ``percentile`` or ``entropy``.
        activations: ``uint8`` (asymmetric; u8 x s8 is what x86 dot-product instructions
            take) or ``int8`` (symmetric, as TensorRT wants).
        max_drop: the accuracy budget (see :mod:`.accuracy`); the most sensitive layers are
            kept in float until it holds. None: quantize every layer and only report.
        holdout: share of each modality's samples held back to measure accuracy.
        metrics: output name -> ``cosine`` or ``top1``, over the default: ``top1`` for
            outputs holding class scores, ``cosine`` for the rest
            (:func:`.accuracy.default_metrics`).
        keep_float: node names or op types kept in float regardless.
        modalities, passes: as for ``compile``.
        progress: called with one-line status messages.

    Raises:
        InputError: the calibration data does not fit the model.
        QuantizationError: a bad option, or onnxruntime's quantizer failed.
    """
    say = progress or (lambda message: None)
    graph = _float_graph(model, calibration, modalities, passes)
    outputs = [t.name for t in graph.gs.outputs]
    _check_options(scheme, method, activations, max_drop, holdout, dict(metrics or {}), outputs)
    metrics = {**default_metrics(graph), **(metrics or {})}
    data = load_calibration(calibration, graph)
    calib, held = data.split(holdout)
    evaluation = held or calib
    say(f"calibrating ({method}) on " + ", ".join(f"{m} {n}" for m, n in calib.counts().items())
        + " sample(s)")
    layers = [n.name for n in graph.gs.nodes if n.op in OP_TYPES]
    forced = {n.name: "kept in float by request" for n in graph.gs.nodes
              if n.op in OP_TYPES and (n.name in keep_float or n.op in keep_float)}
    unknown = [k for k in keep_float if k not in forced and k not in {n.op for n in graph.gs.nodes}
               and k not in {n.name for n in graph.gs.nodes}]
    if unknown:
        raise QuantizationError(f"keep_float names {', '.join(map(repr, unknown))}: neither a "
                                f"node nor an op type of {graph.name}")
    float_model = _qdq_opset(graph.to_onnx(), graph.name)
    with _quiet():
        ranges, _ = branch_ranges(graph, float_model, calib, method, OP_TYPES)
    feeds = list(evaluation.feeds())
    reference = run_onnxruntime_many(float_model, feeds)
    with tempfile.TemporaryDirectory(prefix="mmc-quant-") as tmp:
        quantizer = _Quantizer(graph, float_model, ranges, method, activations, Path(tmp))
        candidates = [name for name in layers if name not in forced]

        def measure(model: onnx.ModelProto) -> list[OutputAccuracy]:
            return compare(reference, run_onnxruntime_many(model, feeds), metrics)

        # ranked on one half of the held-back samples, checked on both (docstring)
        rank, check = _halves(feeds), _halves(feeds, second=True)
        rank_ref, check_ref = _halves(reference), _halves(reference, second=True)

        def score(outputs: list[dict[str, np.ndarray]]) -> float:
            return drop(compare(rank_ref, outputs, metrics))

        def evaluate(kept: Sequence[str]) -> float:  # cut from the all-int8 model
            model = cut(float_model, everything, [n for n in candidates if n not in kept])
            if model is None:
                return 0.0
            worst = 0.0
            for half, ref in ((check, check_ref), (rank, rank_ref)):  # held on both halves
                worst = max(worst, _drop_or_over(model, half, ref, metrics, max_drop))
                if worst > max_drop:
                    break
            return worst

        say(f"quantizing {len(candidates)} layer(s)")
        result = quantizer.build(exclude=list(forced))
        everything = result.to_onnx()
        outputs = run_onnxruntime_many(everything, feeds)
        all_int8 = compare(reference, outputs, metrics)
        checked = compare(check_ref, _halves(outputs, second=True), metrics)
        blind = unresolved(checked, max_drop) if max_drop else []
        if blind:
            say(f"warning: top-1 of {', '.join(blind)} is checked on too few held-back rows "
                f"to show a {max_drop} drop; give at least {math.ceil(2 / max_drop)} rows, "
                f"half of which check the budget (more calibration samples, or a larger "
                f"holdout)")
        accuracy, float_layers, sensitivity = all_int8, dict(forced), {}
        if max_drop is not None and drop(all_int8) > max_drop and candidates:
            say(f"drop {drop(all_int8):.4f} over the budget {max_drop}: measuring each "
                f"layer's sensitivity")
            sensitivity = sensitivities(float_model, everything, candidates, rank, score)
            say(f"sensitivity: {len(sensitivity)} layers measured")
            order = sorted(sensitivity, key=lambda name: -sensitivity[name])
            kept, _ = keep_in_float(order, evaluate, max_drop, say)
            for name in kept:
                float_layers[name] = (f"accuracy budget: alone it costs {sensitivity[name]:.4f} "
                                      f"of the {max_drop} budget")
            result = quantizer.build(exclude=list(float_layers))
            accuracy = measure(result.to_onnx())
    ops = Counter(n.op for n in graph.gs.nodes if n.op in _NOTABLE_FLOAT)
    return QuantizedModel(
        graph=result, float_graph=graph, method=method, activations=activations,
        samples=calib.counts(), held_back=held.counts() if held else dict.fromkeys(
            calib.counts(), 0), sha256=data.sha256(), accuracy=accuracy, all_int8=all_int8,
        max_drop=max_drop, float_layers=float_layers, float_ops=dict(ops.most_common()),
        sensitivity=sensitivity, layers=[n for n in layers if n not in float_layers],
        unresolved=blind)


def _halves(samples: Sequence, second: bool = False) -> list:
    """Every other sample (``second``: the others); all of them when there is only one."""
    if len(samples) < 2:
        return list(samples)
    return list(samples[1::2] if second else samples[::2])


def _drop_or_over(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]],
                  reference: Sequence[Mapping[str, np.ndarray]], metrics: Mapping[str, str],
                  budget: float) -> float:
    """``model``'s drop on ``feeds``; or, once the samples run so far show it over ``budget``
    (:func:`.accuracy.drop_at_least`), that lower bound, without running the rest (most
    models the budget's search measures fail it: MM-IMDb, 5 of 8)."""
    session = onnxruntime_session(model)
    names = [o.name for o in session.get_outputs()]
    outputs = []
    for seen, feed in enumerate(feeds, 1):
        outputs.append(dict(zip(names, session.run(names, dict(feed)))))
        if seen % _BOUND_EVERY == 0 and seen < len(feeds):
            bound = drop_at_least(reference, outputs, metrics)
            if bound > budget:
                return bound
    return drop(compare(reference, outputs, metrics))


def _qdq_opset(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` at opset :data:`QDQ_OPSET` or later (onnxruntime's quantizer keeps the
    opset it is given and would write per-channel DequantizeLinear nodes an opset-11 graph
    cannot hold)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= QDQ_OPSET:
        return model
    from onnx import version_converter
    try:
        return version_converter.convert_version(model, QDQ_OPSET)
    except Exception as exc:  # the converter raises plain RuntimeErrors naming the op
        raise QuantizationError(
            f"{name} is ONNX opset {opset}; int8 QDQ needs opset {QDQ_OPSET} and onnx's "
            f"version converter could not convert it ({type(exc).__name__}: {exc}); export "
            f"it at opset {QDQ_OPSET} or later") from exc


def _float_graph(model: Any, calibration: Any, modalities: Mapping[str, str] | None,
                 passes: str) -> Graph:
    from mmcompile.frontend import to_graph
    from mmcompile.optimize import optimize
    if isinstance(model, Graph):
        return model if passes == "none" else optimize(model, passes).graph
    example = None
    if isinstance(calibration, Mapping):
        example = {k: np.asarray(v)[0] for k, v in calibration.items()}
    elif isinstance(calibration, Sequence) and calibration and isinstance(calibration[0], Mapping):
        example = calibration[0]
    if example is None and not isinstance(model, (str, os.PathLike, onnx.ModelProto)):
        raise InputError("quantizing a torch module needs calibration samples to trace it with "
                         "(a mapping or a list of feed dicts)")
    return optimize(to_graph(model, example, modalities=modalities), passes).graph
