"""Activation ranges per modality branch, with onnxruntime's calibrators.

onnxruntime's calibrators (MinMax, Percentile, Entropy) run the model on every sample and see
one feed at a time, so a calibration set with fewer samples for one modality would have to be
cut to its smallest modality, or padded with repeats that skew histograms. Here each tensor
is calibrated on exactly the samples that reach it: a tensor that depends on one modality's
inputs only (a branch) on all of that modality's samples, in a run where the other inputs are
held fixed (they cannot reach it); a tensor that depends on several (the fusion) on the
samples where all of them are present. The merged ranges go back to onnxruntime's quantizer
through its calibration-cache file, the interface it offers for ranges computed elsewhere.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import onnx

from mmcompile.ir import Graph, node_inputs
from mmcompile.quantize.calibration import CalibrationSet

METHODS = ("minmax", "percentile", "entropy")


def ort_method(method: str):
    """onnxruntime's ``CalibrationMethod`` for ``method`` (one of :data:`METHODS`)."""
    from onnxruntime.quantization import CalibrationMethod
    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[method]


def tensor_modalities(graph: Graph) -> dict[str, frozenset[str]]:
    """Tensor name -> the modalities of the graph inputs it depends on."""
    reach: dict[str, frozenset[str]] = {}
    for tensor in graph.gs.inputs:
        tag = graph.modalities.get(tensor.name)
        reach[tensor.name] = frozenset({tag.modality if tag else "other"})
    import networkx as nx
    nodes = {node.name: node for node in graph.gs.nodes}
    for name in nx.topological_sort(graph.to_networkx()):
        node = nodes.get(name)
        if node is None:  # an "input:" vertex
            continue
        found = frozenset().union(*(reach.get(t.name, frozenset()) for t in node_inputs(node)))
        for out in node.outputs:
            reach[out.name] = found
    return reach


class _Reader:
    """onnxruntime's ``CalibrationDataReader`` over a list of feeds."""

    def __init__(self, feeds: Iterable[Mapping]):
        self._feeds = iter(list(feeds))

    def get_next(self):
        return next(self._feeds, None)

    def __len__(self):  # onnxruntime asks for it with strided calibration only
        return 0


def _calibrate(model_path: Path, feeds: Iterable[Mapping], method: str,
               op_types: Sequence[str], workdir: Path, extra: Mapping):
    from onnxruntime.quantization.calibrate import create_calibrator
    calibrator = create_calibrator(model_path, list(op_types),
                                   augmented_model_path=str(workdir / "augmented.onnx"),
                                   calibrate_method=ort_method(method), extra_options=dict(extra))
    try:
        calibrator.collect_data(_Reader(feeds))
        return calibrator.compute_data()
    finally:
        del calibrator


def branch_ranges(graph: Graph, model: onnx.ModelProto, data: CalibrationSet, method: str,
                  op_types: Sequence[str], extra: Mapping | None = None):
    """onnxruntime ``TensorsData`` for ``model`` (``graph`` as ONNX), each tensor calibrated
    on the samples that reach it (see the module docstring).

    Returns:
        ``(tensors_data, samples)``: the ranges, and tensor name -> samples it was calibrated on.
    """
    from onnxruntime.quantization.calibrate import TensorsData
    counts = data.counts()
    shared = min(counts.values())
    reach = tensor_modalities(graph)
    with tempfile.TemporaryDirectory(prefix="mmc-calib-") as tmp:
        workdir = Path(tmp)
        model_path = workdir / "model.onnx"
        onnx.save_model(model, model_path)
        joint = _calibrate(model_path, data.feeds(), method, op_types, workdir, extra or {})
        own = {m: _calibrate(model_path, data.feeds(only=m), method, op_types, workdir,
                             extra or {})
               for m, n in counts.items() if n > shared and len(counts) > 1}
    merged, used = {}, {}
    for name, value in joint.items():
        modalities = reach.get(name, frozenset())
        if len(modalities) == 1 and next(iter(modalities)) in own \
                and name in own[next(iter(modalities))]:
            (modality,) = modalities
            merged[name], used[name] = own[modality][name], counts[modality]
        else:
            merged[name], used[name] = value, shared
    return TensorsData(joint.calibration_method, merged), used
