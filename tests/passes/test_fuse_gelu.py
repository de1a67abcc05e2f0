"""fuse-gelu: the erf and tanh GELU spellings become one Gelu op (contrib below opset 20)."""

import math

import numpy as np
import onnx
import pytest
from helpers import FLOAT, check_pass, make_graph
from onnx import helper

import mmcompile

CONSTS = {
    "half": np.array(0.5, np.float32), "one": np.array(1.0, np.float32),
    "two": np.array(2.0, np.float32), "three": np.array(3.0, np.float32),
    "sqrt2": np.array(math.sqrt(2.0), np.float32),
    "rsqrt2": np.array(1.0 / math.sqrt(2.0), np.float32),
    "k": np.array(math.sqrt(2.0 / math.pi), np.float32),
    "c": np.array(0.044715, np.float32),
}
ARRANGEMENTS = ["bracket_half", "x_half", "half_last", "div_two"]


def _node(op, inputs, output, swap):
    if swap and op in ("Add", "Mul"):
        inputs = inputs[::-1]
    return helper.make_node(op, inputs, [output])


def _gelu_graph(bracket_nodes, arrangement, swap=False, opset=18, x_shape=(2, 8)):
    """y = 0.5 * x * bracket, with ``bracket`` (the 1 + erf/tanh term) computed by the nodes
    given as (op, inputs, output) and the 0.5 applied as ``arrangement`` says."""
    tail = {
        "bracket_half": [("Mul", ["b", "half"], "hb"), ("Mul", ["x", "hb"], "y")],
        "x_half": [("Mul", ["x", "half"], "hx"), ("Mul", ["hx", "b"], "y")],
        "half_last": [("Mul", ["x", "b"], "xb"), ("Mul", ["xb", "half"], "y")],
        "div_two": [("Mul", ["x", "b"], "xb"), ("Div", ["xb", "two"], "y")],
    }[arrangement]
    nodes = [_node(o, i, out, swap) for o, i, out in bracket_nodes + tail]
    return make_graph(nodes, [("x", FLOAT, list(x_shape))], [("y", FLOAT, list(x_shape))],
                      CONSTS, opset=opset)


def _erf_bracket(scale="div"):
    inner = ("Div", ["x", "sqrt2"], "s") if scale == "div" else ("Mul", ["x", "rsqrt2"], "s")
    return [inner, ("Erf", ["s"], "e"), ("Add", ["e", "one"], "b")]


def _tanh_bracket(form="pow"):
    if form == "fast":  # transformers gelu_fast: (k * x) * (1 + c * x * x)
        arg = [("Mul", ["x", "k"], "kx"), ("Mul", ["x", "c"], "cx"), ("Mul", ["cx", "x"], "cxx"),
               ("Add", ["cxx", "one"], "p"), ("Mul", ["kx", "p"], "a")]
    else:
        cube = [("Pow", ["x", "three"], "x3")] if form == "pow" else \
            [("Mul", ["x", "x"], "x2"), ("Mul", ["x2", "x"], "x3")]
        arg = cube + [("Mul", ["x3", "c"], "cx3"), ("Add", ["x", "cx3"], "p"),
                      ("Mul", ["p", "k"], "a")]
    return arg + [("Tanh", ["a"], "t"), ("Add", ["t", "one"], "b")]


def _only(op):
    def structure(g):
        assert g.op_counts() == {op: 1}
        node = g.gs.nodes[0]
        assert [t.name for t in node.inputs] == ["x"] and node.outputs[0].name == "y"
    return structure


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
@pytest.mark.parametrize("scale", ["div", "mul"])
def test_erf_gelu_becomes_contrib_gelu(scale, arrangement, swap):
    g = _gelu_graph(_erf_bracket(scale), arrangement, swap)
    result = check_pass(g, "fuse-gelu", expect_changed=True,
                        structure=_only("com.microsoft::Gelu"), atol=1e-5)
    assert result.records[0].stats == {"gelu_fused": 1, "gelu_tanh_fused": 0}


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
@pytest.mark.parametrize("form", ["pow", "mul", "fast"])
def test_tanh_gelu_becomes_fast_gelu(form, arrangement, swap):
    g = _gelu_graph(_tanh_bracket(form), arrangement, swap)
    result = check_pass(g, "fuse-gelu", expect_changed=True,
                        structure=_only("com.microsoft::FastGelu"), atol=1e-4)
    assert result.records[0].stats == {"gelu_fused": 0, "gelu_tanh_fused": 1}


@pytest.mark.parametrize("bracket,approximate", [(_erf_bracket(), None), (_tanh_bracket(), "tanh")])
def test_opset_20_uses_standard_gelu(bracket, approximate):
    def structure(g):
        _only("Gelu")(g)
        assert g.gs.nodes[0].attrs.get("approximate") == approximate
        assert {o.domain for o in g.to_onnx().opset_import} == {""}

    check_pass(_gelu_graph(bracket, "bracket_half", opset=20), "fuse-gelu", expect_changed=True,
               structure=structure, atol=1e-4)


def test_leaves_other_functions_alone():
    wrong_constant = [("Div", ["x", "two"], "s"), ("Erf", ["s"], "e"), ("Add", ["e", "one"], "b")]
    check_pass(_gelu_graph(wrong_constant, "bracket_half"), "fuse-gelu", expect_changed=False)
    quick_gelu = [helper.make_node("Mul", ["x", "k"], ["s"]),
                  helper.make_node("Sigmoid", ["s"], ["g"]),
                  helper.make_node("Mul", ["x", "g"], ["y"])]
    g = make_graph(quick_gelu, [("x", FLOAT, [2, 8])], [("y", FLOAT, [2, 8])],
                   {"k": np.array(1.702, np.float32)})
    check_pass(g, "fuse-gelu", expect_changed=False)


def test_leaves_gelu_alone_when_an_inner_value_is_used_elsewhere():
    nodes = [helper.make_node(o, i, [out]) for o, i, out in _erf_bracket()]
    nodes += [helper.make_node("Mul", ["b", "half"], ["hb"]),
              helper.make_node("Mul", ["x", "hb"], ["y"])]
    g = make_graph(nodes, [("x", FLOAT, [2, 8])], [("y", FLOAT, [2, 8]), ("e", FLOAT, [2, 8])],
                   CONSTS)
    check_pass(g, "fuse-gelu", expect_changed=False)


def test_leaves_gelu_alone_when_a_constant_broadcasts_x():
    consts = dict(CONSTS, half=np.full((3, 1, 1), 0.5, np.float32))
    nodes = [helper.make_node(o, i, [out]) for o, i, out in _erf_bracket()]
    nodes += [helper.make_node("Mul", ["b", "half"], ["hb"]),
              helper.make_node("Mul", ["x", "hb"], ["y"])]
    g = make_graph(nodes, [("x", FLOAT, [2, 1])], [("y", FLOAT, [3, 2, 1])], consts)
    check_pass(g, "fuse-gelu", expect_changed=False)


@pytest.mark.parametrize("approximate,op,counter", [
    ("none", "com.microsoft::Gelu", "gelu_fused"),
    ("tanh", "com.microsoft::FastGelu", "gelu_tanh_fused"),
])
def test_torch_mlp_gelu(tmp_path, approximate, op, counter):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(approximate=approximate),
                              torch.nn.Linear(32, 16))
    g = mmcompile.trace(mlp, (torch.randn(2, 16),))

    def structure(out):
        counts = out.op_counts()
        assert counts[op] == 1
        assert not {"Erf", "Tanh", "Pow"} & set(counts)

    result = check_pass(g, "fuse-gelu", expect_changed=True, structure=structure, atol=1e-4)
    assert result.records[0].stats[counter] == 1
    saved = onnx.load(str(result.graph.save(tmp_path / "mlp.onnx")))
    assert {(o.domain, o.version) for o in saved.opset_import} == {("", 18), ("com.microsoft", 1)}


def test_tvm_imports_the_contrib_ops():
    pytest.importorskip("tvm")
    from tvm.relax.frontend.onnx import from_onnx
    for bracket in (_erf_bracket(), _tanh_bracket()):
        result = mmcompile.optimize(_gelu_graph(bracket, "x_half"), "fuse-gelu")
        text = from_onnx(result.graph.to_onnx()).script()
        assert "R.nn.gelu" in text or "R.tanh" in text
