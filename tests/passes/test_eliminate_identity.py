"""eliminate-identity: no-op nodes are removed, anything that changes values or shapes stays."""

import numpy as np
import pytest
from helpers import FLOAT, check_pass, make_graph
from onnx import TensorProto, helper

PASS = "eliminate-identity"
SHAPE = [2, 3, 4]
I64 = np.iinfo(np.int64).max
_node = helper.make_node


def _i64(*values):
    return np.array(values, np.int64)


def _zeros(*shape):
    return np.zeros(shape, np.float32)


def _ones(*shape):
    return np.ones(shape, np.float32)


def _around(node, init=None, in_shape=SHAPE, out_shape=SHAPE, out_type=FLOAT):
    """x -> Relu -> r -> node -> o -> Neg -> y: the node under test sits between two others."""
    nodes = [_node("Relu", ["x"], ["r"]), node,
             _node("Neg", [node.output[0]], ["y"])]
    return make_graph(nodes, [("x", FLOAT, in_shape)], [("y", out_type, out_shape)], init)


# (id, node, initializers, input shape, output shape, kind removed or None if it must stay)
CASES = [
    ("identity", _node("Identity", ["r"], ["o"]), {}, SHAPE, SHAPE, "identity"),
    ("dropout", _node("Dropout", ["r"], ["o"]), {}, SHAPE, SHAPE, "dropout"),
    ("dropout-train-false", _node("Dropout", ["r", "ratio", "train"], ["o"]),
     {"ratio": np.array(0.5, np.float32), "train": np.array(False)}, SHAPE, SHAPE, "dropout"),
    ("dropout-training", _node("Dropout", ["r", "ratio", "train"], ["o"]),
     {"ratio": np.array(0.0, np.float32), "train": np.array(True)}, SHAPE, SHAPE, None),
    ("cast-same", _node("Cast", ["r"], ["o"], to=FLOAT), {}, SHAPE, SHAPE, "cast"),
    ("reshape-same", _node("Reshape", ["r", "s"], ["o"]), {"s": _i64(2, 3, 4)},
     SHAPE, SHAPE, "reshape"),
    ("reshape-zero-minus1", _node("Reshape", ["r", "s"], ["o"]), {"s": _i64(0, 3, -1)},
     SHAPE, SHAPE, "reshape"),
    ("reshape-symbolic", _node("Reshape", ["r", "s"], ["o"]), {"s": _i64(-1, 3, 4)},
     ["n", 3, 4], ["n", 3, 4], "reshape"),
    ("reshape-allowzero", _node("Reshape", ["r", "s"], ["o"], allowzero=1),
     {"s": _i64(2, -1, 4)}, SHAPE, SHAPE, "reshape"),
    ("reshape-changes", _node("Reshape", ["r", "s"], ["o"]), {"s": _i64(2, 12)},
     SHAPE, [2, 12], None),
    ("transpose-identity", _node("Transpose", ["r"], ["o"], perm=[0, 1, 2]), {},
     SHAPE, SHAPE, "transpose"),
    ("transpose-swaps", _node("Transpose", ["r"], ["o"], perm=[0, 2, 1]), {},
     SHAPE, [2, 4, 3], None),
    ("expand-ones", _node("Expand", ["r", "s"], ["o"]), {"s": _i64(1, 3, 1)},
     SHAPE, SHAPE, "expand"),
    ("expand-suffix", _node("Expand", ["r", "s"], ["o"]), {"s": _i64(3, 4)},
     SHAPE, SHAPE, "expand"),
    ("expand-symbolic-unknown", _node("Expand", ["r", "s"], ["o"]),
     {"s": _i64(2, 1, 1)}, ["n", 3, 4], [2, 3, 4], None),
    ("expand-grows", _node("Expand", ["r", "s"], ["o"]), {"s": _i64(2, 2, 3, 4)},
     SHAPE, [2, 2, 3, 4], None),
    ("squeeze-nothing", _node("Squeeze", ["r"], ["o"]), {}, SHAPE, SHAPE, "squeeze"),
    ("squeeze-empty-axes", _node("Squeeze", ["r", "a"], ["o"]), {"a": _i64()},
     SHAPE, SHAPE, "squeeze"),
    ("squeeze-ones", _node("Squeeze", ["r"], ["o"]), {}, [2, 1, 4], [2, 4], None),
    ("unsqueeze-empty", _node("Unsqueeze", ["r", "a"], ["o"]), {"a": _i64()},
     SHAPE, SHAPE, "unsqueeze"),
    ("unsqueeze-axis", _node("Unsqueeze", ["r", "a"], ["o"]), {"a": _i64(0)},
     SHAPE, [1, 2, 3, 4], None),
    ("concat-one", _node("Concat", ["r"], ["o"], axis=1), {}, SHAPE, SHAPE, "concat"),
    ("concat-two", _node("Concat", ["r", "r"], ["o"], axis=1), {}, SHAPE, [2, 6, 4],
     None),
    ("sum-one", _node("Sum", ["r"], ["o"]), {}, SHAPE, SHAPE, "sum"),
    ("max-one", _node("Max", ["r"], ["o"]), {}, SHAPE, SHAPE, "max"),
    ("min-one", _node("Min", ["r"], ["o"]), {}, SHAPE, SHAPE, "min"),
    ("add-zeros", _node("Add", ["r", "z"], ["o"]), {"z": _zeros(4)}, SHAPE, SHAPE,
     "add"),
    ("add-zeros-left", _node("Add", ["z", "r"], ["o"]), {"z": _zeros(1, 3, 1)},
     SHAPE, SHAPE, "add"),
    ("add-zeros-broadcasts", _node("Add", ["r", "z"], ["o"]), {"z": _zeros(2, 2, 3, 4)},
     SHAPE, [2, 2, 3, 4], None),
    ("add-tiny", _node("Add", ["r", "z"], ["o"]), {"z": np.full(4, 1e-8, np.float32)},
     SHAPE, SHAPE, None),
    ("sub-zeros", _node("Sub", ["r", "z"], ["o"]), {"z": _zeros(1)}, SHAPE, SHAPE,
     "sub"),
    ("zeros-sub", _node("Sub", ["z", "r"], ["o"]), {"z": _zeros(1)}, SHAPE, SHAPE,
     None),
    ("mul-ones", _node("Mul", ["w", "r"], ["o"]), {"w": _ones(3, 4)}, SHAPE, SHAPE,
     "mul"),
    ("mul-ones-broadcasts", _node("Mul", ["r", "w"], ["o"]), {"w": _ones(5, 1, 1, 1)},
     SHAPE, [5, 2, 3, 4], None),
    ("mul-almost-one", _node("Mul", ["r", "w"], ["o"]),
     {"w": np.full(1, 1.00001, np.float32)}, SHAPE, SHAPE, None),
    ("div-ones", _node("Div", ["r", "w"], ["o"]), {"w": _ones(1)}, SHAPE, SHAPE, "div"),
    ("div-two", _node("Div", ["r", "w"], ["o"]), {"w": 2 * _ones(1)}, SHAPE, SHAPE,
     None),
    ("slice-all", _node("Slice", ["r", "st", "en", "ax"], ["o"]),
     {"st": _i64(0, -9), "en": _i64(I64, 4), "ax": _i64(1, -1)}, SHAPE, SHAPE, "slice"),
    ("slice-symbolic", _node("Slice", ["r", "st", "en"], ["o"]),
     {"st": _i64(0), "en": _i64(I64)}, ["n", 3, 4], ["n", 3, 4], "slice"),
    ("slice-part", _node("Slice", ["r", "st", "en", "ax"], ["o"]),
     {"st": _i64(0), "en": _i64(2), "ax": _i64(1)}, SHAPE, [2, 2, 4], None),
    ("slice-reversed", _node("Slice", ["r", "st", "en", "ax", "sp"], ["o"]),
     {"st": _i64(-1), "en": _i64(-I64), "ax": _i64(1), "sp": _i64(-1)}, SHAPE, SHAPE, None),
    ("pad-zeros", _node("Pad", ["r", "p"], ["o"], mode="reflect"), {"p": _i64(*[0] * 6)},
     SHAPE, SHAPE, "pad"),
    ("pad-some", _node("Pad", ["r", "p"], ["o"]), {"p": _i64(0, 0, 1, 0, 0, 1)},
     SHAPE, [2, 3, 6], None),
]


@pytest.mark.parametrize("node,init,in_shape,out_shape,kind", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_each_kind(node, init, in_shape, out_shape, kind):
    graph = _around(node, init, in_shape, out_shape)

    def structure(g):
        expected = {"Relu": 1, "Neg": 1} if kind else {"Relu": 1, "Neg": 1, node.op_type: 1}
        assert g.op_counts() == expected
        neg = next(n for n in g.gs.nodes if n.op == "Neg")
        assert (neg.inputs[0].name == "r") == bool(kind)

    result = check_pass(graph, PASS, expect_changed=kind is not None, structure=structure)
    if kind:
        assert result.records[0].stats == {"nodes_removed": 1, kind: 1}


def test_cast_to_another_dtype_stays():
    graph = _around(_node("Cast", ["r"], ["o"], to=TensorProto.DOUBLE),
                    out_type=TensorProto.DOUBLE)
    check_pass(graph, PASS, expect_changed=False)


def test_dropout_whose_mask_is_read_stays():
    nodes = [_node("Dropout", ["x"], ["d", "mask"]),
             _node("Relu", ["d"], ["y"])]
    graph = make_graph(nodes, [("x", FLOAT, SHAPE)],
                       [("y", FLOAT, SHAPE), ("mask", TensorProto.BOOL, SHAPE)])
    check_pass(graph, PASS, expect_changed=False)


def test_chain_ending_in_a_graph_output_lets_the_producer_write_it():
    nodes = [_node("Relu", ["x"], ["r"]),
             _node("Identity", ["r"], ["a"]),
             _node("Cast", ["a"], ["b"], to=FLOAT),
             _node("Mul", ["b", "one"], ["y"])]
    graph = make_graph(nodes, [("x", FLOAT, SHAPE)], [("y", FLOAT, SHAPE)], {"one": _ones(1)})

    def structure(g):
        assert g.op_counts() == {"Relu": 1}
        assert [t.name for t in g.gs.outputs] == ["y"]
        assert g.gs.outputs[0].inputs[0].op == "Relu"

    result = check_pass(graph, PASS, expect_changed=True, structure=structure)
    assert result.records[0].stats == {"nodes_removed": 3, "cast": 1, "identity": 1, "mul": 1}


@pytest.mark.parametrize("case", ["graph-input", "read-elsewhere", "input-is-output",
                                  "initializer"])
def test_graph_output_names_are_kept(case):
    # Each time, the Identity writes graph output y and its input cannot take y's place.
    nodes = [_node("Identity", ["x"], ["y"])]
    outputs = [("y", FLOAT, SHAPE)]
    init = {}
    if case == "read-elsewhere":
        nodes = [_node("Relu", ["x"], ["r"]), _node("Identity", ["r"], ["y"]),
                 _node("Neg", ["r"], ["z"])]
        outputs.append(("z", FLOAT, SHAPE))
    elif case == "input-is-output":
        nodes = [_node("Relu", ["x"], ["r"]), _node("Identity", ["r"], ["y"])]
        outputs.append(("r", FLOAT, SHAPE))
    elif case == "initializer":
        nodes = [_node("Identity", ["w"], ["y"]), _node("Neg", ["x"], ["z"])]
        outputs.append(("z", FLOAT, SHAPE))
        init = {"w": _ones(*SHAPE)}
    graph = make_graph(nodes, [("x", FLOAT, SHAPE)], outputs, init)

    def structure(g):
        assert [t.name for t in g.gs.outputs] == [name for name, _, _ in outputs]
        assert [t.name for t in g.gs.inputs] == ["x"]

    check_pass(graph, PASS, expect_changed=False, structure=structure)


def test_identity_of_an_initializer_is_bypassed():
    nodes = [_node("Identity", ["w"], ["w1"]), _node("Add", ["x", "w1"], ["y"])]
    graph = make_graph(nodes, [("x", FLOAT, SHAPE)], [("y", FLOAT, SHAPE)], {"w": _ones(4)})

    def structure(g):
        assert g.op_counts() == {"Add": 1}
        assert g.gs.nodes[0].inputs[1].name == "w"

    check_pass(graph, PASS, expect_changed=True, structure=structure)


def test_integer_reshape_of_a_shape_tensor():
    nodes = [_node("Shape", ["x"], ["s"]),
             _node("Reshape", ["s", "t"], ["s2"]),
             _node("Reshape", ["x", "s2"], ["y"])]
    graph = make_graph(nodes, [("x", FLOAT, SHAPE)], [("y", FLOAT, SHAPE)], {"t": _i64(-1)})
    result = check_pass(graph, PASS, expect_changed=True)
    assert result.graph.op_counts() == {"Shape": 1, "Reshape": 1}


def test_readers_inside_subgraphs_read_the_input():
    then = helper.make_graph([_node("Neg", ["a"], ["p"])], "then", [],
                             [helper.make_tensor_value_info("p", FLOAT, SHAPE)])
    other = helper.make_graph([_node("Exp", ["a"], ["q"])], "else", [],
                              [helper.make_tensor_value_info("q", FLOAT, SHAPE)])
    nodes = [_node("Relu", ["x"], ["r"]), _node("Identity", ["r"], ["a"]),
             _node("ReduceSum", ["x"], ["total"], keepdims=0),
             _node("Greater", ["total", "zero"], ["cond"]),
             _node("If", ["cond"], ["y"], then_branch=then, else_branch=other)]
    graph = make_graph(nodes, [("x", FLOAT, SHAPE)], [("y", FLOAT, SHAPE)],
                       {"zero": np.array(0.0, np.float32)})

    def structure(g):
        if_node = next(n for n in g.gs.nodes if n.op == "If")
        assert "Identity" not in g.op_counts()
        assert if_node.attrs["then_branch"].nodes[0].inputs[0].name == "r"

    check_pass(graph, PASS, expect_changed=True, structure=structure)


# The run on a real exported model (both passes) is in test_eliminate_common_subexpr.py.
