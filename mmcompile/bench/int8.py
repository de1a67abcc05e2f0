"""Int8 workloads: each model quantized once (``mmcompile.quantize``) into the QDQ file that
every int8 engine runs, with its own reference outputs and its accuracy against float.

Calibration draws :data:`SAMPLES` random input sets at the workload's batch (the suite's inputs
are random too; a model file's integer inputs stay inside its embedding tables), and enough
further sets for the quantizer's accuracy budget to count :data:`BUDGET_ROWS` rows (it ranks
the layers on half of them and checks the budget on the other half; a 1% top-1 budget is blind
on fewer than 100, and 100 rows still miss a 1% difference by +-1%). The accuracy the row
reports is measured apart, on :data:`HELD_BACK` further random input sets the calibration never
saw (the QDQ graph against the float one, both under onnxruntime with optimizations off): per
output the mean cosine and the top-1 agreement over every row of every set. The QDQ graph's
outputs under onnxruntime with optimizations off are the reference int8 engines must match
(within ``int8_tolerance``: int8 kernels may round a requantized value the other way); their
agreement with the float reference is recorded beside, per output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SAMPLES = 32
BUDGET_ROWS = 400  # held-back rows the quantizer's budget is measured on
HELD_BACK = 200  # input sets for the accuracy against float (the figure)


@dataclass
class Int8Workload:
    """The quantized side of one workload."""

    qdq: Path
    reference: dict[str, np.ndarray]
    info: dict[str, Any]


def quantize_workload(onnx_path: Path, inputs_path: Path, batch: int, folder: Path,
                      say: Callable[[str], None]) -> Int8Workload:
    """Quantize ``onnx_path`` to ``folder/<stem>.int8.onnx``; its reference outputs on the
    workload's inputs."""
    from mmcompile.frontend import load_graph
    from mmcompile.quantize import quantize
    from mmcompile.reference import random_inputs, run_onnxruntime
    graph = load_graph(onnx_path)
    budget_sets = -(-BUDGET_ROWS // batch)
    calibration = [random_inputs(graph, seed=1000 + i, batch=batch)
                   for i in range(SAMPLES + budget_sets)]
    quantized = quantize(onnx_path, calibration,
                         holdout=budget_sets / (SAMPLES + budget_sets))
    qdq = quantized.save(folder / f"{onnx_path.stem}.int8.onnx")
    with np.load(inputs_path, allow_pickle=False) as data:
        feeds = {k: data[k] for k in data.files}
    say(f"quantized {onnx_path.stem}: {len(quantized.layers)} int8 layer(s), "
        f"{len(quantized.float_layers)} float, drop {quantized.drop:.4f}")
    held = held_back_accuracy(graph, quantized.graph, batch)
    say(f"accuracy of {onnx_path.stem} int8 against float on {HELD_BACK} held-back input sets: "
        + ", ".join(f"{name} cosine {a['cosine']:.5f}"
                    + (f" top-1 {a['top1']:.1%}" if a["top1"] is not None else "")
                    for name, a in held.items()))
    info = {**quantized.info(), "held_back": {"samples": HELD_BACK, "outputs": held}}
    return Int8Workload(qdq, run_onnxruntime(quantized.graph, feeds), info)


def held_back_accuracy(float_graph: Any, int8_graph: Any, batch: int,
                       samples: int = HELD_BACK) -> dict[str, dict[str, float | None]]:
    """Per output of the QDQ graph against the float graph on ``samples`` random input sets
    (seeds the calibration does not use): mean cosine and top-1 agreement (None for outputs
    without a class axis)."""
    import onnxruntime as ort

    from mmcompile.quantize.accuracy import compare
    from mmcompile.reference import random_inputs

    def session(graph: Any):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(graph.to_onnx().SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        return lambda feeds: dict(zip(names, sess.run(names, feeds)))

    run_float, run_int8 = session(float_graph), session(int8_graph)
    sets = [random_inputs(float_graph, seed=50_000 + i, batch=batch) for i in range(samples)]
    reference = [run_float(feeds) for feeds in sets]
    quantized = [run_int8(feeds) for feeds in sets]
    return {a.name: {"cosine": round(a.cosine, 6), "top1": a.top1}
            for a in compare(reference, quantized)}


def accuracy_vs_float(float_reference: Mapping[str, np.ndarray], outputs_path: str
                      ) -> dict[str, dict[str, float | None]] | None:
    """Per output, cosine and top-1 agreement of an int8 engine's outputs with float's."""
    from mmcompile.quantize.accuracy import compare
    try:
        with np.load(outputs_path, allow_pickle=False) as data:
            got = {k: data[k] for k in data.files}
    except (OSError, ValueError):
        return None
    if set(float_reference) - set(got):
        return None
    return {a.name: {"cosine": round(a.cosine, 6), "top1": a.top1}
            for a in compare([dict(float_reference)], [got])}
