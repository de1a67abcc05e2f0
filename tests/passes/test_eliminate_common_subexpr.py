"""eliminate-common-subexpr: equal nodes and equal small constants are merged, nothing else."""

import numpy as np
import pytest
from helpers import FLOAT, INT64, check_pass, make_graph
from onnx import TensorProto, helper

from mmcompile.passes.eliminate_common_subexpr import node_key

PASS = "eliminate-common-subexpr"
SHAPE = [2, 3, 4]
_node = helper.make_node


def _stats(result):
    return result.records[0].stats


def _graph(nodes, outputs=(("y", FLOAT, SHAPE),), init=None, inputs=(("x", FLOAT, SHAPE),)):
    return make_graph(nodes, list(inputs), list(outputs), init)


def test_merges_equal_nodes_and_the_chains_below_them():
    nodes = [_node("Relu", ["x"], ["r1"]), _node("Sigmoid", ["r1"], ["s1"]),
             _node("Relu", ["x"], ["r2"]), _node("Sigmoid", ["r2"], ["s2"]),
             _node("Sub", ["s1", "s2"], ["y"])]

    def structure(g):
        assert g.op_counts() == {"Relu": 1, "Sigmoid": 1, "Sub": 1}
        sub = next(n for n in g.gs.nodes if n.op == "Sub")
        assert sub.inputs[0] is sub.inputs[1]

    result = check_pass(_graph(nodes), PASS, expect_changed=True, structure=structure)
    assert _stats(result) == {"nodes_merged": 2, "constants_merged": 0}


def test_commutative_inputs_in_either_order():
    nodes = [_node("Add", ["x", "b"], ["a1"]), _node("Add", ["b", "x"], ["a2"]),
             _node("Sub", ["x", "b"], ["d1"]), _node("Sub", ["b", "x"], ["d2"]),
             _node("Sum", ["a1", "a2", "d1", "d2"], ["y"])]
    graph = _graph(nodes, inputs=[("x", FLOAT, SHAPE), ("b", FLOAT, SHAPE)])

    def structure(g):
        assert g.op_counts() == {"Add": 1, "Sub": 2, "Sum": 1}

    check_pass(graph, PASS, expect_changed=True, structure=structure)


def test_different_attributes_or_inputs_stay():
    nodes = [_node("LeakyRelu", ["x"], ["a"], alpha=0.1),
             _node("LeakyRelu", ["x"], ["b"], alpha=0.2),
             _node("Transpose", ["x"], ["t1"], perm=[0, 2, 1]),
             _node("Transpose", ["x"], ["t2"], perm=[2, 1, 0]),
             _node("ReduceSum", ["t1"], ["s1"], keepdims=0),
             _node("ReduceSum", ["t2"], ["s2"], keepdims=0),
             _node("Relu", ["a"], ["ra"]), _node("Relu", ["b"], ["rb"]),
             _node("Add", ["ra", "rb"], ["y"]), _node("Add", ["s1", "s2"], ["z"])]
    graph = _graph(nodes, outputs=[("y", FLOAT, SHAPE), ("z", FLOAT, [])])
    check_pass(graph, PASS, expect_changed=False)


def test_constant_nodes_compare_their_tensor_values():
    def constant(name, values, dtype=TensorProto.FLOAT):
        tensor = helper.make_tensor(name + "_value", dtype, [len(values)], values)
        return _node("Constant", [], [name], value=tensor)

    nodes = [constant("c1", [1.0, 2.0, 3.0, 4.0]), constant("c2", [1.0, 2.0, 3.0, 4.0]),
             constant("c3", [1.0, 2.0, 3.0, 5.0]), constant("c4", [0.0, 0.0, 0.0, -0.0]),
             constant("c5", [0.0, 0.0, 0.0, 0.0]),
             _node("Sum", ["x", "c1", "c2", "c3", "c4", "c5"], ["y"])]

    def structure(g):
        assert g.op_counts() == {"Constant": 4, "Sum": 1}
        sum_ = next(n for n in g.gs.nodes if n.op == "Sum")
        assert sum_.inputs[1] is sum_.inputs[2]

    result = check_pass(_graph(nodes), PASS, expect_changed=True, structure=structure)
    assert _stats(result) == {"nodes_merged": 1, "constants_merged": 0}


def test_equal_initializers_merge_and_then_their_readers():
    # The exporter idiom x.reshape(x.shape[0], -1), written twice with separately named constants.
    nodes = []
    for i in (1, 2):
        nodes += [_node("Shape", ["x"], [f"s{i}"]),
                  _node("Gather", [f"s{i}", f"zero{i}"], [f"b{i}"], axis=0),
                  _node("Concat", [f"b{i}", f"minus1_{i}"], [f"t{i}"], axis=0),
                  _node("Reshape", ["x", f"t{i}"], [f"y{i}"])]
    # Same bytes as each other, but a different shape or dtype: never merged.
    nodes += [_node("Add", ["y1", "y2"], ["y"]),
              _node("Cast", ["u"], ["uf"], to=FLOAT),
              _node("Add", ["w", "v"], ["wv"]), _node("Add", ["wv", "uf"], ["z"])]
    init = {"zero1": np.array([0], np.int64), "zero2": np.array([0], np.int64),
            "minus1_1": np.array([-1], np.int64), "minus1_2": np.array([-1], np.int64),
            "w": np.zeros((4, 1), np.float32), "v": np.zeros((1, 4), np.float32),
            "u": np.zeros((1, 4), np.int32)}
    graph = _graph(nodes, outputs=[("y", FLOAT, [2, 12]), ("z", FLOAT, [4, 4])], init=init)

    def structure(g):
        assert g.op_counts() == {"Shape": 1, "Gather": 1, "Concat": 1, "Reshape": 1, "Add": 3,
                                 "Cast": 1}

    result = check_pass(graph, PASS, expect_changed=True, structure=structure)
    assert _stats(result) == {"nodes_merged": 4, "constants_merged": 2}


def test_large_constants_are_not_compared():
    big = np.ones((600, 600), np.float32)  # 1.4 MB, over the 1 MiB default
    nodes = [_node("MatMul", ["x", "w1"], ["a"]),
             _node("MatMul", ["x", "w2"], ["b"]), _node("Add", ["a", "b"], ["y"])]
    graph = _graph(nodes, [("y", FLOAT, [1, 600])], {"w1": big, "w2": big.copy()},
                   inputs=[("x", FLOAT, [1, 600])])
    check_pass(graph, PASS, expect_changed=False, atol=1e-3)
    check_pass(graph, PASS + "{max_constant_bytes=2000000}", expect_changed=True, atol=1e-3)


@pytest.mark.parametrize("op", ["RandomUniformLike", "RandomNormalLike"])
def test_random_ops_stay(op):
    # Seeded, so that the numerical check is deterministic; merging would still be wrong.
    nodes = [_node(op, ["x"], ["r1"], seed=3.0),
             _node(op, ["x"], ["r2"], seed=3.0), _node("Add", ["r1", "r2"], ["y"])]
    check_pass(_graph(nodes), PASS, expect_changed=False)


def test_dropout_merges_only_in_inference():
    train = [_node("Dropout", ["x", "ratio", "on"], [f"t{i}"]) for i in (1, 2)]
    infer = [_node("Dropout", ["x", "ratio", "off"], [f"i{i}"]) for i in (1, 2)]
    nodes = train + infer + [_node("Sum", ["t1", "t2", "i1", "i2"], ["y"])]
    init = {"ratio": np.array(0.0, np.float32), "on": np.array(True), "off": np.array(False)}

    def structure(g):
        assert g.op_counts() == {"Dropout": 3, "Sum": 1}

    check_pass(_graph(nodes, init=init), PASS, expect_changed=True, structure=structure)


def test_nodes_with_subgraphs_stay():
    def branch(name, op):
        return helper.make_graph([_node(op, ["x"], [name])], name, [],
                                 [helper.make_tensor_value_info(name, FLOAT, SHAPE)])

    nodes = [_node("ReduceSum", ["x"], ["total"], keepdims=0),
             _node("Greater", ["total", "zero"], ["cond"])]
    for i in (1, 2):
        nodes.append(_node("If", ["cond"], [f"o{i}"], then_branch=branch(f"p{i}", "Relu"),
                                      else_branch=branch(f"n{i}", "Neg")))
    nodes.append(_node("Add", ["o1", "o2"], ["y"]))
    graph = _graph(nodes, init={"zero": np.array(0.0, np.float32)})
    check_pass(graph, PASS, expect_changed=False)
    # Not merely because the branches' tensor names differ: the key refuses subgraphs.
    if_node = next(n for n in graph.gs.nodes if n.op == "If")
    assert node_key(if_node, graph.opset, 1 << 20) is None


def test_readers_inside_subgraphs_follow_the_merge():
    def branch(name, op, source):
        return helper.make_graph([_node(op, [source], [name])], name, [],
                                 [helper.make_tensor_value_info(name, FLOAT, SHAPE)])

    nodes = [_node("Relu", ["x"], ["a"]), _node("Relu", ["x"], ["b"]),
             _node("ReduceSum", ["x"], ["total"], keepdims=0),
             _node("Greater", ["total", "zero"], ["cond"]),
             _node("If", ["cond"], ["o"], then_branch=branch("p", "Neg", "b"),
                   else_branch=branch("q", "Exp", "b")),
             _node("Add", ["o", "a"], ["y"])]
    graph = _graph(nodes, init={"zero": np.array(0.0, np.float32)})

    def structure(g):
        if_node = next(n for n in g.gs.nodes if n.op == "If")
        branches = (if_node.attrs["then_branch"], if_node.attrs["else_branch"])
        assert [b.nodes[0].inputs[0].name for b in branches] == ["a", "a"]

    check_pass(graph, PASS, expect_changed=True, structure=structure)

def test_a_duplicate_writing_a_graph_output_becomes_an_identity():
    nodes = [_node("Relu", ["x"], ["y1"]), _node("Relu", ["x"], ["y2"]),
             _node("Relu", ["x"], ["y3"]), _node("Exp", ["y1"], ["e1"]),
             _node("Exp", ["y2"], ["e2"]), _node("Add", ["e1", "e2"], ["z"])]
    outputs = [(name, FLOAT, SHAPE) for name in ("y1", "y2", "y3", "z")]
    graph = _graph(nodes, outputs)

    def structure(g):
        assert g.op_counts() == {"Relu": 1, "Identity": 2, "Exp": 1, "Add": 1}
        assert [t.name for t in g.gs.outputs] == ["y1", "y2", "y3", "z"]
        relu = next(n for n in g.gs.nodes if n.op == "Relu")
        for identity in (n for n in g.gs.nodes if n.op == "Identity"):
            assert identity.inputs[0] is relu.outputs[0]

    result = check_pass(graph, PASS, expect_changed=True, structure=structure)
    assert _stats(result) == {"nodes_merged": 3, "constants_merged": 0}


def test_identities_writing_graph_outputs_stay():
    nodes = [_node("Identity", ["x"], ["y1"]), _node("Identity", ["x"], ["y2"])]
    graph = _graph(nodes, [("y1", FLOAT, SHAPE), ("y2", FLOAT, SHAPE)])
    check_pass(graph, PASS, expect_changed=False)


def test_integer_graph():
    nodes = [_node("Shape", ["x"], ["s1"]), _node("Shape", ["x"], ["s2"]),
             _node("Mul", ["s1", "s2"], ["y"])]
    graph = _graph(nodes, [("y", INT64, [3])])
    result = check_pass(graph, PASS, expect_changed=True)
    assert result.graph.op_counts() == {"Shape": 1, "Mul": 1}


def test_real_exported_model_with_both_passes():
    torch = pytest.importorskip("torch")
    import mmcompile

    class Twice(torch.nn.Module):
        """The same GELU and LayerNorm on h and on a no-op reshape of h."""

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.norm = torch.nn.LayerNorm(8)

        def forward(self, x):
            h = self.proj(x)
            flat = h.reshape(h.shape[0], h.shape[1], -1)
            gelu = torch.nn.functional.gelu
            return self.norm(gelu(flat)) + self.norm(gelu(h))

    graph = mmcompile.trace(Twice(), (torch.randn(2, 3, 8),))
    before = graph.op_counts()

    def structure(g):
        assert "Reshape" not in g.op_counts()
        assert g.op_counts()["LayerNormalization"] == 1 < before["LayerNormalization"]
        assert [t.name for t in g.gs.outputs] == [t.name for t in graph.gs.outputs]

    result = check_pass(graph, "eliminate-identity,eliminate-common-subexpr", expect_changed=True,
                        structure=structure)
    identity, cse = (r.stats for r in result.records)
    assert identity["reshape"] == 1 and cse["nodes_merged"] > 0
