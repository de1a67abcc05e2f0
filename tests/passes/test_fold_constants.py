"""fold-constants: shape arithmetic and constant subgraphs become initializers."""

import numpy as np
import pytest
from helpers import FLOAT, check_pass, make_graph
from onnx import TensorProto, helper


def _reshape_by_shape_graph():
    # The exporter idiom: y = x.reshape(x.shape[0], -1) computed with Shape/Gather/Concat.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
        helper.make_node("Concat", ["b1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
        helper.make_node("Add", ["w", "w"], ["w2"]),  # a constant subgraph
        helper.make_node("Mul", ["y", "w2"], ["z"]),
    ]
    init = {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64),
            "minus1": np.array([-1], np.int64), "w": np.ones((1, 12), np.float32)}
    return make_graph(nodes, [("x", FLOAT, [2, 3, 4])], [("z", FLOAT, [2, 12])], init)


def test_folds_shape_arithmetic_into_constant_reshape_target():
    def structure(g):
        assert g.op_counts() == {"Reshape": 1, "Mul": 1}
        reshape = next(n for n in g.gs.nodes if n.op == "Reshape")
        assert list(reshape.inputs[1].values) == [2, -1] or list(reshape.inputs[1].values) == [2, 12]

    result = check_pass(_reshape_by_shape_graph(), "fold-constants", expect_changed=True,
                        structure=structure)
    assert result.records[0].stats["nodes_folded"] == 5


def test_leaves_dynamic_shapes_alone():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Reshape", ["x", "s"], ["y"])]
    g = make_graph(nodes, [("x", FLOAT, ["n", 3])], [("y", FLOAT, ["n", 3])])
    check_pass(g, "fold-constants", expect_changed=False)


def _if_on(cond, then_outputs=2):
    """``If(cond)`` with two outputs, over ``a = exp(x)`` read from the outer graph; the
    ``then`` branch computes the second output with an Identity of an outer tensor (what
    exporters write to return it unchanged)."""
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["t0"], name="t_relu"),
         helper.make_node("Identity", ["a"], ["t1"], name="t_pass")], "then", [],
        [helper.make_tensor_value_info(n, FLOAT, [2, 3]) for n in ("t0", "t1")])
    else_graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["a"], ["e0"], name="e_sig"),
         helper.make_node("Abs", ["a"], ["e1"], name="e_abs")], "else", [],
        [helper.make_tensor_value_info(n, FLOAT, [2, 3]) for n in ("e0", "e1")])
    nodes = [helper.make_node("Exp", ["x"], ["a"], name="exp"),
             helper.make_node("If", ["cond"], ["y0", "y1"], then_branch=then_graph,
                              else_branch=else_graph, name="if0"),
             helper.make_node("Add", ["y0", "y1"], ["out"], name="add")]
    inputs = [("x", FLOAT, [2, 3])]
    inits = {}
    if cond is None:  # known at run time only
        inputs.append(("cond", TensorProto.BOOL, []))
    else:
        inits["cond"] = np.array(cond)
    return make_graph(nodes, inputs, [("out", FLOAT, [2, 3])], inits)


@pytest.mark.parametrize("cond", [True, False])
def test_an_if_on_a_constant_condition_becomes_the_branch_it_takes(cond):
    # gs's own flattening unbound the If's outputs while iterating over them: the second
    # output lost its producer (Silero VAD's nested Ifs came out invalid)
    def structure(g):
        assert "If" not in g.op_counts()
        g.verify()  # every tensor produced, onnx.checker full check

    result = check_pass(_if_on(cond), "fold-constants,eliminate-dead-code", expect_changed=True,
                        structure=structure)
    assert result.records[0].stats["ifs_flattened"] == 1


def test_an_if_on_a_run_time_condition_is_left_alone():
    check_pass(_if_on(None), "fold-constants", expect_changed=False,
               structure=lambda g: g.op_counts()["If"] == 1)


def test_constants_around_a_loop_fold_and_the_loop_stays():
    # Range's function body: the trip count is Ceil((limit - start) / delta) of constants,
    # the Loop adds delta. gs hands onnxruntime a Loop body it rejects, and that one failed
    # evaluation used to leave every constant of the graph unfolded, the trip count included.
    import onnx

    import mmcompile
    body = onnx.defs.get_schema("Range", 11).function_body
    init = {"start": np.array(1.0, np.float32), "limit": np.array(5.0, np.float32),
            "delta": np.array(2.0, np.float32)}
    nodes = list(body.node) + [helper.make_node("Add", ["output", "x"], ["y"])]
    g = make_graph(nodes, [("x", FLOAT, [2])], [("y", FLOAT, [2])], init)

    def structure(g):
        assert set(g.op_counts()) == {"Loop", "Add"}
        (loop,) = [n for n in g.gs.nodes if n.op == "Loop"]
        assert int(loop.inputs[0].values) == 2  # the trip count, folded

    check_pass(g, "fold-constants", expect_changed=True, structure=structure)
    x = np.array([10, 20], np.float32)
    got = mmcompile.compile(g.to_onnx(), {"x": x}, target="cpu", verify=False,
                            fallback=None).run({"x": x})["y"]
    np.testing.assert_array_equal(got, np.arange(1, 5, 2, dtype=np.float32) + x)
