"""Frontends: tracing torch modules, loading .onnx / .pt2 files, and their errors."""

import logging

import numpy as np
import onnx
import pytest
import torch
from helpers import FLOAT
from onnx import helper

import mmcompile
from mmcompile.errors import ExportError, ModalityError, ModelLoadError
from mmcompile.frontend import DEFAULT_OPSET, load_graph
from mmcompile.reference import run_onnxruntime


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, pixel_values, input_ids):
        return self.proj(pixel_values) + input_ids.float().sum(-1, keepdim=True)


class Broken(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("boom in forward")


def _example(batch):
    return torch.randn(batch, 4), torch.arange(batch * 5, dtype=torch.int64).reshape(batch, 5)


def _torch_out(module, pixel_values, input_ids):
    with torch.no_grad():
        return module(torch.from_numpy(pixel_values), torch.from_numpy(input_ids)).numpy()


def _numpy_inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    return {"pixel_values": rng.standard_normal((batch, 4)).astype(np.float32),
            "input_ids": rng.integers(0, 9, (batch, 5)).astype(np.int64)}


@pytest.fixture(scope="module")
def module():
    return TwoInputs()


@pytest.fixture(scope="module")
def traced_tuple(module):
    """Positional inputs (one of them numpy), explicit modality for one input, opset 17."""
    pixel_values, input_ids = _example(2)
    return mmcompile.trace(module, (pixel_values.numpy(), input_ids), {"pixel_values": "tabular"},
                           opset=17)


@pytest.fixture(scope="module")
def traced_dict(module):
    """Keyword inputs traced at batch 1 with a dynamic batch."""
    pixel_values, input_ids = _example(1)
    return mmcompile.trace(module, {"pixel_values": pixel_values, "input_ids": input_ids},
                           dynamic_batch=True)


# -- trace --------------------------------------------------------------------------------------

def test_trace_tuple_inputs_are_named_after_forward_args(traced_tuple, module):
    assert [t.name for t in traced_tuple.gs.inputs] == ["pixel_values", "input_ids"]
    assert [t.shape for t in traced_tuple.gs.inputs] == [[2, 4], [2, 5]]
    assert traced_tuple.name == "TwoInputs"
    inputs = _numpy_inputs(2)
    (out,) = run_onnxruntime(traced_tuple, inputs).values()
    np.testing.assert_allclose(out, _torch_out(module, **inputs), rtol=1e-5, atol=1e-5)


def test_trace_explicit_modalities_win_and_others_are_inferred(traced_tuple):
    assert traced_tuple.modalities["pixel_values"] == mmcompile.ModalityTag("tabular",
                                                                           "explicit mapping")
    assert traced_tuple.modalities["input_ids"].modality == "text"


def test_trace_honours_opset(traced_tuple, traced_dict):
    assert traced_tuple.opset == 17
    assert traced_dict.opset == DEFAULT_OPSET == 18


def test_trace_dict_inputs_are_named_after_forward_args(traced_dict):
    assert {t.name for t in traced_dict.gs.inputs} == {"pixel_values", "input_ids"}
    assert traced_dict.modalities["pixel_values"].modality == "image"


def test_dynamic_batch_is_symbolic_even_when_traced_at_batch_1(traced_dict, module):
    for tensor in traced_dict.gs.inputs:
        assert isinstance(tensor.shape[0], str), tensor.shape
    assert {t.name: t.shape[1:] for t in traced_dict.gs.inputs} == {"pixel_values": [4],
                                                                    "input_ids": [5]}
    inputs = _numpy_inputs(3)
    (out,) = run_onnxruntime(traced_dict, inputs).values()
    assert out.shape == (3, 3)
    np.testing.assert_allclose(out, _torch_out(module, **inputs), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def export_error():
    with pytest.raises(ExportError) as info:
        mmcompile.trace(Broken(), (torch.randn(2, 3),))
    return info.value


def test_export_failure_raises_export_error(export_error):
    assert str(export_error).startswith("torch.onnx.export failed for Broken: ")
    assert "\n" not in str(export_error)
    assert isinstance(export_error.__cause__, Exception)


def test_export_error_names_the_root_cause(export_error):
    assert "boom in forward" in str(export_error)
    assert "\x1b[" not in str(export_error)


def test_trace_logs_no_warnings_at_other_opsets(caplog):
    caplog.set_level(logging.WARNING)
    mmcompile.trace(torch.nn.ReLU(), (torch.randn(2, 3),), opset=17)
    assert [r.getMessage() for r in caplog.records] == []


# -- load_graph: .onnx --------------------------------------------------------------------------

def _affine_model(batch=2):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "affine",
                              [helper.make_tensor_value_info("x", FLOAT, [batch, 4])],
                              [helper.make_tensor_value_info("y", FLOAT, [batch, 3])],
                              [onnx.numpy_helper.from_array(
                                  np.arange(12, dtype=np.float32).reshape(4, 3), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def test_load_graph_of_onnx_file(tmp_path):
    onnx.save_model(_affine_model(), tmp_path / "m.onnx")
    graph = load_graph(tmp_path / "m.onnx", {"x": "tabular"})
    assert graph.name == "m.onnx"
    assert graph.op_counts() == {"MatMul": 1}
    assert graph.modalities["x"].modality == "tabular"
    assert graph.gs.outputs[0].shape == [2, 3]


def test_load_graph_rejects_modality_for_missing_input(tmp_path):
    onnx.save_model(_affine_model(), tmp_path / "m.onnx")
    with pytest.raises(ModalityError, match=r"\['nope'\].*inputs are \['x'\]"):
        load_graph(tmp_path / "m.onnx", {"nope": "image"})


def test_load_graph_with_external_data(tmp_path):
    onnx.save_model(_affine_model(), tmp_path / "m.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    assert (tmp_path / "w.data").is_file()
    graph = load_graph(tmp_path / "m.onnx")
    w = graph.gs.tensors()["w"]
    np.testing.assert_array_equal(w.values, np.arange(12, dtype=np.float32).reshape(4, 3))
    x = np.ones((2, 4), np.float32)
    (out,) = run_onnxruntime(graph, {"x": x}).values()
    np.testing.assert_array_equal(out, x @ w.values)


def test_load_graph_with_missing_external_data_raises(tmp_path):
    onnx.save_model(_affine_model(), tmp_path / "m.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    (tmp_path / "w.data").unlink()
    with pytest.raises(ModelLoadError, match="m.onnx"):
        load_graph(tmp_path / "m.onnx")


def _bad_model(kind):
    if kind == "unknown-op":
        nodes, out = [helper.make_node("Frobnicate", ["x"], ["y"])], "y"
    else:  # a graph output nothing produces
        nodes, out = [helper.make_node("Neg", ["x"], ["y"])], "z"
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", FLOAT, [2])],
                              [helper.make_tensor_value_info(out, FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("content, fragment", [
    (None, "no such model file"),
    ("text", "not a readable ONNX model"),
    ("random", "not a readable ONNX model"),
    ("empty", "not an ONNX model"),
    ("unknown-op", "fails onnx.checker"),
    ("unproduced-output", "fails onnx.checker"),
])
def test_load_errors_are_model_load_errors_naming_the_path(tmp_path, content, fragment):
    path = tmp_path / "bad.onnx"
    if content == "text":
        path.write_text("this is not a model\n")
    elif content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif content == "empty":
        path.write_bytes(b"")
    elif content is not None:
        onnx.save_model(_bad_model(content), path)
    with pytest.raises(ModelLoadError, match=fragment) as info:
        load_graph(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_graph_of_a_directory_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model file"):
        load_graph(tmp_path)


# -- input_shapes -------------------------------------------------------------------------------

def _save_symbolic(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save_model(_affine_model(batch="n"), path)
    return path


def test_input_shapes_fix_a_symbolic_batch(tmp_path):
    path = _save_symbolic(tmp_path)
    assert load_graph(path).gs.inputs[0].shape == ["n", 4]
    graph = load_graph(path, input_shapes={"x": [5, 4]})
    assert graph.gs.inputs[0].shape == [5, 4]
    assert graph.gs.tensors()["y"].shape == [5, 3]



def test_input_shapes_clear_outputs_an_exporter_wrote_as_minus_one(tmp_path):
    # Paddle2ONNX writes unknown dims as -1: once pinned, the inferred 5 and the declared -1
    # made the optimized file fail onnx.checker's full check (the PaddleOCR classifier).
    model = _affine_model(batch="n")
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = -1
    path = tmp_path / "minus.onnx"
    onnx.save_model(model, path)
    graph = load_graph(path, input_shapes={"x": [5, 4]})
    assert graph.gs.tensors()["y"].shape == [5, 3]
    onnx.checker.check_model(graph.to_onnx(), full_check=True)

def test_input_shapes_wrong_rank_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"input 'x' of dyn.onnx has rank 2, but shape \[5\]"):
        load_graph(_save_symbolic(tmp_path), input_shapes={"x": [5]})


def test_input_shapes_unknown_name_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"names 'nope', but dyn.onnx has inputs \['x'\]"):
        load_graph(_save_symbolic(tmp_path), input_shapes={"nope": [5, 4]})


# -- load_graph: .pt2 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pt2_path(module, tmp_path_factory):
    path = tmp_path_factory.mktemp("pt2") / "two.pt2"
    torch.export.save(torch.export.export(module, _example(2)), str(path))
    return path


def test_load_graph_of_pt2(pt2_path, module):
    graph = load_graph(pt2_path, {"input_ids": "other"})
    assert graph.name == "two.pt2"
    assert [t.name for t in graph.gs.inputs] == ["pixel_values", "input_ids"]
    assert graph.modalities["input_ids"].modality == "other"
    assert graph.modalities["pixel_values"].modality == "image"
    inputs = _numpy_inputs(2, seed=1)
    (out,) = run_onnxruntime(graph, inputs).values()
    np.testing.assert_allclose(out, _torch_out(module, **inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("content, fragment", [(None, "no such model file"),
                                               (b"garbage", "not a torch.export program")])
def test_bad_pt2_is_a_model_load_error(tmp_path, content, fragment):
    path = tmp_path / "bad.pt2"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=fragment) as info:
        load_graph(path)
    assert str(path) in str(info.value)


def _symbolic_reshape_model():
    """x[batch, seq, 4] -> Reshape to [batch, -1] through Shape/Gather/Concat arithmetic."""
    nodes = [onnx.helper.make_node("Shape", ["x"], ["s"], name="shape"),
             onnx.helper.make_node("Gather", ["s", "zero"], ["b"], axis=0, name="gather"),
             onnx.helper.make_node("Concat", ["b", "rest"], ["to"], axis=0, name="concat"),
             onnx.helper.make_node("Reshape", ["x", "to"], ["y"], name="reshape")]
    graph = onnx.helper.make_graph(
        nodes, "symbolic",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
         onnx.numpy_helper.from_array(np.array([-1], np.int64), "rest")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])


def test_symbolic_dims_are_fixed_to_the_example_inputs_and_the_report_says_so():
    import mmcompile
    from mmcompile.frontend import to_graph
    model = _symbolic_reshape_model()
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    graph = to_graph(model, {"x": x})
    assert graph.gs.inputs[0].shape == [2, 5, 4]
    assert graph.annotations["specialized_inputs"] == {
        "x": {"declared": ["batch", "seq", 4], "shape": [2, 5, 4]}}
    # the caller's model is not modified
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # input_shapes wins over the example; without examples nothing is fixed
    assert to_graph(model, {"x": x}, input_shapes={"x": [3, 5, 4]}).gs.inputs[0].shape == \
        [3, 5, 4]
    assert to_graph(model).gs.inputs[0].shape == ["batch", "seq", 4]
    compiled = mmcompile.compile(model, {"x": x})
    assert compiled.run({"x": x})["y"].shape == (2, 20)
    assert "shapes: symbolic dims fixed to the example inputs (x ['batch', 'seq', 4] -> " \
           "[2, 5, 4])" in compiled.report()
    assert compiled.metadata["specialized"]["x"]["shape"] == [2, 5, 4]


def test_a_traced_graph_with_a_symbolic_batch_is_fixed_to_the_example_too(traced_dict):
    # left symbolic, TVM compiled generic kernels: av_mnist at batch 8 ran 258 ms, 2.2 ms pinned
    from mmcompile.frontend import to_graph
    inputs = _numpy_inputs(3)
    graph = to_graph(traced_dict, inputs)
    assert {t.name: t.shape for t in graph.gs.inputs} == {"pixel_values": [3, 4],
                                                          "input_ids": [3, 5]}
    assert graph.annotations["specialized_inputs"]["input_ids"] == {
        "declared": ["batch", 5], "shape": [3, 5]}
    assert graph.modalities == traced_dict.modalities
    assert isinstance(traced_dict.gs.inputs[0].shape[0], str)  # the caller's graph is kept
    assert to_graph(traced_dict) is traced_dict  # nothing to fix it to
    assert to_graph(traced_dict, inputs, specialize=False) is traced_dict


def test_an_example_that_contradicts_the_declared_shape_is_an_input_error():
    from mmcompile.errors import InputError
    from mmcompile.frontend import to_graph
    model = _symbolic_reshape_model()
    with pytest.raises(InputError, match=r"example input 'x' has shape \[2, 5, 3\], but model "
                                         r"declares \['batch', 'seq', 4\]"):
        to_graph(model, {"x": np.zeros((2, 5, 3), np.float32)})
    with pytest.raises(InputError, match="has rank 2"):
        to_graph(model, (np.zeros((2, 5), np.float32),))
