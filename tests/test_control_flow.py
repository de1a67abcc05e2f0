"""``If`` on the CPU target: folded when its condition is a constant (fold-constants), real
control flow (Relax ``If``: both branches compiled, one run) when it is only known at run
time, the fallback when a branch holds what TVM cannot lower."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FLOAT, make_graph
from onnx import TensorProto, helper

import mmcompile
from mmcompile.reference import run_onnxruntime


def _run_time_if(else_op: str = "Mul", nested: bool = False):
    """``If(sum(x) > 0)`` choosing between two branches over outer-scope tensors ``a`` and
    ``b``; two outputs."""
    then_nodes = [helper.make_node("Add", ["a", "b"], ["t0"], name="t_add"),
                  helper.make_node("Sub", ["a", "b"], ["t1" if not nested else "d"],
                                   name="t_sub")]
    if nested:  # an If inside the branch whose branches give outputs of different ranks
        inner_then = helper.make_graph(
            [helper.make_node("Identity", ["a"], ["it"], name="it_id")], "inner_then", [],
            [helper.make_tensor_value_info("it", TensorProto.FLOAT, None)])
        inner_else = helper.make_graph(
            [helper.make_node("ReduceSum", ["a"], ["ie"], keepdims=0, name="ie_sum")],
            "inner_else", [], [helper.make_tensor_value_info("ie", TensorProto.FLOAT, None)])
        then_nodes += [helper.make_node("If", ["c"], ["t2"], then_branch=inner_then,
                                        else_branch=inner_else, name="t_if"),
                       helper.make_node("Add", ["d", "t2"], ["t1"], name="t_add2")]
    then_graph = helper.make_graph(
        then_nodes, "then", [],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("t0", "t1")])
    else_graph = helper.make_graph(
        [helper.make_node(else_op, ["a", "b"] if else_op == "Mul" else ["a"], ["e0"],
                          name="e_op"),
         helper.make_node("Neg", ["b"], ["e1"], name="e_neg")], "else", [],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("e0", "e1")])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Sigmoid", ["x"], ["b"], name="sigmoid"),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="greater"),
             helper.make_node("If", ["c"], ["y0", "y1"], then_branch=then_graph,
                              else_branch=else_graph, name="if0"),
             helper.make_node("Add", ["y0", "y1"], ["out"], name="add")]
    return make_graph(nodes, [("x", FLOAT, [2, 4])], [("out", FLOAT, [2, 4])],
                      {"zero": np.array(0.0, np.float32)})


def test_a_run_time_if_is_native_control_flow_and_both_branches_are_right():
    graph = _run_time_if()
    compiled = mmcompile.compile(graph, verify=False, fallback=None)
    assert [s.target for s in compiled.stages] == ["cpu"]
    taken = set()
    for seed in range(6):
        x = np.random.default_rng(seed).standard_normal((2, 4)).astype(np.float32) + \
            (2.0 if seed % 2 else -2.0)
        taken.add(bool(x.sum() > 0))
        np.testing.assert_allclose(compiled.run({"x": x})["out"],
                                   run_onnxruntime(graph, {"x": x})["out"], rtol=1e-6,
                                   atol=1e-6)
    assert taken == {True, False}


@pytest.mark.parametrize("kind, reason", [("Celu", "'e_op' (Celu)"),
                                          ("nested", "outputs of different types")])
def test_an_if_tvm_cannot_lower_falls_back_with_its_reason(kind, reason):
    graph = _run_time_if(else_op="Celu" if kind == "Celu" else "Mul", nested=kind == "nested")
    compiled = mmcompile.compile(graph, verify=True, tolerance=1e-6)
    fell_back = compiled.fallback_nodes()
    assert list(fell_back) == ["if0"] and reason in fell_back["if0"]


def test_channel_counts_that_fill_only_narrower_vectors_still_get_the_blocked_rules():
    # 200 output channels: not a multiple of 16 AVX-512 lanes, a multiple of 8. The rules
    # used to decline and dlight's generic reduction rule took the kernel (130 ms where the
    # blocked rule takes ~5).
    from tvm import te, topi

    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    from mmcompile.targets.tvm.host import llvm_target
    data = te.placeholder((1, 20, 96, 59), name="x")
    weight = te.placeholder((96, 3, 20, 200), name="w")  # HWIO
    conv = topi.nn.conv(data, weight, 1, (0, 1), 1, 1, "NCHW", "HWIO")
    func = te.create_prim_func([data, weight, conv])
    target = llvm_target("skylake-avx512", 2)
    assert BlockedMatmul._schedule(func, 16) is None  # whole 16-lane vectors do not fit
    with target:
        sch = BlockedMatmul().apply(func, target, False)
    assert sch is not None
    assert any(inst.kind.name == "Vectorize" for inst in sch.trace.insts)
