"""``Loop`` and ``Scan`` on the CPU target (targets/tvm/unroll.py): unrolled when their
iteration counts are compile-time constants, refused with the reason otherwise (and then run
by the fallback target)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FLOAT, make_graph
from onnx import TensorProto, helper

import mmcompile
from mmcompile.errors import UnsupportedOpError
from mmcompile.reference import run_onnxruntime

STEPS, FEATURES, HIDDEN = 5, 3, 6


def _weights():
    rng = np.random.default_rng(0)
    return {"w": rng.standard_normal((FEATURES, HIDDEN)).astype(np.float32),
            "u": (0.5 * rng.standard_normal((HIDDEN, HIDDEN))).astype(np.float32),
            "k": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "axis0": np.array([0], np.int64), "two": np.array(2, np.int64),
            "zero": np.array(0, np.int64)}


def _cell(x_t: str, h_in: str, h_out: str, tag: str) -> list:
    """``h_out = tanh(x_t W + h_in U)`` for ``x_t [1, FEATURES]``."""
    return [helper.make_node("MatMul", [x_t, "w"], [f"{tag}_xw"], name=f"{tag}_xw"),
            helper.make_node("MatMul", [h_in, "u"], [f"{tag}_hu"], name=f"{tag}_hu"),
            helper.make_node("Add", [f"{tag}_xw", f"{tag}_hu"], [f"{tag}_a"], name=f"{tag}_add"),
            helper.make_node("Tanh", [f"{tag}_a"], [h_out], name=f"{tag}_tanh")]


def _image_branch() -> list:
    """The image modality: conv -> global pool -> [1, 4]."""
    return [helper.make_node("Conv", ["image", "k"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
            helper.make_node("Flatten", ["g"], ["pooled"], name="flatten")]


def _two_modalities(sequence_nodes: list, hidden: str, states: list[int],
                    extra_inputs=()) -> mmcompile.Graph:
    """An image branch and a recurrent sequence branch (``sequence_nodes``, ending in
    ``hidden [1, HIDDEN]`` and ``states``), concatenated."""
    nodes = [*_image_branch(), *sequence_nodes,
             helper.make_node("Concat", ["pooled", hidden], ["fused"], axis=1, name="fuse")]
    return make_graph(nodes, [("image", FLOAT, [1, 3, 8, 8]), ("x", FLOAT, [STEPS, FEATURES]),
                              ("h0", FLOAT, [1, HIDDEN]), *extra_inputs],
                      [("fused", FLOAT, [1, 4 + HIDDEN]), ("states", FLOAT, states)],
                      _weights(), modalities={"image": "image", "x": "text"})


def _loop_graph(condition: str = "pass", runtime_count: bool = False) -> mmcompile.Graph:
    """A TorchScript-style ``for t in range(x.size(0))`` Loop: the trip count comes from
    ``Shape(x)`` (folds once shapes are fixed), ``h`` is carried, every ``h`` is a scan output.
    ``condition``: "pass" (the body passes its condition through), "computed" (it stops
    after two iterations: an early exit)."""
    body_nodes = [helper.make_node("Gather", ["x", "i"], ["x_row"], axis=0, name="row"),
                  helper.make_node("Unsqueeze", ["x_row", "axis0"], ["x_t"], name="unsq"),
                  *_cell("x_t", "h_in", "h_out", "body"),
                  helper.make_node("Identity", ["h_out"], ["h_scan"], name="scan_id")]
    if condition == "pass":
        body_nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond"))
    else:
        body_nodes.append(helper.make_node("Less", ["i", "two"], ["cond_out"], name="cond"))
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, HIDDEN])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         *(helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, HIDDEN])
           for n in ("h_out", "h_scan"))])
    count = [] if runtime_count else [
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Gather", ["x_shape", "zero"], ["steps"], axis=0, name="steps")]
    nodes = [*count, helper.make_node("Loop", ["steps", "", "h0"], ["h_last", "states"],
                                      body=body, name="loop")]
    return _two_modalities(nodes, "h_last", [STEPS, 1, HIDDEN],
                           [("steps", TensorProto.INT64, [])] if runtime_count else [])


def _scan_graph() -> mmcompile.Graph:
    """The same recurrence as a ``Scan`` over ``x`` backwards, its per-step states stacked
    along axis 1 (``[1, STEPS, HIDDEN]``)."""
    body = helper.make_graph(
        [helper.make_node("Unsqueeze", ["x_row", "axis0"], ["x_t"], name="unsq"),
         *_cell("x_t", "h_in", "h_out", "body"),
         helper.make_node("Identity", ["h_out"], ["h_scan"], name="scan_id")], "body",
        [helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, HIDDEN]),
         helper.make_tensor_value_info("x_row", TensorProto.FLOAT, [FEATURES])],
        [helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, HIDDEN]),
         helper.make_tensor_value_info("h_scan", TensorProto.FLOAT, [1, HIDDEN])])
    scan = helper.make_node("Scan", ["h0", "x"], ["h_last", "states"], body=body,
                            num_scan_inputs=1, scan_input_directions=[1],
                            scan_output_axes=[1], name="scan")
    return _two_modalities([scan], "h_last", [1, STEPS, HIDDEN])


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
            "x": rng.standard_normal((STEPS, FEATURES)).astype(np.float32),
            "h0": rng.standard_normal((1, HIDDEN)).astype(np.float32)}


@pytest.mark.parametrize("make", [_loop_graph, _scan_graph], ids=["loop", "scan"])
def test_loops_with_constant_counts_are_unrolled_on_the_cpu_target(make):
    graph = make()
    compiled = mmcompile.compile(graph, verify=False, fallback=None)
    assert {s.target for s in compiled.stages} == {"cpu"} and not compiled.fallback_nodes()
    for seed in range(2):
        feeds = _feeds(seed)
        got, want = compiled.run(feeds), run_onnxruntime(graph, feeds)
        assert want["states"].shape == ((STEPS, 1, HIDDEN) if make is _loop_graph
                                        else (1, STEPS, HIDDEN))
        for name in ("fused", "states"):  # float32 sums of a few products: 1e-5
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
        assert np.abs(want["states"]).max() > 0.3


def test_the_legalize_pass_writes_the_iterations_out():
    import mmcompile.targets.tvm.legalize  # noqa: F401  (registers the pass)
    from mmcompile.optimize import optimize
    graph = optimize(_loop_graph()).graph  # the trip count folds to a constant
    loop = next(n for n in graph.gs.nodes if n.op == "Loop")
    assert loop.inputs[0].values == STEPS
    result = optimize(graph, "legalize-for-tvm")
    ops = [n.op for n in result.graph.gs.nodes]
    assert "Loop" not in ops and ops.count("Tanh") == STEPS  # one cell per iteration
    assert result.records[0].stats["loops_unrolled"] == 1


@pytest.mark.parametrize("kwargs, reason", [
    ({"condition": "computed"}, "early exit"),
    ({"runtime_count": True}, "trip count is not a compile-time constant"),
])
def test_loops_that_cannot_be_unrolled_are_refused_with_the_reason(kwargs, reason):
    graph = _loop_graph(**kwargs)
    extra = {"steps": np.array(STEPS, np.int64)} if kwargs.get("runtime_count") else {}
    with pytest.raises(UnsupportedOpError, match=reason):
        mmcompile.compile(graph, verify=False, fallback=None)
    compiled = mmcompile.compile(graph, verify=False)  # the fallback target runs the loop
    assert reason in compiled.fallback_nodes()["loop"]
    feeds = {**_feeds(), **extra}
    np.testing.assert_allclose(compiled.run(feeds)["fused"],
                               run_onnxruntime(graph, feeds)["fused"], rtol=1e-5, atol=1e-5)


def test_a_stage_input_of_unknown_shape_is_a_clear_error():
    # e.g. the output of an op on the fallback target whose shape inference cannot tell:
    # TVM imports no tensor of unknown rank (it failed with an assertion deep in lowering)
    import onnx_graphsurgeon as gs

    from mmcompile.ir import Graph
    from mmcompile.target import CompileOptions, TargetError
    from mmcompile.targets.tvm.target import TVMCpuTarget
    a = gs.Variable("a", dtype=np.float32, shape=None)
    b = gs.Variable("b", dtype=np.float32, shape=None)
    stage = Graph(gs.Graph(nodes=[gs.Node("Relu", inputs=[a], outputs=[b])], inputs=[a],
                           outputs=[b], opset=18), {}, name="stage1")
    with pytest.raises(TargetError, match="'a' of stage stage1 have no known shape"):
        TVMCpuTarget().compile(stage, CompileOptions())
