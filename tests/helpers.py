"""Shared test helpers: build small ONNX graphs and check a pass the way every pass is checked."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

import mmcompile
from mmcompile.reference import compare_outputs, random_inputs, run_onnxruntime

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


def make_graph(nodes: Sequence[onnx.NodeProto], inputs: Sequence[tuple[str, int, list]],
               outputs: Sequence[tuple[str, int, list]],
               initializers: dict[str, np.ndarray] | None = None, opset: int = 18,
               modalities: dict[str, str] | None = None) -> mmcompile.Graph:
    """An mmcompile Graph from ONNX helper pieces (checked, shape-inferred)."""
    graph = helper.make_graph(
        list(nodes), "test",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    from mmcompile.frontend import from_onnx_model
    return from_onnx_model(model, modalities, name="test")


def check_pass(graph: mmcompile.Graph, passes: str, *, expect_changed: bool,
               structure: Callable[[mmcompile.Graph], None] | None = None,
               atol: float = 1e-5, rtol: float = 1e-5, seed: int = 0) -> mmcompile.OptimizeResult:
    """The four checks every pass test makes.

    1. ``structure(result.graph)`` holds (the caller's assertions on the rewritten graph);
    2. ``changed`` is reported exactly when expected, and the op counts agree with it;
    3. running the pipeline again is a no-op (idempotence);
    4. outputs equal the original graph's under onnxruntime on random inputs, within
       ``atol + rtol * max|ref|``.
    The pipeline runs with verify-after-each-pass on.
    """
    ctx = mmcompile.PassContext(verify_each=True)
    result = mmcompile.optimize(graph, passes, ctx=ctx)
    changed = any(r.changed for r in result.records)
    assert changed == expect_changed, f"{passes}: changed={changed}, expected {expect_changed}"
    if not expect_changed:
        assert result.ops_after == result.ops_before
    if structure is not None:
        structure(result.graph)
    again = mmcompile.optimize(result.graph, passes, ctx=ctx)
    assert not any(r.changed for r in again.records), f"{passes} is not idempotent"
    assert again.ops_after == result.ops_after
    inputs = random_inputs(graph, seed=seed)
    ref = run_onnxruntime(graph, inputs)
    got = run_onnxruntime(result.graph, inputs)
    for diff in compare_outputs(ref, got):
        assert diff.ok(atol, rtol), f"{passes}: {diff}"
    return result


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``mmcompile`` in-process; (exit code, stdout, stderr)."""
    from mmcompile.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    """stderr is exactly one ``mmcompile: error:`` line (no traceback) containing ``fragments``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mmcompile: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]
