"""The reference executor (onnxruntime) and the helpers that compare against it.

Used by verification (compiled model vs. original graph), by the pass tests (graph before vs.
after a pass) and by the benchmark.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from mmcompile.errors import InputError
from mmcompile.ir import Graph


_INDEX_PRESERVING = frozenset({"Reshape", "Flatten", "Unsqueeze", "Squeeze", "Identity", "Cast",
                               "Transpose", "Expand", "Slice"})


def embedding_bound(graph: Graph, name: str) -> int | None:
    """If integer input ``name`` indexes a constant table (the indices of a Gather, possibly
    through reshapes/casts), the table's size along the gathered axis; else None."""
    tensor = graph.gs.tensors().get(name)
    bounds, todo, seen = [], [tensor] if tensor is not None else [], set()
    while todo:
        current = todo.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        for node in current.outputs:
            if node.op == "Gather" and len(node.inputs) > 1 and node.inputs[1] is current \
                    and isinstance(node.inputs[0], gs.Constant):
                bounds.append(node.inputs[0].shape[int(node.attrs.get("axis", 0))])
            elif node.op in _INDEX_PRESERVING and node.inputs[0] is current:
                todo.extend(node.outputs)
    return min(bounds) if bounds else None


def input_signature(graph: Graph, batch: int | None = None) -> dict[str, tuple[tuple[int, ...],
                                                                               np.dtype]]:
    """input name -> (concrete shape, dtype); symbolic dims become ``batch`` (dim 0) or 1."""
    sig = {}
    for tensor in graph.gs.inputs:
        if tensor.shape is None:
            raise InputError(f"input '{tensor.name}' of {graph.name} has unknown rank; give its "
                             f"shape explicitly")
        shape = tuple(d if isinstance(d, int) and d >= 0 else (batch or 1) if i == 0 else 1
                      for i, d in enumerate(tensor.shape))
        if batch is not None and shape:
            shape = (batch,) + shape[1:]
        sig[tensor.name] = (shape, np.dtype(tensor.dtype))
    return sig


def random_inputs(graph: Graph, seed: int = 0, batch: int | None = None) -> dict[str, np.ndarray]:
    """Random inputs matching the graph's signature.

    Floats are standard normal; integer inputs that index an embedding table are drawn from its
    range, other integers from [0, 2); booleans are random.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtype) in input_signature(graph, batch).items():
        if np.issubdtype(dtype, np.floating):
            out[name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            high = embedding_bound(graph, name) or 2
            out[name] = rng.integers(0, high, size=shape).astype(dtype)
        elif dtype == np.bool_:
            out[name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise InputError(f"cannot make random data of dtype {dtype} for input '{name}'")
    return out


def run_onnxruntime(model: Graph | onnx.ModelProto, inputs: Mapping[str, np.ndarray],
                    optimize: bool = False, threads: int = 0) -> dict[str, np.ndarray]:
    """Run ``model`` under onnxruntime's CPU provider; output name -> array.

    ``optimize=False`` disables onnxruntime's own graph rewrites, so the reference is the graph
    as written.
    """
    return run_onnxruntime_many(model, [inputs], optimize, threads)[0]


def run_onnxruntime_many(model: Graph | onnx.ModelProto,
                         inputs: Sequence[Mapping[str, np.ndarray]], optimize: bool = False,
                         threads: int = 0) -> list[dict[str, np.ndarray]]:
    """:func:`run_onnxruntime` on each of ``inputs``, with one session (creating one costs
    more than a small model's run: the quantizer's accuracy budget ran 720 of them, 11 of the
    18 s MM-IMDb's quantization took)."""
    session = onnxruntime_session(model, optimize, threads)
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, dict(feeds)))) for feeds in inputs]


def onnxruntime_session(model: Graph | onnx.ModelProto, optimize: bool = False,
                        threads: int = 0) -> Any:
    """An onnxruntime CPU session over ``model`` (see :func:`run_onnxruntime`); ``threads``:
    its intra-op threads (0: onnxruntime's default)."""
    import onnxruntime as ort
    proto = model.to_onnx() if isinstance(model, Graph) else model
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


@dataclass
class OutputDiff:
    """How far one output is from its reference."""

    name: str
    max_abs: float
    max_rel: float
    where: tuple[int, ...]
    shape_ok: bool = True
    ref_scale: float = 0.0  # max |reference|, for relative tolerances

    def ok(self, atol: float, rtol: float = 0.0) -> bool:
        return self.shape_ok and self.max_abs <= atol + rtol * self.ref_scale

    def __str__(self) -> str:
        if not self.shape_ok:
            return f"{self.name}: shape mismatch"
        return (f"{self.name}: max abs err {self.max_abs:.3g} at {list(self.where)}, "
                f"max rel err {self.max_rel:.3g}")


def compare_outputs(reference: Mapping[str, np.ndarray],
                    actual: Mapping[str, np.ndarray]) -> list[OutputDiff]:
    """Per-output max absolute/relative error and where the largest absolute error is."""
    diffs = []
    for name, ref in reference.items():
        got = np.asarray(actual[name])
        ref = np.asarray(ref)
        if got.shape != ref.shape:
            diffs.append(OutputDiff(name, float("inf"), float("inf"), (), shape_ok=False))
            continue
        if ref.size == 0:
            diffs.append(OutputDiff(name, 0.0, 0.0, ()))
            continue
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        with np.errstate(invalid="ignore"):
            err = np.abs(got64 - ref64)
        # Equal values (infinities included) and NaN-where-NaN agree; any other NaN is wrong.
        agree = (got64 == ref64) | (np.isnan(got64) & np.isnan(ref64))
        err = np.where(agree, 0.0, np.where(np.isnan(err), np.inf, err))
        idx = np.unravel_index(int(np.argmax(err)), err.shape)
        rel = err / np.maximum(np.abs(np.nan_to_num(ref64)), 1e-12)
        finite = np.abs(ref64[np.isfinite(ref64)])
        diffs.append(OutputDiff(name, float(err.max()), float(rel.max()),
                                tuple(int(i) for i in idx),
                                ref_scale=float(finite.max()) if finite.size else 0.0))
    return diffs
