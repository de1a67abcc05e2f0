"""The accelerator from the command line: ``targets`` lists the presets, ``compile --target
accel{...}`` / ``--accel-spec``, ``inspect`` shows the modelled layers, ``run`` runs the
artifact, ``explore`` sweeps descriptions; bad descriptions are one-line errors (exit 1)."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import assert_one_line_error, run_cli
from test_accel_target import av_mnist_files

NPU = """name = "my-npu"
rows = 16
cols = 16
dataflow = "os"
clock_mhz = 600
scratchpad_kib = 128
accumulator_kib = 32
dram_gbps = 12.8
dram_latency_cycles = 120
ops = ["Conv", "MatMul", "Gemm", "Relu", "Clip", "QuantizeLinear", "DequantizeLinear"]
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """AV-MNIST as ONNX, calibration samples, one input and a description file."""
    folder = tmp_path_factory.mktemp("accel_cli")
    for name in ("av.onnx", "calib.npz", "x.npz"):
        shutil.copy(av_mnist_files() / name, folder / name)
    (folder / "my_npu.toml").write_text(NPU)
    return folder


def test_targets_lists_the_presets_and_their_parameters(capsys):
    code, out, _ = run_cli(capsys, "targets")
    assert code == 0
    assert "accel presets" in out
    for fragment in ("vta-16x16", "gemmini-16x16", "edge-32x32", "32x32", "25.6", "1638.4"):
        assert fragment in out
    code, out, _ = run_cli(capsys, "targets", "--json")
    accel = json.loads(out)["accel"]
    assert [p["preset"] for p in accel["catalog"]] == ["vta-16x16", "gemmini-16x16",
                                                       "edge-32x32"]
    assert {o["name"] for o in accel["options"]} == {"preset", "spec", "host", "branch_moves"}


def test_compile_for_a_preset_then_inspect_and_run(files, capsys, monkeypatch):
    """(onnxruntime as the host keeps the build quick; test_accel_target.py builds the cpu
    host's stages.)"""
    # 'run' selects TVM's runtime-only library for a process that has not loaded TVM (this
    # one has not: no cpu stage here); keep it from doing so for the tests after this one
    monkeypatch.setenv("TVM_USE_RUNTIME_LIB", "0")
    out_dir = files / "av.mmc"
    code, out, err = run_cli(capsys, "compile", files / "av.onnx", "-o", out_dir, "--target",
                             "accel{preset=edge-32x32,host=onnxruntime}", "--calibration",
                             files / "calib.npz",
                             "--inputs", files / "x.npz", "--schedule", "sequential")
    assert code == 0, err
    # the CNN branches whole (12 layers: pools included), then the head (Gemm, ReLU, Gemm)
    assert "edge-32x32: 12 layer(s)" in out and "edge-32x32: 3 layer(s)" in out
    assert "verification: ok" in out
    code, out, _ = run_cli(capsys, "inspect", out_dir)
    assert code == 0
    assert "modelled layers (the accelerator's cycle model" in out
    for header in ("cycles", "utilization", "DRAM bytes", "energy uJ", "node_conv2d_3"):
        assert header in out
    assert "node_mean" in out and "ReduceMean is not a quantized" in out  # placement
    assert "pool 196x4x16" in out  # a pooling layer's shape
    timeline = files / "t.png"
    code, out, _ = run_cli(capsys, "run", out_dir, "--inputs", files / "x.npz", "--json",
                           "--timeline", timeline)
    summary = json.loads(out)
    assert code == 0 and summary["outputs"]
    assert 0 < summary["modelled_accel_ms"] < summary["modelled_ms"]
    assert timeline.stat().st_size > 0


def test_compile_with_a_description_file(files, capsys):
    out_dir = files / "npu.mmc"
    code, _, err = run_cli(capsys, "compile", files / "av.onnx", "-o", out_dir, "--target",
                           "accel", "--accel-spec", files / "my_npu.toml",
                           "--target-option", "host=onnxruntime", "--calibration",
                           files / "calib.npz", "--schedule", "sequential", "--json")
    assert code == 0, err
    manifest = json.loads((out_dir / "manifest.json").read_text())
    accel = [s for s in manifest["stages"] if s["target"] == "accel"]
    assert accel and all(s["info"]["accel"]["name"] == "my-npu" for s in accel)
    assert all(s["info"]["accel"]["dataflow"] == "os" for s in accel)
    assert {s["target"] for s in manifest["stages"]} == {"accel", "onnxruntime"}


@pytest.mark.parametrize(("text", "fragments"), [
    (NPU.replace("rows = 16", "rows = -16"), ("field 'rows'", "must be positive")),
    (NPU.replace("dataflow", "dataflw"), ("unknown field", "did you mean 'dataflow'")),
    (NPU.replace("scratchpad_kib = 128", "scratchpad_kib = 0.1"), ("field 'scratchpad_kib'",)),
])
def test_an_invalid_description_is_a_one_line_error(files, capsys, tmp_path, text, fragments):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    code, _, err = run_cli(capsys, "compile", files / "av.onnx", "-o", tmp_path / "m.mmc",
                           "--target", "accel", "--accel-spec", bad, "--calibration",
                           files / "calib.npz")
    assert code == 1
    assert_one_line_error(err, str(bad), *fragments)
    assert not (tmp_path / "m.mmc").exists()


def test_a_float_model_is_refused_with_how_to_quantize(files, capsys, tmp_path):
    code, _, err = run_cli(capsys, "compile", files / "av.onnx", "-o", tmp_path / "m.mmc",
                           "--target", "accel")
    assert code == 1
    assert_one_line_error(err, "not quantized", "--quantize int8 --calibration")
    code, _, err = run_cli(capsys, "compile", files / "av.onnx", "-o", tmp_path / "m.mmc",
                           "--target", "accel{preset=edge-16x16}")
    assert code == 1
    assert_one_line_error(err, "option 'preset' expects one of", "edge-32x32")


def test_explore_sweeps_descriptions_and_marks_the_pareto_front(files, capsys, tmp_path):
    plot = tmp_path / "pareto.png"
    code, out, err = run_cli(capsys, "explore", files / "av.onnx", "--calibration",
                             files / "calib.npz", "--sweep", "rows=8,32 cols=16 sram_kib=1,256",
                             "--plot", plot, "--json")
    assert code == 0, err
    points = json.loads(out)["points"]
    assert len(points) == 4
    invalid = [p["overrides"] for p in points if p["error"]]
    assert invalid == [{"rows": 32, "cols": 16, "scratchpad_kib": 1}]  # no 32x16 tile fits
    assert "cannot hold one" in next(p["error"] for p in points if p["error"])
    valid = {(p["overrides"]["rows"], p["overrides"]["scratchpad_kib"]): p
             for p in points if not p["error"]}
    assert all(p["latency_ms"] > 0 and p["energy_uj"] > 0 and p["layers"] == 15
               for p in valid.values())
    assert valid[32, 256]["latency_ms"] < valid[8, 256]["latency_ms"]  # more rows: faster
    assert valid[8, 1]["pareto"] and valid[32, 256]["pareto"]  # smallest; fastest
    assert plot.stat().st_size > 0
    code, out, _ = run_cli(capsys, "explore", files / "av.onnx", "--calibration",
                           files / "calib.npz", "--sweep", "rows=8,16")
    assert code == 0 and "Pareto front" in out and "pareto" in out.splitlines()[0]
    code, _, err = run_cli(capsys, "explore", files / "av.onnx", "--calibration",
                           files / "calib.npz", "--sweep", "rowz=8,16")
    assert code == 1
    assert_one_line_error(err, "unknown field", "did you mean 'rows'")
    code, _, err = run_cli(capsys, "explore", files / "av.onnx", "--sweep", "rows=8,16")
    assert code == 1
    assert_one_line_error(err, "is not quantized", "--calibration")
