"""legalize-for-tvm: graphs TVM's ONNX importer rejects become graphs it imports, same numbers."""

import numpy as np
import pytest
from helpers import FLOAT, check_pass, make_graph
from onnx import TensorProto, helper

import mmcompile

BOOL = TensorProto.BOOL
FLOAT16 = TensorProto.FLOAT16
INT64 = TensorProto.INT64


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


def _compiled_against_reference(g: mmcompile.Graph, feeds: dict, atol: float) -> None:
    """Compile through the CPU target; every output within ``atol`` of onnx's reference
    implementation (what onnx's node tests hold the op to)."""
    from onnx.reference import ReferenceEvaluator
    model = g.to_onnx()
    ref = ReferenceEvaluator(model).run(None, feeds)
    compiled = mmcompile.compile(model, feeds, target="cpu", verify=False, fallback=None)
    got = compiled.run(feeds)
    for out, want in zip(model.graph.output, ref):
        np.testing.assert_allclose(got[out.name], want, atol=atol, rtol=0, err_msg=out.name)


def _qkv(rng, *shapes):
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def test_attention_with_kv_cache_returns_present_and_scores():
    # 4-D, grouped heads, a past of 3 keys: present = past ++ new; mode 2 scores keep -inf
    node = helper.make_node("Attention", ["q", "k", "v", "mask", "pk", "pv"],
                            ["y", "present_k", "present_v", "qk"], is_causal=1,
                            qk_matmul_output_mode=2)
    q, k, v, pk, pv = _qkv(np.random.default_rng(0), (1, 4, 2, 8), (1, 2, 2, 8), (1, 2, 2, 8),
                           (1, 2, 3, 8), (1, 2, 3, 8))
    mask = np.ones((2, 5), bool)
    mask[:, 1] = False
    g = make_graph([node], [("q", FLOAT, list(q.shape)), ("k", FLOAT, list(k.shape)),
                            ("v", FLOAT, list(v.shape)), ("mask", BOOL, [2, 5]),
                            ("pk", FLOAT, [1, 2, 3, 8]), ("pv", FLOAT, [1, 2, 3, 8])],
                   [("y", FLOAT, [1, 4, 2, 8]), ("present_k", FLOAT, [1, 2, 5, 8]),
                    ("present_v", FLOAT, [1, 2, 5, 8]), ("qk", FLOAT, [1, 4, 2, 5])], opset=23)
    result = mmcompile.optimize(g, "legalize-for-tvm")
    assert "Attention" not in result.graph.op_counts()
    assert tvm_imports(result.graph)
    _compiled_against_reference(g, {"q": q, "k": k, "v": v, "mask": mask, "pk": pk, "pv": pv},
                                atol=1e-5)


def test_attention_external_cache_with_causal_sliding_window():
    # per-batch valid lengths: the causal frontier and the window end at each batch's last key
    node = helper.make_node("Attention", ["q", "k", "v", "", "", "", "nonpad"], ["y"],
                            is_causal=1, left_window_size=2)
    q, k, v = _qkv(np.random.default_rng(1), (2, 2, 3, 8), (2, 2, 6, 8), (2, 2, 6, 8))
    g = make_graph([node], [("q", FLOAT, [2, 2, 3, 8]), ("k", FLOAT, [2, 2, 6, 8]),
                            ("v", FLOAT, [2, 2, 6, 8]), ("nonpad", INT64, [2])],
                   [("y", FLOAT, [2, 2, 3, 8])], opset=25)
    _compiled_against_reference(g, {"q": q, "k": k, "v": v,
                                    "nonpad": np.array([4, 6], np.int64)}, atol=1e-5)


def test_attention_row_with_every_key_masked_gives_zeros():
    # ONNX: a query with no key left attends to nothing (0), not to the average of all keys
    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"])
    q, k, v = _qkv(np.random.default_rng(2), (1, 2, 3, 8), (1, 2, 4, 8), (1, 2, 4, 8))
    mask = np.ones((3, 4), bool)
    mask[1] = False
    g = make_graph([node], [("q", FLOAT, [1, 2, 3, 8]), ("k", FLOAT, [1, 2, 4, 8]),
                            ("v", FLOAT, [1, 2, 4, 8]), ("mask", BOOL, [3, 4])],
                   [("y", FLOAT, [1, 2, 3, 8])], opset=23)
    _compiled_against_reference(g, {"q": q, "k": k, "v": v, "mask": mask}, atol=1e-5)


def test_attention_past_key_without_past_value_is_refused_naming_the_node():
    node = helper.make_node("Attention", ["q", "k", "v", "", "pk"], ["y"],
                            name="attn_with_cache")
    shape = [1, 2, 4, 8]
    g = make_graph([node], [("q", FLOAT, shape), ("k", FLOAT, shape), ("v", FLOAT, shape),
                            ("pk", FLOAT, [1, 2, 3, 8])], [("y", FLOAT, shape)], opset=23)
    with pytest.raises(mmcompile.PassError, match="attn_with_cache.*past_key and past_value"):
        mmcompile.optimize(g, "legalize-for-tvm")


def test_float16_matmul_accumulates_in_float32():
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    g = make_graph([node], [("a", FLOAT16, [16, 2048]), ("b", FLOAT16, [2048, 16])],
                   [("y", FLOAT16, [16, 16])])

    def structure(g):
        (matmul,) = [n for n in g.gs.nodes if n.op == "MatMul"]
        assert all(np.dtype(t.dtype) == np.float32 for t in matmul.inputs + matmul.outputs)
        assert g.op_counts()["Cast"] == 3

    check_pass(g, "legalize-for-tvm", expect_changed=True, structure=structure, atol=1e-2)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(s).astype(np.float16) for s in ((16, 2048), (2048, 16)))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    got = mmcompile.compile(g.to_onnx(), {"a": a, "b": b}, target="cpu", verify=False).run(
        {"a": a, "b": b})["y"]
    # float32 accumulation: the float16 rounding of the result (2^-11 of it); a float16
    # accumulator was off by 1.3e-2 of the range here
    assert np.abs(got - exact).max() / np.abs(exact).max() < 2e-3


def _resize_graph(attrs: dict, x_shape, y_shape, scales=None, sizes=None, roi=None):
    init = {}
    names = ["x", "", "", ""]
    for i, (name, value) in enumerate((("roi", roi), ("scales", scales), ("sizes", sizes)), 1):
        if value is not None:
            init[name], names[i] = value, name
    while not names[-1]:
        names.pop()
    node = helper.make_node("Resize", names, ["y"], **attrs)
    return make_graph([node], [("x", FLOAT, x_shape)], [("y", FLOAT, y_shape)], init, opset=19)


@pytest.mark.parametrize("attrs,scales,out", [
    ({"mode": "linear"}, [1, 1, 0.6, 0.6], [3, 4]),  # scale is not the ratio of the sizes
    ({"mode": "cubic", "antialias": 1}, [1, 1, 0.6, 0.6], [3, 4]),  # antialias filter
    ({"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"},
     [1, 1, 1.7, 0.8], [8, 5]),
])
def test_resize_tvm_computes_differently_becomes_matmuls_with_reference_weights(attrs, scales,
                                                                                 out):
    g = _resize_graph(attrs, [1, 2, 5, 7], [1, 2, *out], scales=np.array(scales, np.float32))
    result = mmcompile.optimize(g, "legalize-for-tvm")
    assert "Resize" not in result.graph.op_counts()
    assert result.graph.op_counts()["MatMul"] == 2
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 7)).astype(np.float32)
    _compiled_against_reference(g, {"x": x}, atol=1e-5)


def test_resize_with_axes_and_aspect_policy_is_spelled_over_every_axis():
    g = _resize_graph({"mode": "nearest", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"},
                      [1, 1, 2, 4], [1, 1, 1, 2], sizes=np.array([1, 3], np.int64))
    assert not tvm_imports(g)

    def structure(g):
        (node,) = [n for n in g.gs.nodes if n.op == "Resize"]
        assert "axes" not in node.attrs
        assert list(node.inputs[3].values) == [1, 1, 1, 2]

    result = check_pass(g, "legalize-for-tvm", expect_changed=True, structure=structure)
    assert tvm_imports(result.graph)


def test_resize_tvm_computes_right_is_left_to_tvm():
    g = _resize_graph({"mode": "nearest"}, [1, 2, 4, 4], [1, 2, 8, 8],
                      scales=np.array([1, 1, 2, 2], np.float32))
    check_pass(g, "legalize-for-tvm", expect_changed=False)


@pytest.mark.parametrize("op_type,expected", [("ReduceMax", -np.inf), ("ReduceMin", np.inf)])
def test_reduction_over_an_empty_axis_is_its_identity_element(op_type, expected):
    node = helper.make_node(op_type, ["x", "axes"], ["y"], keepdims=1)
    g = make_graph([node], [("x", FLOAT, [2, 0, 4])], [("y", FLOAT, [2, 1, 4])],
                   {"axes": np.array([1], np.int64)})
    result = mmcompile.optimize(g, "legalize-for-tvm")
    assert op_type not in result.graph.op_counts()
    x = np.zeros((2, 0, 4), np.float32)
    got = mmcompile.compile(g.to_onnx(), {"x": x}, target="cpu", verify=False).run({"x": x})["y"]
    assert got.shape == (2, 1, 4) and np.all(got == expected)


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


def _row_gather_graph(batch, swapped=False):
    """``x[arange(n), argmax(ids)]`` as torch exports it (CLIP's end-of-text pooling);
    ``swapped``: ``x[argmax(ids), arange(n)]``."""
    nodes = [helper.make_node("Shape", ["ids"], ["shape"], start=0, end=1),
             helper.make_node("Squeeze", ["shape"], ["n"]),
             helper.make_node("Range", ["start", "n", "one"], ["rows"]),
             helper.make_node("Unsqueeze", ["rows", "last"], ["rows_col"]),
             helper.make_node("ArgMax", ["ids"], ["idx"], axis=-1, keepdims=0),
             helper.make_node("Unsqueeze", ["idx", "last"], ["idx_col"]),
             helper.make_node("Concat", ["idx_col", "rows_col"] if swapped
                              else ["rows_col", "idx_col"], ["pairs"], axis=-1),
             helper.make_node("GatherND", ["x", "pairs"], ["y"])]
    init = {"start": np.array(0, np.int64), "one": np.array(1, np.int64),
            "last": np.array([-1], np.int64)}
    return make_graph(nodes, [("x", FLOAT, [batch, 6, 4]), ("ids", INT64, [batch, 3])],
                      [("y", FLOAT, [batch, 4])], init)


def test_row_gather_over_a_symbolic_batch_takes_one_element_per_row():
    g = _row_gather_graph("batch")
    assert not tvm_imports(g)

    def structure(g):
        (gather,) = [n for n in g.gs.nodes if n.op == "GatherND"]
        assert gather.attrs["batch_dims"] == 1
        assert "Range" not in g.op_counts() and "Concat" not in g.op_counts()

    result = check_pass(g, "legalize-for-tvm", expect_changed=True, structure=structure)
    assert result.records[0].stats["row_gathers"] == 1
    assert tvm_imports(result.graph)


def test_gather_of_row_index_pairs_in_another_order_is_left_alone():
    check_pass(_row_gather_graph(3, swapped=True), "legalize-for-tvm", expect_changed=False)
