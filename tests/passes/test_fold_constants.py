"""fold-constants: shape arithmetic and constant subgraphs become initializers."""

import numpy as np
from helpers import FLOAT, check_pass, make_graph
from onnx import helper


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
