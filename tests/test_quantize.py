"""Int8 quantization: calibration data checks, per-branch calibration, the QDQ output, the
accuracy budget, compile(quantize="int8") end to end, the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import FLOAT, assert_one_line_error, make_graph, run_cli
from onnx import helper

import mmcompile
from mmcompile.errors import InputError
from mmcompile.quantize import QuantizationError, quantize
from mmcompile.quantize.calibration import load_calibration
from mmcompile.quantize.ranges import branch_ranges, tensor_modalities
from mmcompile.reference import run_onnxruntime

IMAGE = ("pixel_values", FLOAT, [1, 3, 8, 8])
SENSOR = ("sensor", FLOAT, [1, 16])


def two_branch_model(seed: int = 0, opset: int = 18) -> mmcompile.Graph:
    """image: conv -> relu -> pool -> flatten; sensor: matmul -> relu; fusion: concat -> gemm."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["pixel_values", "cw", "cb"], ["c"], name="img_conv",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="img_relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="img_pool"),
        helper.make_node("Flatten", ["p"], ["img_feat"], name="img_flatten"),
        helper.make_node("MatMul", ["sensor", "sw"], ["s"], name="sensor_matmul"),
        helper.make_node("Relu", ["s"], ["sensor_feat"], name="sensor_relu"),
        helper.make_node("Concat", ["img_feat", "sensor_feat"], ["f"], name="fuse_concat",
                         axis=1),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["logits"], name="fuse_gemm"),
    ]
    weights = {"cw": rng.standard_normal([8, 3, 3, 3]).astype(np.float32) * 0.3,
               "cb": rng.standard_normal([8]).astype(np.float32) * 0.1,
               "sw": rng.standard_normal([16, 8]).astype(np.float32) * 0.3,
               "gw": rng.standard_normal([16, 4]).astype(np.float32) * 0.3,
               "gb": rng.standard_normal([4]).astype(np.float32) * 0.1}
    return make_graph(nodes, [IMAGE, SENSOR], [("logits", FLOAT, [1, 4])], weights, opset=opset)


def samples(n_image: int, n_sensor: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"pixel_values": rng.standard_normal([n_image, 1, 3, 8, 8]).astype(np.float32),
            "sensor": rng.standard_normal([n_sensor, 1, 16]).astype(np.float32)}


# -- calibration data ------------------------------------------------------------------------


def test_calibration_groups_inputs_by_modality_and_allows_fewer_samples_for_one():
    data = load_calibration(samples(10, 3), two_branch_model())
    assert data.modalities == {"image": ["pixel_values"], "tabular": ["sensor"]}
    assert data.counts() == {"image": 10, "tabular": 3}
    calib, held = data.split(0.2)
    assert calib.counts() == {"image": 8, "tabular": 2}
    assert held.counts() == {"image": 2, "tabular": 1}
    assert len(list(calib.feeds())) == 2  # paired: as many as the smallest modality
    assert len(list(calib.feeds(only="image"))) == 8


def test_calibration_from_feed_dicts_with_a_modality_missing():
    model = two_branch_model()
    stacked = samples(4, 2)
    feeds = [{"pixel_values": stacked["pixel_values"][i]} | (
        {"sensor": stacked["sensor"][i]} if i < 2 else {}) for i in range(4)]
    data = load_calibration(feeds, model)
    assert data.counts() == {"image": 4, "tabular": 2}
    assert data.sha256() == load_calibration(stacked, model).sha256()


@pytest.mark.parametrize("data,fragment", [
    ({"pixel": np.zeros([2, 1, 3, 8, 8], np.float32)}, "'pixel', not inputs"),
    ({"pixel_values": np.zeros([2, 1, 3, 8, 8], np.float32)}, "no samples for input(s) 'sensor'"),
    (dict(samples(2, 2), sensor=np.zeros([2, 1, 15], np.float32)), "has shape [1, 15]"),
    (dict(samples(2, 2), sensor=np.zeros([2, 1, 16], np.int64)), "is int64"),
    (dict(samples(2, 2), sensor=np.zeros([0, 1, 16], np.float32)), "no samples"),
    (dict(samples(2, 2), sensor=np.full([2, 1, 16], np.nan, np.float32)), "NaN"),
    (dict(samples(2, 2), sensor=np.zeros([1, 16], np.float32)), "stack samples"),
    (42, "must be a .npz path"),
    ("/nonexistent/calib.npz", "does not exist"),
])
def test_bad_calibration_data_is_named(data, fragment):
    with pytest.raises(InputError) as info:
        load_calibration(data, two_branch_model())
    assert fragment in str(info.value)


def test_token_ids_outside_the_embedding_table_are_refused():
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["e"], name="embed"),
             helper.make_node("ReduceMean", ["e"], ["out"], name="mean", keepdims=0)]
    model = make_graph(nodes, [("input_ids", onnx.TensorProto.INT64, [1, 4])],
                       [("out", FLOAT, [])], {"table": np.ones([10, 3], np.float32)})
    with pytest.raises(InputError, match=r"ids in \[0, 12\].*table of 10 rows"):
        load_calibration({"input_ids": np.array([[[0, 1, 2, 12]]])}, model)


# -- per-branch ranges -------------------------------------------------------------------------


def _intermediate(model: mmcompile.Graph, name: str, feeds) -> list[np.ndarray]:
    proto = model.to_onnx()
    proto.graph.output.append(helper.make_tensor_value_info(name, FLOAT, None))
    return [run_onnxruntime(proto, feed)[name] for feed in feeds]


def test_each_branch_is_calibrated_on_all_its_own_samples_the_fusion_on_paired_ones():
    model = two_branch_model()
    data = load_calibration(samples(9, 3), model)
    reach = tensor_modalities(model)
    assert reach["c"] == {"image"} and reach["s"] == {"tabular"}
    assert reach["logits"] == {"image", "tabular"}
    ranges, used = branch_ranges(model, model.to_onnx(), data, "minmax", ("Conv", "MatMul",
                                                                          "Gemm"))
    assert used["c"] == 9 and used["s"] == 3 and used["f"] == 3
    conv = _intermediate(model, "c", data.feeds(only="image"))  # all nine images
    assert np.isclose(np.ravel(ranges["c"].range_value[0])[0], min(x.min() for x in conv))
    assert np.isclose(np.ravel(ranges["c"].range_value[1])[0], max(x.max() for x in conv))
    paired = _intermediate(model, "c", data.feeds())  # only three: a narrower range
    assert max(x.max() for x in paired) < np.ravel(ranges["c"].range_value[1])[0]
    fused = _intermediate(model, "f", data.feeds())
    assert np.isclose(np.ravel(ranges["f"].range_value[1])[0], max(x.max() for x in fused))


# -- the quantized model -----------------------------------------------------------------------


def test_quantized_model_is_qdq_with_per_channel_int8_weights_and_int32_bias():
    q = quantize(two_branch_model(), samples(12, 12), max_drop=None)
    proto = q.graph.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op for n in q.graph.gs.nodes}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
          and n.input[0] in inits]
    weights = [inits[n.input[0]] for n in dq if inits[n.input[0]].dtype == np.int8]
    assert any(w.ndim == 4 for w in weights)  # the conv's
    assert any(np.asarray(inits[n.input[1]]).size == 8 for n in dq
               if inits[n.input[0]].dtype == np.int8)  # one scale per output channel
    assert any(inits[n.input[0]].dtype == np.int32 for n in dq)  # a bias
    assert sorted(q.layers) == ["fuse_gemm", "img_conv", "sensor_matmul"]
    assert q.accuracy[0].cosine > 0.99
    feeds = {k: v[0] for k, v in samples(1, 1, seed=5).items()}
    assert run_onnxruntime(proto, feeds, optimize=True)["logits"].shape == (1, 4)


def test_an_opset_11_model_is_converted_before_its_per_channel_weights_are_quantized():
    # per-channel DequantizeLinear (its axis) needs opset 13: written into an opset-11 graph it
    # is an invalid model onnxruntime refuses (PaddleOCR's exports are opset 11)
    q = quantize(two_branch_model(opset=11), samples(12, 12), max_drop=None)
    assert q.graph.opset >= 13
    proto = q.graph.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    assert sorted(q.layers) == ["fuse_gemm", "img_conv", "sensor_matmul"]
    feeds = {k: v[0] for k, v in samples(1, 1, seed=5).items()}
    reference = run_onnxruntime(proto, feeds)["logits"]
    got = mmcompile.compile(q.graph).run(feeds)["logits"]
    # int8 kernels against the QDQ graph's float semantics: same integers, float rounding apart
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)


def test_an_old_opset_the_converter_cannot_take_is_named(monkeypatch):
    from onnx import version_converter

    def refuse(model, version):
        raise RuntimeError("No Adapter For Upsample")
    monkeypatch.setattr(version_converter, "convert_version", refuse)
    with pytest.raises(QuantizationError, match="opset 11; int8 QDQ needs opset 13.*Upsample"):
        quantize(two_branch_model(opset=11), samples(4, 4), max_drop=None)


def sensitive_model() -> mmcompile.Graph:
    """``wide`` sends one channel out 1000x larger and ``narrow`` scales it back: quantizing
    the activation between them (narrow's input) wipes out every other channel."""
    rng = np.random.default_rng(3)
    wide = rng.standard_normal([16, 16]).astype(np.float32) * 0.3
    wide[:, 0] *= 1000.0
    narrow = rng.standard_normal([16, 16]).astype(np.float32) * 0.3
    narrow[0, :] /= 1000.0
    last = rng.standard_normal([16, 8]).astype(np.float32) * 0.3
    nodes = [helper.make_node("MatMul", ["sensor", "w1"], ["a"], name="wide"),
             helper.make_node("MatMul", ["a", "w2"], ["b"], name="narrow"),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w3"], ["out"], name="last")]
    return make_graph(nodes, [SENSOR], [("out", FLOAT, [1, 8])],
                      {"w1": wide, "w2": narrow, "w3": last})


def test_the_accuracy_budget_keeps_the_sensitive_layer_in_float():
    data = {"sensor": samples(1, 40)["sensor"]}
    q = quantize(sensitive_model(), data, max_drop=0.01)
    assert 1 - q.all_int8[0].cosine > 0.01  # every layer int8 breaks the budget
    assert "narrow" in q.float_layers and "accuracy budget" in q.float_layers["narrow"]
    assert "last" in q.layers  # only what the budget needs stays float
    assert q.drop <= 0.01
    assert q.sensitivity["narrow"] > q.sensitivity["last"]
    report = q.report()
    assert "kept in float" in report and "narrow" in report and "8 held-back" in report


def residual_model() -> mmcompile.Graph:
    """``a`` is read by ``second`` and by the residual Add: the quantizer makes both read it
    through one quantize / dequantize pair."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["sensor", "w1"], ["a"], name="first"),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["b"], name="second"),
             helper.make_node("Add", ["a", "b"], ["out"], name="residual")]
    return make_graph(nodes, [SENSOR], [("out", FLOAT, [1, 16])],
                      {"w1": rng.standard_normal([16, 16]).astype(np.float32),
                       "w2": rng.standard_normal([16, 16]).astype(np.float32) * 0.3,
                       "b2": rng.standard_normal([16]).astype(np.float32)})


class AllInt8:
    """A test model, samples fed to it, its float ONNX model and the quantizer's model with
    every layer int8 (what the accuracy budget's models are cut from)."""

    def __init__(self, model, tmp_path, seed: int, n: int):
        from mmcompile.quantize import OP_TYPES, _qdq_opset, _Quantizer
        self.graph = graph = model()
        data = samples(n, n, seed=seed)
        names = {t.name for t in graph.gs.inputs}
        self.feeds = [{k: v for k, v in zip(data, values) if k in names}
                      for values in zip(*data.values())]
        self.float_model = _qdq_opset(graph.to_onnx(), graph.name)
        ranges, _ = branch_ranges(graph, self.float_model,
                                  load_calibration(self.feeds, graph), "minmax", OP_TYPES)
        self.quantizer = _Quantizer(graph, self.float_model, ranges, "minmax", "uint8",
                                    tmp_path)
        self.everything = self.quantizer.build().to_onnx()
        self.layers = [n.name for n in graph.gs.nodes if n.op in OP_TYPES]


@pytest.mark.parametrize("model, layers", [(residual_model, ["second"]),
                                           (residual_model, ["first"]),
                                           (residual_model, ["first", "second"]),
                                           (two_branch_model, ["img_conv"]),
                                           (two_branch_model, ["fuse_gemm"]),
                                           (two_branch_model, ["img_conv", "fuse_gemm"]),
                                           (two_branch_model, ["sensor_matmul", "fuse_gemm"])])
def test_quantized_layers_are_cut_as_the_quantizer_writes_them(tmp_path, model, layers):
    # the budget's models are cut from the all-int8 model, not asked of onnxruntime's
    # quantizer one at a time: they must be the same models (a residual reader of a
    # quantized activation, a conv bias, a layer writing a graph output, a quantized layer
    # reading another's quantized output)
    from mmcompile.quantize.sensitivity import cut
    from mmcompile.reference import run_onnxruntime_many
    q = AllInt8(model, tmp_path, seed=2, n=6)
    feeds = q.feeds
    expected = q.quantizer.build(exclude=[n for n in q.layers if n not in layers]).to_onnx()
    model = cut(q.float_model, q.everything, layers)
    onnx.checker.check_model(model, full_check=True)
    got, want = run_onnxruntime_many(model, feeds), run_onnxruntime_many(expected, feeds)
    for g, w in zip(got, want):
        for name in w:
            np.testing.assert_array_equal(g[name], w[name])  # the same model: bit-exact
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}


@pytest.mark.parametrize("model", [residual_model, two_branch_model])
def test_sensitivities_run_only_what_a_layer_changes_and_measure_the_same(tmp_path, model):
    # each one-layer model runs only the nodes downstream of its layer, on the float
    # model's values: the same scores as the whole cut model
    from mmcompile.quantize.accuracy import compare, drop
    from mmcompile.quantize.sensitivity import changed_part, cut, sensitivities
    from mmcompile.reference import run_onnxruntime_many
    q = AllInt8(model, tmp_path, seed=3, n=7)
    float_model, everything, feeds, layers = q.float_model, q.everything, q.feeds, q.layers
    reference = run_onnxruntime_many(float_model, feeds)

    def score(outputs):
        return drop(compare(reference, outputs, {}))

    got = sensitivities(float_model, everything, layers, feeds, score)
    want = {layer: score(run_onnxruntime_many(cut(float_model, everything, [layer]), feeds))
            for layer in layers}
    assert got == want and max(want.values()) > 0
    if model is two_branch_model:  # the image conv's part never runs the sensor branch
        part = changed_part(cut(float_model, everything, ["img_conv"]))
        ran = {n.name for n in part.graph.node}
        assert "img_conv" in ran and "fuse_gemm" in ran
        assert not ran & {"sensor_matmul", "sensor_relu"}
        assert {i.name for i in part.graph.input} == {"pixel_values", "sensor_feat"}


def test_layers_are_ranked_on_half_the_held_back_samples_and_checked_on_the_other(
        monkeypatch):
    # ranked and checked on the same rows, the search fits the layers to those rows' near-tied
    # argmaxes and the budget holds there but not on new inputs (module docstring)
    import importlib
    q_module = importlib.import_module("mmcompile.quantize")  # the package, not the function
    seen = {"rank": [], "check": []}
    real_sensitivities, real_drop_or_over = q_module.sensitivities, q_module._drop_or_over

    def ranking(float_model, quantized, layers, feeds, score, **kw):
        seen["rank"] += [f["sensor"].tobytes() for f in feeds]
        return real_sensitivities(float_model, quantized, layers, feeds, score, **kw)

    def checking(model, feeds, reference, metrics, budget):
        seen["check"].append({f["sensor"].tobytes() for f in feeds})
        return real_drop_or_over(model, feeds, reference, metrics, budget)

    monkeypatch.setattr(q_module, "sensitivities", ranking)
    monkeypatch.setattr(q_module, "_drop_or_over", checking)
    data = {"sensor": samples(1, 40)["sensor"]}
    q = quantize(sensitive_model(), data, max_drop=0.01)  # 8 of 40 held back
    assert "narrow" in q.float_layers
    assert len(seen["rank"]) == 4 and seen["check"]
    # each head is checked on the other half first, and must hold on both
    assert len(seen["check"][0]) == 4 and not set(seen["rank"]) & seen["check"][0]
    assert all(half in (seen["check"][0], set(seen["rank"])) for half in seen["check"])
    assert q.accuracy[0].samples == 8  # the report counts every held-back sample


def test_the_budget_search_measures_a_logarithmic_number_of_heads():
    from mmcompile.quantize.accuracy import keep_in_float
    layers = [f"l{i}" for i in range(40)]
    asked = []

    def evaluate(kept):  # the budget holds once the 11 most sensitive are float
        asked.append(len(kept))
        return 0.0 if len(kept) >= 11 else 0.05

    kept, final = keep_in_float(layers, evaluate, 0.01, lambda message: None)
    assert kept == layers[:11] and final == 0.0
    assert len(asked) <= 2 * 6 and sorted(set(asked)) == sorted(asked)  # 40 one at a time
    kept, final = keep_in_float(layers[:1], evaluate, 0.01, lambda message: None)
    assert kept == ["l0"] and final == 0.0  # every layer float: the float model, not run


def test_a_failing_head_may_stop_early_on_a_lower_bound_of_its_drop():
    # the budget's search stops measuring a model once the samples seen put its drop over
    # the budget: the bound must never exceed the drop over all samples
    from mmcompile.quantize.accuracy import compare, drop, drop_at_least
    rng = np.random.default_rng(7)
    reference = [{"scores": rng.standard_normal([8, 5]), "embedding": rng.standard_normal([8, 16])}
                 for _ in range(12)]
    noisy = [{k: v + rng.standard_normal(v.shape) * 0.4 for k, v in r.items()}
             for r in reference]
    metrics = {"scores": "top1", "embedding": "cosine"}
    final = drop(compare(reference, noisy, metrics))
    bounds = [drop_at_least(reference, noisy[:seen], metrics) for seen in range(1, 13)]
    assert all(0 < b <= final + 1e-12 for b in bounds) and bounds[-1] == pytest.approx(final)
    assert all(b <= later + 1e-12 for b, later in zip(bounds, bounds[1:]))  # never looser
    one_value = [{"logit": np.array([[v]])} for v in rng.standard_normal(4)]
    assert drop_at_least(one_value, [{"logit": -r["logit"]} for r in one_value[:2]]) == 0.0


def test_without_a_budget_everything_is_int8_and_reported():
    q = quantize(sensitive_model(), {"sensor": samples(1, 10)["sensor"]}, max_drop=None)
    assert not q.float_layers and len(q.layers) == 3
    q = quantize(sensitive_model(), {"sensor": samples(1, 10)["sensor"]}, max_drop=None,
                 keep_float=["narrow"])
    assert q.float_layers == {"narrow": "kept in float by request"}


@pytest.mark.parametrize("options,fragment", [
    ({"method": "kl"}, "unknown calibration method 'kl'"),
    ({"activations": "int4"}, "unknown activation type"),
    ({"max_drop": 2.0}, "max_drop must be in [0, 1)"),
    ({"metrics": {"nope": "top1"}}, "'nope', not an output"),
    ({"metrics": {"out": "f1"}}, "unknown metric"),
    ({"keep_float": ["missing"]}, "neither a node nor an op type"),
])
def test_bad_quantization_options_are_named(options, fragment):
    with pytest.raises(QuantizationError) as info:
        quantize(sensitive_model(), {"sensor": samples(1, 4)["sensor"]}, **options)
    assert fragment in str(info.value)


# -- compile -----------------------------------------------------------------------------------


def test_compile_quantized_matches_the_qdq_graph_and_records_the_quantization(tmp_path):
    data = samples(12, 6)
    feeds = {k: v[0] for k, v in samples(1, 1, seed=9).items()}
    cm = mmcompile.compile(two_branch_model(), feeds, quantize="int8", calibration=data,
                           quantize_options={"method": "percentile"})
    info = cm.metadata["quantization"]
    assert info["samples"] == {"image": 10, "tabular": 5} and info["method"] == "percentile"
    assert "ok" in cm.metadata["verification"]
    assert "quantization: int8 (QDQ)" in cm.report()
    cm.save(tmp_path / "m.mmc")
    manifest = json.loads((tmp_path / "m.mmc" / "manifest.json").read_text())
    # the quantized conv and matmul run as int8 kernels, not as float between (de)quantizes
    assert sum(s.get("info", {}).get("int8", {}).get("kernels", 0)
               for s in manifest["stages"]) >= 2, manifest["stages"]
    loaded = mmcompile.load(tmp_path / "m.mmc")
    assert loaded.metadata["quantization"]["calibration_sha256"] == info["calibration_sha256"]
    np.testing.assert_array_equal(loaded.run(feeds)["logits"], cm.run(feeds)["logits"])


def test_compile_needs_both_quantize_and_calibration():
    with pytest.raises(InputError, match="quantize needs calibration"):
        mmcompile.compile(two_branch_model(), quantize="int8")
    with pytest.raises(InputError, match="no quantize scheme"):
        mmcompile.compile(two_branch_model(), calibration=samples(2, 2))
    with pytest.raises(QuantizationError, match="unknown quantize option"):
        mmcompile.compile(two_branch_model(), quantize="int8", calibration=samples(2, 2),
                          quantize_options={"methd": "minmax"})


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_quantize_writes_qdq_onnx_and_reports(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    two_branch_model().save(model)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **samples(10, 4))
    out = tmp_path / "m.int8.onnx"
    code, stdout, _ = run_cli(capsys, "quantize", model, "--calibration", calib, "-o", out,
                              "--report")
    assert code == 0, stdout
    assert "int8 (QDQ)" in stdout and "wrote" in stdout
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)
    code, stdout, _ = run_cli(capsys, "quantize", model, "--calibration", calib, "-o", out,
                              "--json")
    assert json.loads(stdout)["layers_int8"] == 3
    np.savez(calib, pixel_values=samples(3, 3)["pixel_values"])
    code, _, err = run_cli(capsys, "quantize", model, "--calibration", calib, "-o",
                           tmp_path / "bad.onnx")
    assert code == 1
    assert_one_line_error(err, "no samples for input(s) 'sensor'")
    assert not (tmp_path / "bad.onnx").exists()


def test_suite_model_end_to_end_with_fewer_audio_samples(tmp_path, capsys):
    """AV-MNIST (image + audio CNNs): quantized with 24 images and 12 spectrograms, compiled,
    matches its QDQ graph, stays close to float, and the artifact's manifest says how."""
    import torch

    from mmcompile.bench import suite
    module, inputs = suite.build("av_mnist", 1)
    graph = mmcompile.trace(module, inputs, suite.get("av_mnist").modalities)
    rng = np.random.default_rng(0)
    calibration = {name: rng.standard_normal([24 if name == "image" else 12,
                                              *value.shape]).astype(np.float32)
                   for name, value in inputs.items()}
    feeds = {k: v.numpy() for k, v in inputs.items()}
    cm = mmcompile.compile(graph, feeds, quantize="int8", calibration=calibration,
                           tolerance=0.02)
    info = cm.metadata["quantization"]
    assert info["samples"] == {"image": 19, "audio": 10}
    assert info["accuracy"][0]["cosine"] >= 0.99  # against float, on held-back samples
    with torch.inference_mode():
        expected = module(**inputs).numpy()
    got = next(iter(cm.run(feeds).values()))
    cosine = float(np.dot(got.ravel(), expected.ravel()) /
                   (np.linalg.norm(got) * np.linalg.norm(expected)))
    assert cosine >= 0.99
    cm.save(tmp_path / "av.mmc")
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "av.mmc")
    assert code == 0 and "quantization: int8 (QDQ)" in out and "image 19, audio 10" in out


def test_graph_passes_keep_the_int8_weights_of_a_qdq_graph():
    q = quantize(two_branch_model(), samples(8, 8), max_drop=None)
    dq_before = sum(n.op == "DequantizeLinear" for n in q.graph.gs.nodes)
    optimized = mmcompile.optimize(q.graph, "default").graph
    assert sum(n.op == "DequantizeLinear" for n in optimized.gs.nodes) == dq_before
    feeds = {k: v[0] for k, v in samples(1, 1, seed=4).items()}
    np.testing.assert_allclose(run_onnxruntime(optimized, feeds)["logits"],
                               run_onnxruntime(q.graph, feeds)["logits"], atol=1e-6)


def test_accuracy_of_a_one_value_output_compares_the_values_across_samples():
    # CLIP's logits at batch 1 are 1x1: a per-sample cosine is the value's sign, so a logit
    # near 0 that rounded across it scored -1 (mean cosine 0.975 over 200 samples).
    from mmcompile.quantize.accuracy import compare
    values = np.linspace(-1, 1, 200)
    reference = [{"logit": np.array([[v]], np.float32)} for v in values]
    quantized = [{"logit": np.array([[v + 0.01]], np.float32)} for v in values]
    (accuracy,) = compare(reference, quantized)
    assert accuracy.cosine > 0.999
    embeddings = compare([{"e": np.array([1.0, 0.0], np.float32)}],
                         [{"e": np.array([0.0, 1.0], np.float32)}])
    assert embeddings[0].cosine == 0.0  # per sample where a sample has several values


def test_class_scores_are_judged_by_top1_and_embeddings_by_cosine():
    from mmcompile.quantize.accuracy import default_metrics
    assert default_metrics(sensitive_model()) == {"out": "top1"}  # a MatMul's [1, 8] scores
    assert default_metrics(two_branch_model()) == {"logits": "top1"}  # a Gemm's
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["sensor", "w"], ["m"], name="proj"),
             helper.make_node("ReduceL2", ["m"], ["n"], name="norm", keepdims=1, axes=[1]),
             helper.make_node("Div", ["m", "n"], ["embedding"], name="normalize"),
             helper.make_node("MatMul", ["sensor", "w"], ["m2"], name="proj2"),
             helper.make_node("Add", ["m2", "b"], ["logits"], name="bias"),
             helper.make_node("ReduceMean", ["m2"], ["score"], name="mean", keepdims=1,
                              axes=[1])]
    graph = make_graph(nodes, [SENSOR], [("embedding", FLOAT, [1, 8]),
                                         ("logits", FLOAT, [1, 8]), ("score", FLOAT, [1, 1])],
                       {"w": rng.standard_normal([16, 8]).astype(np.float32),
                        "b": rng.standard_normal([8]).astype(np.float32)}, opset=13)
    assert default_metrics(graph) == {"embedding": "cosine", "logits": "top1",
                                      "score": "cosine"}


def test_similarity_logits_scaled_by_a_positive_constant_are_class_scores():
    # CLIP: logits per image = MatMul * exp(logit_scale) (a folded constant), logits per text
    # its transpose; a negative scale reverses the argmax, so it does not count
    from mmcompile.quantize.accuracy import default_metrics
    nodes = [helper.make_node("MatMul", ["sensor", "w"], ["sim"], name="sim"),
             helper.make_node("Mul", ["scale", "sim"], ["per_image"], name="temperature"),
             helper.make_node("Transpose", ["per_image"], ["per_text"], name="t", perm=[1, 0]),
             helper.make_node("Mul", ["sim", "minus"], ["flipped"], name="flip"),
             helper.make_node("Div", ["sim", "scale"], ["divided"], name="div")]
    graph = make_graph(nodes, [("sensor", FLOAT, [4, 16])],
                       [("per_image", FLOAT, [4, 4]), ("per_text", FLOAT, [4, 4]),
                        ("flipped", FLOAT, [4, 4]), ("divided", FLOAT, [4, 4])],
                       {"w": np.ones([16, 4], np.float32),
                        "scale": np.array(14.3, np.float32),
                        "minus": np.array(-1.0, np.float32)}, opset=13)
    assert default_metrics(graph) == {"per_image": "top1", "per_text": "top1",
                                      "flipped": "cosine", "divided": "top1"}


def test_a_top1_budget_on_too_few_rows_is_reported_blind():
    from mmcompile.quantize.accuracy import compare, unresolved
    rng = np.random.default_rng(0)
    reference = [{"out": rng.standard_normal([1, 8]).astype(np.float32)} for _ in range(10)]
    (few,) = compare(reference, reference, {"out": "top1"})
    assert few.rows == 10 and few.score == pytest.approx(1.0)
    assert unresolved([few], 0.01) == ["out"] and unresolved([few], 0.1) == []
    q = quantize(sensitive_model(), {"sensor": samples(1, 40)["sensor"]}, max_drop=0.01)
    assert q.accuracy[0].metric == "top1" and q.unresolved == ["out"]
    assert "too few held-back rows" in q.report()
    # a disagreeing argmax costs top-1 even where cosine barely moves
    flipped = [{"out": np.array([[1.0, 0.999]], np.float32)}]
    (one,) = compare(flipped, [{"out": np.array([[0.999, 1.0]], np.float32)}], {"out": "top1"})
    assert one.cosine > 0.999 and one.score == 0.0
