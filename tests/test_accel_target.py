"""The ``accel`` target (targets/accel/target.py, importer.py): placement of a QDQ graph's
layers on the accelerator and the rest on its host, compile to instruction streams, the
accelerator stages bit-exact to onnxruntime on the same QDQ graph, modelled costs, artifacts
round-tripping, unsupported layers on the host with their reason."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

import mmcompile
from mmcompile.errors import MMCompileError
from mmcompile.target import TargetError
from mmcompile.targets.onnxruntime import int8_exact


@functools.cache
def av_mnist_files() -> Path:
    """AV-MNIST (image + audio LeNet CNNs, a two-layer head) exported once per test process
    (the export is most of these tests' time), with calibration samples (``calib.npz``, 6
    per input) and one input (``x.npz``), in a temporary folder removed at exit."""
    from mmcompile.bench import suite
    folder = Path(tempfile.mkdtemp(prefix="mmc-accel-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    suite.export("av_mnist", 1, folder / "av.onnx")
    _, inputs = suite.build("av_mnist", 1)
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", **{k: rng.standard_normal([6, *v.shape]).astype(np.float32)
                                      for k, v in inputs.items()})
    np.savez(folder / "x.npz", **{k: v.numpy() for k, v in inputs.items()})
    return folder


def load_av_mnist():
    """AV-MNIST: the float graph, its QDQ graph, the calibration samples and one input."""
    from mmcompile.quantize import quantize
    folder = av_mnist_files()
    graph = mmcompile.Graph.from_onnx(onnx.load(folder / "av.onnx"), name="av_mnist")
    calibration = dict(np.load(folder / "calib.npz"))
    feeds = dict(np.load(folder / "x.npz"))
    qdq = quantize(graph, calibration, max_drop=None).graph
    return graph, qdq, calibration, feeds


@pytest.fixture(scope="module")
def av_mnist():
    """AV-MNIST: the float graph, its QDQ graph, the calibration samples and one input."""
    return load_av_mnist()


@pytest.fixture(scope="module")
def compiled(av_mnist):
    """The QDQ graph compiled for the default preset, the rest on the cpu target."""
    _, qdq, _, feeds = av_mnist
    return mmcompile.compile(qdq, feeds, target="accel", schedule="sequential")


def _ort_tensors(graph, feeds, names):
    """onnxruntime's values of ``names`` (intermediate tensors) on the QDQ ``graph``."""
    import onnxruntime as ort
    model = graph.to_onnx()
    for name in names:
        model.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not int8_exact():  # its int8 kernels saturate on this host: the QDQ graph in float
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    outs = session.run(list(names) + [o.name for o in graph.gs.outputs], feeds)
    return dict(zip(list(names) + [o.name for o in graph.gs.outputs], outs))


def test_quantized_layers_go_to_the_accelerator_and_the_rest_to_the_cpu(compiled):
    accel = [s for s in compiled.stages if s.target == "accel"]
    host = [s for s in compiled.stages if s.target != "accel"]
    ops = Counter(layer["op"] for s in accel for layer in s.info["layers"])
    # 7 convolutions, the head's 2 Gemms, the 5 max pools between convolutions and the ReLU
    # between the Gemms (the pools whose result goes to a float ReduceMean stay on the host)
    assert ops == {"Conv": 7, "Gemm": 2, "MaxPool": 5, "Relu": 1}
    assert len(accel) == 2  # the CNN branches whole, and the head: pooling splits nothing
    assert {s.target for s in host} == {"cpu"}
    reasons = compiled.fallback_nodes()
    assert "node_max_pool2d" not in reasons and "node_relu_7" not in reasons
    assert reasons["node_max_pool2d_2"] == ("accel: not a quantized layer: its result goes to "
                                            "ReduceMean 'node_mean' in float, not to a "
                                            "QuantizeLinear")
    assert reasons["node_mean"] == ("accel: ReduceMean is not a quantized Conv/MatMul/Gemm/"
                                    "MaxPool layer")
    assert all(r.startswith("accel: ") for r in reasons.values())
    assert compiled.metadata["fallback"]["target"] == "cpu"
    # every accelerator stage reads and writes quantized tensors, never float ones
    for stage in accel:
        assert all(name.endswith("QuantizeLinear_Output") for name in stage.inputs)
        assert all(name.endswith("QuantizeLinear_Output") for name in stage.outputs)


def test_accelerator_stages_are_bit_exact_to_onnxruntime_on_the_qdq_graph(av_mnist, compiled):
    """Each accelerator layer (and each stage) fed onnxruntime's own quantized inputs gives
    onnxruntime's quantized outputs: onnxruntime fuses these uint8 x int8 layers into
    QLinearConv / QGemm, whose integer arithmetic the simulator reproduces, and pools and
    ReLUs are exact either way. Tolerance, had onnxruntime evaluated a contraction in float
    (see targets/accel/layers.py): one step on at most 0.1% of the elements; measured here:
    0 differences."""
    from mmcompile.targets.accel.simulator import run as simulate
    _, qdq, _, feeds = av_mnist
    accel = [s for s in compiled.stages if s.target == "accel"]
    names = sorted({t for s in accel for t in (*s.inputs, *s.outputs)}
                   | {layer[k] for s in accel for layer in s.info["layers"]
                      for k in ("input", "output")})
    want = _ort_tensors(qdq, feeds, names)
    differ = total = 0

    def compare(got: np.ndarray, name: str) -> None:
        nonlocal differ, total
        assert got.dtype == want[name].dtype and got.shape == want[name].shape
        step = np.abs(got.astype(np.int32) - want[name].astype(np.int32))
        assert step.max(initial=0) <= 1, name
        differ += int(np.count_nonzero(step))
        total += step.size

    for stage in accel:
        got = stage.executable.run({t: want[t] for t in stage.inputs})
        for name in stage.outputs:
            compare(got[name], name)
        for stream, layer in zip(stage.executable.streams, stage.executable.layers):
            x = want[layer["input"]].reshape(stream.tensors["x"].logical_shape)
            compare(simulate(stream, {"x": x})["y"].reshape(layer["output_shape"]),
                    layer["output"])
    assert total > 300_000 and differ <= total // 1000
    if int8_exact():  # onnxruntime ran its int8 kernels, which the simulator reproduces
        assert differ == 0, f"{differ} of {total} quantized outputs differ"
    # end to end: the compiled model's logits are onnxruntime's on the QDQ graph
    (logits_name,) = compiled.output_names
    np.testing.assert_allclose(compiled.run(feeds)[logits_name], want[logits_name],
                               rtol=0, atol=1e-5 * max(1.0, np.abs(want[logits_name]).max()))


def test_accelerator_stages_cost_their_modelled_time(compiled):
    for stage in compiled.stages:
        if stage.target == "accel":
            info = stage.info
            assert info["cost_ms"] == round(info["modelled_ms"], 4) > 0
            assert info["modelled_ms"] == pytest.approx(
                1e3 * sum(layer["seconds"] for layer in info["layers"]))
            for layer in info["layers"]:
                assert layer["cycles"] > 0 and layer["dram_bytes"] > 0
                assert layer["energy_uj"] > 0
                if layer["op"] in ("MaxPool", "Relu"):  # the ALU's: no MACs on the array
                    assert layer["utilization"] == 0 and layer["macs"] == 0
                else:
                    assert 0 < layer["utilization"] <= 1
    assert "us modelled" in compiled.report()


def test_the_modelled_timeline_puts_accelerator_stages_on_their_lane(av_mnist, compiled):
    _, _, _, feeds = av_mnist
    from mmcompile.planning.timeline import modelled_timeline
    entries = {e["stage"]: e for e in modelled_timeline(compiled, feeds, runs=1)}
    for stage in compiled.stages:
        entry = entries[stage.name]
        assert entry["modelled"] == (stage.target == "accel")
        if stage.target == "accel":
            assert entry["lane"] == "accel lane"
            assert entry["end_ms"] - entry["start_ms"] == pytest.approx(stage.info["modelled_ms"])
        for dep in stage.depends_on:  # on one clock, after what it reads
            assert entry["start_ms"] >= entries[dep]["end_ms"] - 1e-9


def test_artifact_round_trip_needs_no_recompilation(av_mnist, compiled, tmp_path, monkeypatch):
    _, _, _, feeds = av_mnist
    path = compiled.save(tmp_path / "av.mmc")
    assert sorted(p.name for p in path.glob("main.*.npz")) == [f"main.{i}.npz"
                                                              for i in sorted(range(12), key=str)]
    from mmcompile.targets.accel import lowering
    monkeypatch.setattr(lowering, "lower", lambda *a, **k: pytest.fail("recompiled on load"))
    loaded = mmcompile.load(path)
    (name,) = compiled.output_names
    np.testing.assert_array_equal(loaded.run(feeds)[name], compiled.run(feeds)[name])
    before = {s.name: s.info["modelled_ms"] for s in compiled.stages if s.target == "accel"}
    after = {s.name: s.info["modelled_ms"] for s in loaded.stages if s.target == "accel"}
    assert after == before


def test_compile_quantizes_for_the_accelerator_and_stays_close_to_float(av_mnist):
    """``compile(..., target='accel', quantize='int8', calibration=...)``, with onnxruntime
    as the host (a quick build): verified against the QDQ graph, and within the int8 budget
    of the float model."""
    graph, _, calibration, feeds = av_mnist
    cm = mmcompile.compile(graph, feeds, target="accel{preset=edge-32x32,host=onnxruntime}",
                           quantize="int8", calibration=calibration, schedule="sequential")
    assert cm.metadata["verification"].startswith("ok")
    assert {s.target for s in cm.stages} == {"accel", "onnxruntime"}
    assert all(s.info["accel"]["name"] == "edge-32x32" for s in cm.stages
               if s.target == "accel")
    reference = mmcompile.reference.run_onnxruntime(graph, feeds)
    (name,) = reference
    got, want = cm.run(feeds)[name].ravel(), reference[name].ravel()
    assert float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want))) >= 0.99


def test_the_user_can_put_a_whole_branch_on_the_host(av_mnist):
    """``placement={"audio": ...}``: the audio CNN runs on the host (its weights' constant
    dequantizes follow it), the image CNN and the head on the accelerator."""
    _, qdq, _, feeds = av_mnist
    cm = mmcompile.compile(qdq, feeds, target="accel{host=onnxruntime}",
                           placement={"audio": "onnxruntime"}, schedule="sequential")
    on_accel = {layer["name"] for s in cm.stages if s.target == "accel"
                for layer in s.info["layers"]}
    assert on_accel == {"node_conv2d", "node_max_pool2d", "node_conv2d_1", "node_max_pool2d_1",
                        "node_conv2d_2", "node_linear", "node_relu_7", "node_linear_1"}
    assert cm.metadata["verification"] == "ok, max abs err 0 vs onnxruntime over 1 output(s)"


def _tiny_with_depthwise():
    """conv -> relu -> depthwise conv -> relu -> conv -> flatten -> linear (one branch)."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.b = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(16 * 4 * 4, 10)

        def forward(self, image):
            x = torch.relu(self.a(image))
            x = torch.relu(self.dw(x))
            return self.fc(torch.flatten(self.b(x), 1))

    example = {"image": torch.randn(1, 3, 8, 8)}
    graph = mmcompile.trace(Tiny().eval(), example, {"image": "image"})
    rng = np.random.default_rng(1)
    return graph, {"image": rng.standard_normal((6, 1, 3, 8, 8)).astype(np.float32)}, {
        "image": example["image"].numpy()}


def test_a_layer_it_cannot_run_in_the_middle_goes_to_the_host_with_its_reason(tmp_path):
    graph, calibration, feeds = _tiny_with_depthwise()
    spec = tmp_path / "no_gemm.toml"
    spec.write_text('name = "no-gemm"\nrows = 8\ncols = 8\ndataflow = "os"\nclock_mhz = 500\n'
                    'scratchpad_kib = 64\naccumulator_kib = 16\ndram_gbps = 8.0\n'
                    'dram_latency_cycles = 80\nops = ["Conv", "Relu", "QuantizeLinear", '
                    '"DequantizeLinear"]\n')
    cm = mmcompile.compile(graph, feeds, target="accel{host=onnxruntime}",
                           target_config={"spec": str(spec)}, quantize="int8",
                           calibration=calibration, schedule="sequential",
                           quantize_options={"max_drop": None})
    on_accel = [layer["name"] for s in cm.stages if s.target == "accel"
                for layer in s.info["layers"]]
    # the two dense convolutions around the depthwise one, and the ReLUs after them that the
    # quantizer left between two quantizations
    assert on_accel == ["node_conv2d", "node_relu", "node_relu_1", "node_conv2d_2"]
    reasons = cm.fallback_nodes()
    depthwise = [n for n, r in reasons.items()
                 if r.startswith("accel: depthwise convolution (groups=8)")]
    gemm = [n for n, r in reasons.items() if r.startswith("accel: Gemm is not among its ops")]
    assert len(depthwise) == 1 and len(gemm) == 1
    # its (de)quantize nodes stay on the host with it, saying why
    assert sum(r.startswith(f"accel: part of layer '{depthwise[0]}'")
               for r in reasons.values()) == 4  # DQ input, weights, bias; Q output
    # the accelerator stages sit before and after the host's depthwise convolution
    targets = [s.target for s in cm.stages]
    first, last = targets.index("accel"), len(targets) - 1 - targets[::-1].index("accel")
    assert "onnxruntime" in targets[first:last]
    assert cm.metadata["verification"].startswith("ok")


def test_a_float_model_is_refused_with_how_to_quantize(av_mnist):
    graph, _, _, feeds = av_mnist
    with pytest.raises(MMCompileError, match="--quantize int8 --calibration"):
        mmcompile.compile(graph, feeds, target="accel")


def test_unknown_presets_and_hosts_are_named():
    with pytest.raises(TargetError, match="one of vta-16x16, gemmini-16x16, edge-32x32"):
        mmcompile.target.resolve_target("accel{preset=edge-16x16}")
    from mmcompile.planning.placement import place
    graph, _, _ = _tiny_with_depthwise()
    with pytest.raises(TargetError, match="'host' must name another target"):
        place(graph, {}, "accel{host=accel}")


def test_a_weight_dequantize_two_stages_read_is_computed_in_each():
    """Layers sharing weights across a host op: the constant-only ``DequantizeLinear`` is
    pulled into both stages, not handed from one to the other (which would leave the second
    accelerator stage a float weight it cannot take)."""
    from helpers import make_graph
    from onnx import TensorProto, helper

    from mmcompile.planning import plan
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="w_dq"),
             helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
             helper.make_node("Sigmoid", ["a"], ["b"], name="act"),
             helper.make_node("MatMul", ["b", "w"], ["y"], name="mm2")]
    graph = make_graph(nodes, [("x", TensorProto.FLOAT, [2, 8])],
                       [("y", TensorProto.FLOAT, [2, 8])],
                       {"wq": np.arange(64, dtype=np.int8).reshape(8, 8) - 32,
                        "ws": np.array(0.01, np.float32)})
    planned = plan(graph, placement={"act": "onnxruntime"}, schedule="sequential")
    stages = planned.whole
    assert [s.target for s in stages] == ["cpu", "onnxruntime", "cpu"]
    for stage in stages:
        assert "w" not in stage.inputs and "w" not in stage.outputs
    for stage in (stages[0], stages[2]):
        assert "w_dq" in {n.name for n in stage.graph.gs.nodes}
    assert stages[2].depends_on == [stages[1].name]
