"""How far a quantized model's outputs are from the float model's, and the accuracy budget.

Without labels, accuracy is agreement with the float model on held-back samples: per output,
the mean cosine similarity of each sample's values, the largest error relative to
``max(1, max|float|)`` (as ``verify`` measures), and for outputs with classes on the last
axis the top-1 agreement. An output is judged by its *score*: cosine, and for a
classifier's output the lower of cosine and top-1 agreement. The *drop* of a model is
``1 - score`` of its worst output.

Which outputs are a classifier's (:func:`default_metrics`) is read from the graph: a class axis
(the last, of two or more entries) written by a linear layer or a (log-)softmax, through
shape-only ops and scalings by a positive constant (CLIP's similarity logits: a MatMul times
its learned temperature, and that matrix transposed). A 1% top-1 loss is invisible to cosine (a
random-weight classifier lost 7% of its top-1 at cosine 0.99998), and embeddings (CLIP's,
written by a normalization) have no classes, hence the two metrics. A top-1 budget needs rows
to resolve it: ``max_drop`` 0.01 means one disagreement in 100 rows (:func:`unresolved`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METRICS = ("cosine", "top1")
# Ops that write class scores, and the shape-only or (de)quantizing ops between one and an
# output.
_CLASS_SCORES = frozenset({"Gemm", "MatMul", "Softmax", "LogSoftmax"})
# A Transpose keeps them scores: CLIP's logits per text are its logits per image transposed.
_PASS_THROUGH = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast",
                           "Transpose", "QuantizeLinear", "DequantizeLinear"})


@dataclass
class OutputAccuracy:
    """One output's agreement with the float model over ``samples`` feeds."""

    name: str
    metric: str
    cosine: float
    max_err: float
    top1: float | None
    samples: int
    rows: int = 0  # the rows top-1 agreement was counted over (samples x rows per sample)

    @property
    def score(self) -> float:
        """Cosine; for an output judged by top-1, the lower of top-1 agreement and cosine
        (on few rows top-1 sees little, and a classifier's scores are still vectors)."""
        if self.metric == "top1" and self.top1 is not None:
            return min(self.top1, self.cosine)
        return self.cosine

    def to_dict(self) -> dict:
        return {"output": self.name, "metric": self.metric, "cosine": round(self.cosine, 6),
                "max_err": float(f"{self.max_err:.4g}"),
                "top1": None if self.top1 is None else round(self.top1, 4),
                "samples": self.samples, "rows": self.rows}

    def __str__(self) -> str:
        top1 = ("" if self.top1 is None else
                f", top-1 agreement {self.top1:.1%} over {self.rows} row(s)")
        return (f"{self.name}: cosine {self.cosine:.5f}, max error {self.max_err:.3g}{top1} "
                f"({self.samples} samples, judged by {self.metric})")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def compare(reference: Sequence[Mapping[str, np.ndarray]],
            quantized: Sequence[Mapping[str, np.ndarray]],
            metrics: Mapping[str, str] | None = None) -> list[OutputAccuracy]:
    """Per-output agreement of ``quantized`` with ``reference`` (one dict per sample)."""
    metrics = metrics or {}
    result = []
    for name in reference[0]:
        refs = [np.asarray(r[name]) for r in reference]
        gots = [np.asarray(q[name]) for q in quantized]
        if not np.issubdtype(refs[0].dtype, np.floating):
            same = float(np.mean([np.array_equal(r, g) for r, g in zip(refs, gots)]))
            result.append(OutputAccuracy(name, "top1", same, 0.0 if same == 1 else 1.0, same,
                                         len(refs), len(refs)))
            continue
        scale = max(1.0, max(float(np.abs(r).max(initial=0.0)) for r in refs))
        err = max(float(np.abs(r.astype(np.float64) - g).max(initial=0.0)) for r, g in
                  zip(refs, gots)) / scale
        if refs[0].size > 1:
            cosine = float(np.mean([_cosine(r, g) for r, g in zip(refs, gots)]))
        else:  # one value per sample (CLIP's 1x1 logits at batch 1): its cosine is its sign,
            # -1 for a logit near 0 that rounds across it; compare the values over the samples
            cosine = _cosine(np.concatenate([r.ravel() for r in refs]),
                             np.concatenate([g.ravel() for g in gots]))
        top1, rows = None, 0
        if refs[0].ndim >= 1 and refs[0].shape[-1] >= 2:
            agree = np.concatenate([(np.argmax(r, -1) == np.argmax(g, -1)).ravel()
                                    for r, g in zip(refs, gots)])
            top1, rows = float(np.mean(agree)), int(agree.size)
        result.append(OutputAccuracy(name, metrics.get(name, "cosine"), cosine, err, top1,
                                     len(refs), rows))
    return result


def _scaled_operand(node: Any) -> Any:
    """The other operand of a ``Mul`` / ``Div`` by one positive constant (CLIP's learned
    temperature, ``logit_scale.exp()``), which changes no argmax; else None."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    for at, other in ((1, 0), (0, 1)) if node.op == "Mul" else ((1, 0),):
        values = getattr(node.inputs[at], "values", None)
        if values is not None and np.size(values) == 1 and float(np.ravel(values)[0]) > 0:
            return node.inputs[other]
    return None


def _writes_class_scores(tensor: Any) -> bool:
    while tensor.inputs:
        node = tensor.inputs[0]
        scaled = _scaled_operand(node)
        if scaled is not None:
            tensor = scaled
        elif node.op in _PASS_THROUGH:
            tensor = node.inputs[0]
        else:
            break
    if not tensor.inputs:
        return False
    node = tensor.inputs[0]
    if node.op == "Add":  # a MatMul's bias
        return any(t.inputs and t.inputs[0].op == "MatMul" for t in node.inputs)
    return node.op in _CLASS_SCORES


def default_metrics(graph: Any) -> dict[str, str]:
    """Output name -> ``top1`` for the outputs of ``graph`` (a :class:`~mmcompile.ir.Graph`)
    that hold class scores (see the module docstring), ``cosine`` for the rest."""
    metrics = {}
    for tensor in graph.gs.outputs:
        shape = tensor.shape or []
        classes = shape[-1] if shape else None
        scores = isinstance(classes, int) and classes >= 2 and _writes_class_scores(tensor)
        metrics[tensor.name] = "top1" if scores else "cosine"
    return metrics


def drop_at_least(reference: Sequence[Mapping[str, np.ndarray]],
                  quantized: Sequence[Mapping[str, np.ndarray]],
                  metrics: Mapping[str, str] | None = None) -> float:
    """A lower bound of the drop over all ``reference`` samples, from the outputs of the first
    ``len(quantized)``: each output's ``1 - cosine`` and ``1 - top1`` are means over samples of
    terms that are never negative, so the seen samples' share of them cannot shrink. 0 when an
    output's cosine is not such a mean (one value per sample)."""
    seen = len(quantized)
    if any(np.asarray(value).size <= 1 and np.issubdtype(np.asarray(value).dtype, np.floating)
           for value in reference[0].values()):
        return 0.0
    return drop(compare(reference[:seen], quantized, metrics)) * seen / len(reference)


def unresolved(accuracy: Sequence[OutputAccuracy], max_drop: float) -> list[str]:
    """The outputs judged by top-1 compared on too few rows to show a drop of ``max_drop``
    (fewer than ``1 / max_drop``)."""
    return [a.name for a in accuracy if a.metric == "top1" and a.rows * max_drop < 1]


def drop(accuracy: Sequence[OutputAccuracy]) -> float:
    """``1 - score`` of the worst output."""
    return max((1.0 - a.score for a in accuracy), default=0.0)


def keep_in_float(order: Sequence[str], evaluate: Callable[[Sequence[str]], float],
                  max_drop: float, say: Callable[[str], None]) -> tuple[list[str], float]:
    """The shortest head of ``order`` to keep in float for the drop to be at most
    ``max_drop``.

    ``order`` is the quantizable layers, most sensitive first. Heads of 1, 2, 4, ... layers
    are measured until one holds the budget, then the gap to the last that did not is
    bisected: about 2 log2(n) measurements instead of n (keeping more layers in float is
    taken not to raise the drop; only a head that was measured to hold is returned).

    Args:
        order: the quantizable layers (node names), most sensitive first.
        evaluate: ``evaluate(kept)`` -> the drop with the layers ``kept`` in float (where it
            is over ``max_drop``, a lower bound above it will do).
        max_drop: the budget.

    Returns:
        ``(kept_in_float, final_drop)``.
    """
    measured: dict[int, float] = {len(order): 0.0}  # every layer float: the float model

    def drop_with(kept: int) -> float:
        if kept not in measured:
            measured[kept] = evaluate(order[:kept])
            say(f"keeping the {kept} most sensitive layer(s) in float: drop "
                + (f"{measured[kept]:.4f}" if measured[kept] <= max_drop else
                   f"at least {measured[kept]:.4f}, over the budget"))
        return measured[kept]

    failed, held = 0, 1
    while held < len(order) and drop_with(held) > max_drop:
        failed, held = held, min(2 * held, len(order))
    while held - failed > 1:
        middle = (failed + held) // 2
        if drop_with(middle) <= max_drop:
            held = middle
        else:
            failed = middle
    return list(order[:held]), measured[held]
