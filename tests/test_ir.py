"""The graph IR: node naming, verify(), atomic save, metadata round trip, queries."""

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import FLOAT, INT64, make_graph
from onnx import helper

from mmcompile import Graph, ModalityTag
from mmcompile.errors import ModalityError, ModelLoadError, VerificationError
from mmcompile.frontend import load_graph
from mmcompile.reference import run_onnxruntime


def _chain():
    """a -> Neg -> b -> Relu -> c."""
    nodes = [helper.make_node("Neg", ["a"], ["b"]), helper.make_node("Relu", ["b"], ["c"])]
    return make_graph(nodes, [("a", FLOAT, [2, 3])], [("c", FLOAT, [2, 3])])


def _model(nodes, inputs, outputs):
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


# -- construction -------------------------------------------------------------------------------

def test_from_onnx_names_unnamed_nodes_uniquely():
    model = _model([helper.make_node("Neg", ["a"], ["b"]), helper.make_node("Neg", ["b"], ["c"]),
                    helper.make_node("Relu", ["c"], ["d"], name="")],
                   [("a", FLOAT, [2])], [("d", FLOAT, [2])])
    names = [n.name for n in Graph.from_onnx(model).gs.nodes]
    assert all(names) and len(set(names)) == 3


def test_from_onnx_makes_duplicate_names_unique():
    model = _model([helper.make_node("Neg", ["a"], ["b"], name="n"),
                    helper.make_node("Neg", ["b"], ["c"], name="n")],
                   [("a", FLOAT, [2])], [("c", FLOAT, [2])])
    names = [n.name for n in Graph.from_onnx(model).gs.nodes]
    assert names[0] == "n" and names[1] not in ("", "n")


def test_from_onnx_keeps_explicit_node_names():
    model = _model([helper.make_node("Neg", ["a"], ["b"]),
                    helper.make_node("Neg", ["b"], ["c"], name="Neg_1")],
                   [("a", FLOAT, [2])], [("c", FLOAT, [2])])
    names = [n.name for n in Graph.from_onnx(model).gs.nodes]
    assert names[1] == "Neg_1" and names[0] != "Neg_1"


def test_from_onnx_rejects_modality_for_missing_input():
    with pytest.raises(ModalityError, match="'a'"):
        Graph.from_onnx(_model([helper.make_node("Neg", ["a"], ["b"])], [("a", FLOAT, [2])],
                               [("b", FLOAT, [2])]), {"nope": "image"})


def test_copy_is_independent():
    graph = _chain()
    copy = graph.copy()
    copy.gs.nodes.clear()
    copy.annotations["x"] = 1
    assert graph.num_nodes == 2 and "x" not in graph.annotations
    assert copy.name == graph.name


# -- verify -------------------------------------------------------------------------------------

def test_verify_accepts_a_good_graph():
    _chain().verify()


def test_verify_rejects_a_tensor_with_two_producers():
    graph = _chain()
    a, b = graph.gs.tensors()["a"], graph.gs.tensors()["b"]
    graph.gs.nodes.append(gs.Node("Abs", name="second", inputs=[a], outputs=[b]))
    with pytest.raises(VerificationError, match="tensor 'b' is produced by several nodes"):
        graph.verify(check_onnx=False)


def test_verify_rejects_two_nodes_writing_the_same_tensor_name():
    graph = _chain()
    a = graph.gs.tensors()["a"]
    clash = gs.Variable("b", dtype=np.float32, shape=[2, 3])  # not the existing 'b' object
    graph.gs.nodes.append(gs.Node("Abs", name="second", inputs=[a], outputs=[clash]))
    with pytest.raises(VerificationError, match="'b' is produced by several nodes"):
        graph.verify(check_onnx=False)


def test_full_verify_catches_two_nodes_writing_the_same_tensor_name():
    graph = _chain()
    clash = gs.Variable("b", dtype=np.float32, shape=[2, 3])
    graph.gs.nodes.append(gs.Node("Abs", name="second", inputs=[graph.gs.inputs[0]],
                                  outputs=[clash]))
    with pytest.raises(VerificationError, match="'b'"):
        graph.verify()


def test_verify_rejects_reading_a_tensor_nothing_produces():
    graph = _chain()
    ghost = gs.Variable("ghost", dtype=np.float32, shape=[2, 3])
    graph.node("Relu_1").inputs[0] = ghost
    with pytest.raises(VerificationError,
                       match="reads tensor 'ghost' that nothing produces") as info:
        graph.verify(check_onnx=False)
    assert info.value.node == "Relu_1"


def test_verify_rejects_a_graph_output_nothing_produces():
    graph = _chain()
    graph.gs.outputs.append(gs.Variable("orphan", dtype=np.float32, shape=[2, 3]))
    with pytest.raises(VerificationError, match="'orphan' is not produced"):
        graph.verify(check_onnx=False)


def test_verify_rejects_a_cycle():
    graph = _chain()
    graph.node("Neg_1").inputs[0] = graph.gs.tensors()["c"]  # Neg reads Relu's output
    with pytest.raises(VerificationError, match="cycle") as info:
        graph.verify(check_onnx=False)
    assert info.value.node in ("Neg_1", "Relu_1")


def test_verify_runs_onnx_full_check_for_dtype_mismatch():
    graph = make_graph([helper.make_node("Add", ["x", "n"], ["y"])],
                       [("x", FLOAT, [2]), ("n", INT64, [2])], [("y", FLOAT, [2])])
    graph.verify(check_onnx=False)  # structurally fine
    with pytest.raises(VerificationError, match="fails onnx.checker.*inconsistent type"):
        graph.verify()


# -- save / load --------------------------------------------------------------------------------

def test_save_writes_a_checked_model_that_onnxruntime_runs(tmp_path):
    path = _chain().save(tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    (out,) = run_onnxruntime(onnx.load(path), {"a": x}).values()
    np.testing.assert_array_equal(out, np.maximum(-x, 0))


def _break(graph):
    graph.node("Relu_1").inputs[0] = gs.Variable("ghost", dtype=np.float32, shape=[2, 3])


def test_failed_save_writes_nothing(tmp_path):
    graph = _chain()
    _break(graph)
    with pytest.raises(VerificationError):
        graph.save(tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_failed_save_does_not_clobber_an_existing_file(tmp_path):
    path = tmp_path / "m.onnx"
    graph = _chain()
    graph.save(path)
    before = path.read_bytes()
    _break(graph)
    with pytest.raises(VerificationError):
        graph.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_save_over_an_existing_file_replaces_it(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    _chain().save(path)
    assert onnx.load(path).graph.node[0].op_type == "Neg"
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_save_into_missing_directory_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot write"):
        _chain().save(tmp_path / "missing" / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_save_without_check_writes_an_unverified_graph(tmp_path):
    graph = make_graph([helper.make_node("Add", ["x", "n"], ["y"])],
                       [("x", FLOAT, [2]), ("n", INT64, [2])], [("y", FLOAT, [2])])
    graph.save(tmp_path / "m.onnx", check=False)
    assert (tmp_path / "m.onnx").is_file()


def test_modality_tags_annotations_and_metadata_round_trip(tmp_path):
    graph = make_graph([helper.make_node("Neg", ["x"], ["y"])], [("x", FLOAT, [1, 3, 4, 4])],
                       [("y", FLOAT, [1, 3, 4, 4])], modalities={"x": "video"})
    graph.annotations["attention_units"] = [{"nodes": ["Neg_1"], "heads": 2}]
    graph.metadata["note"] = "kept"
    graph.save(tmp_path / "m.onnx")
    loaded = load_graph(tmp_path / "m.onnx")
    assert loaded.modalities == {"x": ModalityTag("video", "explicit mapping")}
    assert loaded.annotations == {"attention_units": [{"nodes": ["Neg_1"], "heads": 2}]}
    assert loaded.metadata == {"note": "kept"}


def test_explicit_modalities_override_saved_tags(tmp_path):
    graph = make_graph([helper.make_node("Neg", ["x"], ["y"])], [("x", FLOAT, [2, 3])],
                       [("y", FLOAT, [2, 3])], modalities={"x": "video"})
    graph.save(tmp_path / "m.onnx")
    assert load_graph(tmp_path / "m.onnx", {"x": "audio"}).modalities["x"].modality == "audio"


# -- queries ------------------------------------------------------------------------------------

def test_to_networkx_has_input_vertices_and_edges():
    nodes = [helper.make_node("Neg", ["a"], ["b"]), helper.make_node("Add", ["b", "t"], ["c"])]
    graph = make_graph(nodes, [("a", FLOAT, [2]), ("t", FLOAT, [2])], [("c", FLOAT, [2])],
                       modalities={"a": "image", "t": "text"})
    dag = graph.to_networkx()
    assert dag.nodes["input:a"] == {"kind": "input", "modality": "image"}
    assert dag.nodes["input:t"]["modality"] == "text"
    assert dag.nodes["Neg_1"] == {"kind": "node", "op": "Neg"}
    assert set(dag.edges) == {("input:a", "Neg_1"), ("input:t", "Add_1"), ("Neg_1", "Add_1")}
    assert dag.edges["Neg_1", "Add_1"]["tensor"] == "b"


def test_op_counts_and_num_parameters():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Add", ["y", "w2"], ["z"]),
             helper.make_node("Add", ["z", "w2"], ["u"]),
             helper.make_node("Reshape", ["u", "shape"], ["v"])]
    init = {"w": np.ones((3, 4), np.float32), "w2": np.ones(4, np.float32),
            "shape": np.array([8], np.int64)}
    graph = make_graph(nodes, [("x", FLOAT, [2, 3])], [("v", FLOAT, [8])], init)
    assert graph.op_counts() == {"Add": 2, "MatMul": 1, "Reshape": 1}
    assert graph.num_parameters() == 12 + 4  # w2 counted once; the int64 shape is not a weight
    graph.gs.nodes.append(gs.Node("FusedThing", domain="com.example", name="f"))
    assert graph.op_counts()["com.example::FusedThing"] == 1
    assert graph.num_nodes == 5


def test_node_lookup_and_opset():
    graph = _chain()
    assert graph.node("Relu_1").op == "Relu"
    with pytest.raises(KeyError):
        graph.node("nope")
    assert graph.opset == 18
