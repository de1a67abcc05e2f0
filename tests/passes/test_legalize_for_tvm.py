"""legalize-for-tvm: graphs TVM's ONNX importer rejects become graphs it imports, same numbers."""

import numpy as np
import pytest
from helpers import FLOAT, check_pass, make_graph
from onnx import TensorProto, helper

import mmcompile

BOOL = TensorProto.BOOL


def tvm_imports(graph: mmcompile.Graph) -> bool:
    from tvm.relax.frontend.onnx import from_onnx
    try:
        from_onnx(graph.to_onnx(), keep_params_in_input=False)
    except Exception:
        return False
    return True


def _no_attention(g):
    assert "Attention" not in g.op_counts()
    assert g.op_counts()["Softmax"] == 1


def test_attention_4d_with_bool_mask_is_decomposed_and_imports():
    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], scale=0.3)
    shape = [1, 2, 4, 8]
    g = make_graph([node], [("q", FLOAT, shape), ("k", FLOAT, shape), ("v", FLOAT, shape),
                            ("mask", BOOL, [4, 4])], [("y", FLOAT, shape)], opset=23)
    assert not tvm_imports(g)
    result = check_pass(g, "legalize-for-tvm", expect_changed=True, structure=_no_attention,
                        atol=1e-5)
    assert result.records[0].stats["attention_decomposed"] == 1
    assert tvm_imports(result.graph)


def test_attention_3d_grouped_query_causal():
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=4, kv_num_heads=2,
                            is_causal=1)
    g = make_graph([node], [("q", FLOAT, [1, 5, 32]), ("k", FLOAT, [1, 5, 16]),
                            ("v", FLOAT, [1, 5, 16])], [("y", FLOAT, [1, 5, 32])], opset=23)
    result = check_pass(g, "legalize-for-tvm", expect_changed=True, structure=_no_attention,
                        atol=1e-5)
    assert tvm_imports(result.graph)


def test_attention_with_past_key_value_is_refused_naming_the_node():
    node = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "pk_out", "pv_out"],
                            name="attn_with_cache")
    shape = [1, 2, 4, 8]
    g = make_graph([node], [("q", FLOAT, shape), ("k", FLOAT, shape), ("v", FLOAT, shape),
                            ("pk", FLOAT, [1, 2, 3, 8]), ("pv", FLOAT, [1, 2, 3, 8])],
                   [("y", FLOAT, shape)], opset=23)
    with pytest.raises(mmcompile.PassError, match="attn_with_cache.*past key/value"):
        mmcompile.optimize(g, "legalize-for-tvm")


def _layernorm_graph(read_extras: bool):
    outputs = ["y", "mean", "inv_std"]
    nodes = [helper.make_node("LayerNormalization", ["x", "w", "b"], outputs, axis=-1,
                              epsilon=1e-5)]
    graph_outputs = [("y", FLOAT, [2, 3, 8])]
    if read_extras:
        nodes.append(helper.make_node("Mul", ["mean", "inv_std"], ["z"]))
        graph_outputs.append(("z", FLOAT, [2, 3, 1]))
    init = {"w": np.linspace(0.5, 1.5, 8).astype(np.float32),
            "b": np.linspace(-1, 1, 8).astype(np.float32)}
    return make_graph(nodes, [("x", FLOAT, [2, 3, 8])], graph_outputs, init)


def test_layernorm_unused_extra_outputs_are_dropped():
    def structure(g):
        (ln,) = [n for n in g.gs.nodes if n.op == "LayerNormalization"]
        assert len(ln.outputs) == 1

    check_pass(_layernorm_graph(read_extras=False), "legalize-for-tvm", expect_changed=True,
               structure=structure)


def test_layernorm_read_extra_outputs_are_computed_explicitly():
    def structure(g):
        assert "LayerNormalization" not in g.op_counts()
        assert g.op_counts()["ReduceMean"] == 2

    result = check_pass(_layernorm_graph(read_extras=True), "legalize-for-tvm",
                        expect_changed=True, structure=structure, atol=1e-5)
    assert tvm_imports(result.graph)


def test_constant_value_ints_become_value_tensors():
    nodes = [helper.make_node("Constant", [], ["shape"], value_ints=[2, 12]),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    g = make_graph(nodes, [("x", FLOAT, [2, 3, 4])], [("y", FLOAT, [2, 12])])
    assert not tvm_imports(g)

    def structure(g):
        (const,) = [n for n in g.gs.nodes if n.op == "Constant"]
        assert list(const.attrs) == ["value"]
        assert list(const.attrs["value"].values) == [2, 12]

    result = check_pass(g, "legalize-for-tvm", expect_changed=True, structure=structure)
    assert tvm_imports(result.graph)


def test_graph_tvm_already_accepts_is_left_alone():
    nodes = [helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"]),
             helper.make_node("Softmax", ["y"], ["z"], axis=-1)]
    init = {"w": np.ones(8, np.float32), "b": np.zeros(8, np.float32)}
    g = make_graph(nodes, [("x", FLOAT, [2, 8])], [("z", FLOAT, [2, 8])], init)
    check_pass(g, "legalize-for-tvm", expect_changed=False)
