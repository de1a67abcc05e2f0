"""The shared pattern-rewrite driver: matching rules and splicing in replacements."""

import numpy as np
import onnx_graphsurgeon as gs
from helpers import FLOAT, make_graph
from onnx import helper

from mmcompile.reference import random_inputs, run_onnxruntime
from mmcompile.transform.rewrite import RewriteRule, apply_rules, const, match, op, var


def _identity_of(name):
    return lambda m, g: [gs.Node("Identity", inputs=[m[name]], outputs=m.outputs)]


DOUBLE_NEG = RewriteRule("double-neg", op("Neg", op("Neg", var("x"))), _identity_of("x"))


def _swish(**kwargs):
    x = var("x")
    return RewriteRule("swish", op("Mul", x, op("Sigmoid", x), **kwargs),
                       lambda m, g: [gs.Node("Swish", domain="com.example", inputs=[m["x"]],
                                             outputs=m.outputs)])


def _neg_chain(length, extra_outputs=(), extra_nodes=()):
    """t0 -> Neg -> t1 -> ... -> Neg -> t<length>."""
    nodes = [helper.make_node("Neg", [f"t{i}"], [f"t{i + 1}"]) for i in range(length)]
    outputs = [(f"t{length}", FLOAT, [2, 3])] + [(o, FLOAT, [2, 3]) for o in extra_outputs]
    return make_graph(nodes + list(extra_nodes), [("t0", FLOAT, [2, 3])], outputs)


def _same_outputs(before, after):
    inputs = random_inputs(before, seed=0)
    ref, got = run_onnxruntime(before, inputs), run_onnxruntime(after, inputs)
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_array_equal(ref[name], got[name])


def test_rule_rewrites_double_negation():
    graph = _neg_chain(2, extra_outputs=["r"],
                       extra_nodes=[helper.make_node("Relu", ["t2"], ["r"])])
    original = graph.copy()
    counts = apply_rules(graph, [DOUBLE_NEG])
    assert counts == {"double-neg": 1}
    assert graph.op_counts() == {"Identity": 1, "Relu": 1}
    identity = next(n for n in graph.gs.nodes if n.op == "Identity")
    assert identity.inputs[0].name == "t0" and identity.outputs[0].name == "t2"
    assert identity.name.startswith("double-neg/Identity")
    graph.verify()
    _same_outputs(original, graph)


def test_rewritten_nodes_are_not_matched_again():
    graph = _neg_chain(4)
    original = graph.copy()
    assert apply_rules(graph, [DOUBLE_NEG]) == {"double-neg": 2}
    assert graph.op_counts() == {"Identity": 2}
    graph.verify()
    _same_outputs(original, graph)


def test_no_match_leaves_graph_untouched():
    graph = _neg_chain(1, extra_outputs=["r"],
                       extra_nodes=[helper.make_node("Relu", ["t1"], ["r"])])
    nodes = list(graph.gs.nodes)
    assert apply_rules(graph, [DOUBLE_NEG]) == {}
    assert graph.gs.nodes == nodes


def _swish_graph(second_order):
    nodes = [helper.make_node("Sigmoid", ["a"], ["sa"]),
             helper.make_node("Mul", ["a", "sa"], ["p"]),
             helper.make_node("Sigmoid", ["b"], ["sb"]),
             helper.make_node("Mul", second_order, ["q"])]
    return make_graph(nodes, [("a", FLOAT, [3]), ("b", FLOAT, [3])],
                      [("p", FLOAT, [3]), ("q", FLOAT, [3])])


def test_commutative_matching_finds_both_input_orders():
    graph = _swish_graph(["sb", "b"])
    assert apply_rules(graph, [_swish()]) == {"swish": 2}
    assert graph.op_counts() == {"com.example::Swish": 2}
    wiring = {n.outputs[0].name: n.inputs[0].name for n in graph.gs.nodes}
    assert wiring == {"p": "a", "q": "b"}


def test_non_commutative_pattern_matches_only_the_given_order():
    graph = _swish_graph(["sb", "b"])
    assert apply_rules(graph, [_swish(commutative=False)]) == {"swish": 1}
    assert graph.op_counts() == {"com.example::Swish": 1, "Sigmoid": 1, "Mul": 1}


def test_named_var_used_twice_must_bind_the_same_tensor():
    graph = _swish_graph(["a", "sb"])  # q = a * sigmoid(b): x cannot be both a and b
    q_node = next(n for n in graph.gs.nodes if n.outputs[0].name == "q")
    assert match(_swish().pattern, q_node, graph) is None
    assert apply_rules(graph, [_swish()]) == {"swish": 1}
    assert graph.op_counts() == {"com.example::Swish": 1, "Sigmoid": 1, "Mul": 1}


def test_const_value_matching():
    nodes = [helper.make_node("Mul", ["x", "one"], ["p"]),
             helper.make_node("Mul", ["x", "two"], ["q"]),
             helper.make_node("Constant", [], ["c1"],
                              value=helper.make_tensor("v", FLOAT, [], [1.0])),
             helper.make_node("Mul", ["c1", "x"], ["r"]),
             helper.make_node("Mul", ["x", "mixed"], ["s"]),
             helper.make_node("Mul", ["x", "y"], ["u"])]
    init = {"one": np.ones(3, np.float32), "two": np.full(3, 2.0, np.float32),
            "mixed": np.array([1, 1, 2], np.float32)}
    graph = make_graph(nodes, [("x", FLOAT, [3]), ("y", FLOAT, [3])],
                       [(o, FLOAT, [3]) for o in "pqrsu"], init)
    original = graph.copy()
    seen = {}

    def rewrite(m, g):
        seen[m.outputs[0].name] = m.values["one"]
        return [gs.Node("Identity", inputs=[m["x"]], outputs=m.outputs)]

    rule = RewriteRule("mul-by-one", op("Mul", var("x"), const("one", value=1.0)), rewrite)
    assert apply_rules(graph, [rule]) == {"mul-by-one": 2}
    assert set(seen) == {"p", "r"}
    np.testing.assert_array_equal(seen["p"], np.ones(3, np.float32))
    assert float(seen["r"]) == 1.0
    assert graph.op_counts() == {"Identity": 2, "Mul": 3}
    _same_outputs(original, graph)


def test_match_with_interior_output_used_elsewhere_is_rejected():
    # t1 (inside the Neg(Neg(x)) match) also feeds a Relu: removing it would lose that value.
    graph = _neg_chain(2, extra_outputs=["r"],
                       extra_nodes=[helper.make_node("Relu", ["t1"], ["r"])])
    nodes = list(graph.gs.nodes)
    assert match(DOUBLE_NEG.pattern, graph.node("Neg_2"), graph) is None
    assert apply_rules(graph, [DOUBLE_NEG]) == {}
    assert graph.gs.nodes == nodes


def test_match_with_interior_graph_output_is_rejected():
    graph = _neg_chain(2, extra_outputs=["t1"])
    assert apply_rules(graph, [DOUBLE_NEG]) == {}
    assert graph.op_counts() == {"Neg": 2}


def test_callback_returning_none_leaves_graph_unchanged():
    calls = []

    def decline(m, g):
        calls.append(m.root.name)
        return None

    graph = _neg_chain(2)
    nodes = list(graph.gs.nodes)
    assert apply_rules(graph, [RewriteRule("decline", DOUBLE_NEG.pattern, decline)]) == {}
    assert calls == ["Neg_2"]
    assert graph.gs.nodes == nodes
    assert [len(n.outputs) for n in nodes] == [1, 1]
    graph.verify()


def test_first_rule_returning_nodes_wins():
    rules = [RewriteRule("decline", DOUBLE_NEG.pattern, lambda m, g: None),
             RewriteRule("accept", DOUBLE_NEG.pattern, _identity_of("x")),
             RewriteRule("never", DOUBLE_NEG.pattern, lambda m, g: 1 / 0)]
    graph = _neg_chain(2)
    assert apply_rules(graph, rules) == {"accept": 1}


def test_match_captures_named_nodes_and_tensors():
    graph = _neg_chain(2)
    pattern = op("Neg", op("Neg", var("x"), name="inner"), name="outer")
    m = match(pattern, graph.node("Neg_2"), graph)
    assert m is not None
    assert m.root is graph.node("Neg_2") and m.nodes["outer"] is m.root
    assert m.nodes["inner"] is graph.node("Neg_1")
    assert m["x"].name == "t0"
    assert [t.name for t in m.outputs] == ["t2"]
    assert match(pattern, graph.node("Neg_1"), graph) is None  # its input is a graph input


def test_where_predicate_restricts_matches():
    graph = _neg_chain(4)
    pattern = op("Neg", op("Neg", var("x")), where=lambda n: n.name == "Neg_4")
    rule = RewriteRule("only-last", pattern, _identity_of("x"))
    assert apply_rules(graph, [rule]) == {"only-last": 1}
    assert graph.op_counts() == {"Neg": 2, "Identity": 1}
