"""eliminate-dead-code: nodes no graph output depends on go; the signature stays."""

import numpy as np
from helpers import FLOAT, check_pass, make_graph
from onnx import helper

PASS = "eliminate-dead-code"
SHAPE = [2, 3]


def test_removes_a_dead_branch():
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("Neg", ["x"], ["dead1"]),
             helper.make_node("MatMul", ["dead1", "w"], ["dead2"]),
             helper.make_node("Exp", ["dead2"], ["dead3"])]
    graph = make_graph(nodes, [("x", FLOAT, SHAPE)], [("y", FLOAT, SHAPE)],
                       {"w": np.ones((3, 3), np.float32)})

    def structure(g):
        assert g.op_counts() == {"Relu": 1}
        assert "w" not in g.gs.tensors()

    result = check_pass(graph, PASS, expect_changed=True, structure=structure)
    assert result.records[0].stats == {"nodes_removed": 3}


def test_keeps_unused_graph_inputs():
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["unused"], ["dead"])]
    graph = make_graph(nodes, [("x", FLOAT, SHAPE), ("unused", FLOAT, SHAPE)],
                       [("y", FLOAT, SHAPE)])

    def structure(g):
        assert g.op_counts() == {"Relu": 1}
        assert [t.name for t in g.gs.inputs] == ["x", "unused"]

    check_pass(graph, PASS, expect_changed=True, structure=structure)


def test_nothing_dead_is_unchanged():
    # Split's second output is read by no one, but the node is live through its first.
    nodes = [helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1),
             helper.make_node("Relu", ["a"], ["y"]),
             helper.make_node("Identity", ["x"], ["z"])]
    graph = make_graph(nodes, [("x", FLOAT, SHAPE)], [("y", FLOAT, [2, 1]), ("z", FLOAT, SHAPE)],
                       {"sizes": np.array([1, 2], np.int64)})

    def structure(g):
        split = next(n for n in g.gs.nodes if n.op == "Split")
        assert [t.name for t in split.outputs] == ["a", "b"]
        assert [t.name for t in g.gs.outputs] == ["y", "z"]

    check_pass(graph, PASS, expect_changed=False, structure=structure)
