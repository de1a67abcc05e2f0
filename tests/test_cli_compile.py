"""The ``compile``, ``run``, ``inspect`` (of artifacts) and ``targets`` commands, in-process."""

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from helpers import assert_one_line_error, run_cli
from test_runtime import two_branch_graph

from mmcompile.cli import main
from mmcompile.reference import run_onnxruntime


def _main_quiet(*argv):
    """``main`` outside a test function (module fixtures cannot use capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _stages(artifact):
    return [s["name"] for s in json.loads((artifact / "manifest.json").read_text())["stages"]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("cli_compile")


@pytest.fixture(scope="module")
def onnx_path(folder):
    path = folder / "model.onnx"
    two_branch_graph().save(path)
    return path


@pytest.fixture(scope="module")
def compiled(folder, onnx_path):
    """(exit code, stdout, stderr, artifact) of ``mmcompile compile model.onnx -o model.mmc``."""
    artifact = folder / "model.mmc"
    return (*_main_quiet("compile", onnx_path, "-o", artifact), artifact)


@pytest.fixture(scope="module")
def batched(folder):
    """(exit code, stdout, artifact) of ``compile --json`` of a model with a symbolic batch,
    fixed to 2 with ``--input-shape``."""
    source = folder / "batched.onnx"
    two_branch_graph(batch="batch").save(source)
    artifact = folder / "batched.mmc"
    code, out, err = _main_quiet("compile", source, "-o", artifact, "--json", "--input-shape",
                                 "pixel_values=2,3,8,8", "--input-shape", "input_ids=2,4")
    assert code == 0, err
    return code, out, artifact


def test_compile_writes_artifact_and_prints_report(compiled):
    code, out, err, artifact = compiled
    assert code == 0, err
    stages = _stages(artifact)
    assert (artifact / "manifest.json").is_file()
    assert all((artifact / f"{name}.so").is_file() for name in stages)
    lines = out.strip().splitlines()
    assert lines[0] == "target: cpu"
    assert any(line.startswith("passes: ") for line in lines)
    for name in stages:
        assert any(line.split()[:2] == [name, "cpu"] for line in lines)
    assert any(line.startswith("verification: ok") for line in lines)
    assert lines[-1].startswith(f"wrote {artifact} in ")


def test_compile_json_with_input_shape_for_symbolic_batch(batched):
    _, out, artifact = batched
    data = json.loads(out)
    assert data["output"] == str(artifact) and data["target"] == "cpu"
    assert [s["name"] for s in data["stages"]] == _stages(artifact)
    assert data["verification"].startswith("ok")
    manifest = json.loads((artifact / "manifest.json").read_text())
    shapes = {i["name"]: i["shape"] for i in manifest["signature"]["inputs"]}
    assert shapes == {"pixel_values": [2, 3, 8, 8], "input_ids": [2, 4]}


def test_run_random_writes_outputs(capsys, tmp_path, batched):
    output = tmp_path / "out.npz"
    code, out, err = run_cli(capsys, "run", batched[2], "--random", "--output", output)
    assert code == 0, err
    with np.load(output) as data:
        assert sorted(data.files) == ["features", "logits"]
        assert data["logits"].shape == (2, 5) and data["features"].shape == (2, 16)
    assert any(line.startswith("logits") for line in out.splitlines())
    assert f"wrote {output}" in out


def test_run_inputs_match_onnxruntime(capsys, tmp_path, compiled):
    inputs, output = tmp_path / "in.npz", tmp_path / "out.npz"
    rng = np.random.default_rng(9)
    feeds = {"pixel_values": rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
             "input_ids": np.array([[0, 9, 3, 3]], np.int64)}
    np.savez(inputs, **feeds)
    code, out, err = run_cli(capsys, "run", compiled[3], "--inputs", inputs, "--output", output,
                          "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["outputs"]["logits"]["shape"] == [1, 5] and summary["runs"] == 1
    expected = run_onnxruntime(two_branch_graph(), feeds)
    with np.load(output) as got:
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5)


def test_run_wrong_shape_is_one_line_error_and_writes_nothing(capsys, tmp_path, compiled):
    inputs, output = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inputs, pixel_values=np.zeros((1, 3, 9, 8), np.float32),
             input_ids=np.zeros((1, 4), np.int64))
    code, out, err = run_cli(capsys, "run", compiled[3], "--inputs", inputs, "--output", output)
    assert code == 1
    assert_one_line_error(err, "'pixel_values'", "dim 2: 9 != 8")
    assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz"]


def test_run_token_id_out_of_range_is_exit_1(capsys, tmp_path, compiled):
    inputs = tmp_path / "in.npz"
    np.savez(inputs, pixel_values=np.zeros((1, 3, 8, 8), np.float32),
             input_ids=np.array([[1, 2, 3, 10]], np.int64))
    code, _, err = run_cli(capsys, "run", compiled[3], "--inputs", inputs)
    assert code == 1
    assert_one_line_error(err, "'input_ids'", "[0, 10)")


@pytest.mark.parametrize("flags, message", [([], "no inputs: give --inputs"),
                                            (["--random", "--inputs", "x.npz"],
                                             "either --inputs or --random")])
def test_run_needs_exactly_one_input_source(capsys, compiled, flags, message):
    code, out, err = run_cli(capsys, "run", compiled[3], *flags)
    assert code == 1 and out == ""
    assert_one_line_error(err, message)


def test_inspect_artifact(capsys, compiled):
    code, out, _ = run_cli(capsys, "inspect", compiled[3])
    assert code == 0
    assert out.startswith(f"{compiled[3]}: compiled model for target 'cpu'")
    inputs = out.split("inputs:")[1].split("outputs:")[0]
    assert any(line.split()[0] == "pixel_values" and "image" in line
               for line in inputs.strip().splitlines()[2:])
    ids = next(line for line in inputs.splitlines() if line.startswith("input_ids"))
    assert "text" in ids and ids.split()[-1] == "10"
    stages = out.split("stages (placement")[1].split("schedule:")[0]
    for name in _stages(compiled[3]):
        assert any(line.split()[:2] == [name, "cpu"] and f"{name}.so" in line
                   and "the requested target" in line for line in stages.splitlines())
    assert "verification at compile time: ok" in out


def test_inspect_artifact_json(capsys, compiled):
    code, out, _ = run_cli(capsys, "inspect", compiled[3], "--json")
    assert code == 0
    manifest = json.loads(out)
    assert manifest["target"] == "cpu"
    assert [s["name"] for s in manifest["stages"]] == _stages(compiled[3])
    assert [i["name"] for i in manifest["signature"]["inputs"]] == ["pixel_values", "input_ids"]


def test_targets_lists_cpu_cuda_onnxruntime_and_their_options(capsys):
    code, out, _ = run_cli(capsys, "targets")
    assert code == 0
    table = out.split("\n\n")[0]
    assert {line.split()[0] for line in table.strip().splitlines()[2:]} >= {"cpu", "cuda",
                                                                          "onnxruntime"}
    options = out.split("options (")[1]
    assert any(line.split()[:3] == ["cpu", "winograd", "bool"] for line in options.splitlines())
    assert any(line.split()[:3] == ["cuda", "arch", "str"] for line in options.splitlines())
    code, out, _ = run_cli(capsys, "targets", "--json")
    info = json.loads(out)
    assert code == 0 and {"cpu", "cuda", "onnxruntime"} <= set(info)
    assert {"name": "winograd", "type": "bool", "default": True} .items() <= \
        next(o for o in info["cpu"]["options"] if o["name"] == "winograd").items()
    assert info["cpu"]["pipeline"] == "legalize-for-tvm" and info["cuda"]["device"] == "cuda"


def test_compile_corrupt_onnx_is_exit_1_and_writes_nothing(capsys, tmp_path):
    model = tmp_path / "bad.onnx"
    model.write_bytes(b"\x08\x07garbage that is not a protobuf")
    code, out, err = run_cli(capsys, "compile", model, "-o", tmp_path / "bad.mmc")
    assert code == 1 and out == ""
    assert_one_line_error(err, str(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_compile_unknown_target_is_exit_1(capsys, tmp_path, onnx_path):
    code, _, err = run_cli(capsys, "compile", onnx_path, "-o", tmp_path / "x.mmc", "--target", "tpu")
    assert code == 1
    assert_one_line_error(err, "unknown target 'tpu'", "cpu", "cuda")
    assert list(tmp_path.iterdir()) == []


def test_run_tampered_artifact_is_exit_1(capsys, tmp_path, compiled):
    artifact = shutil.copytree(compiled[3], tmp_path / "model.mmc")
    with open(artifact / f"{_stages(artifact)[-1]}.so", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, out, err = run_cli(capsys, "run", artifact, "--random")
    assert code == 1
    assert_one_line_error(err, ".so does not match its SHA-256")
    assert out == ""


@pytest.mark.parametrize("command", ["compile", "optimize", "run --output", "run --timeline",
                                     "inspect --draw"])
def test_writing_into_a_folder_that_cannot_be_made_is_exit_1(command, capsys, tmp_path,
                                                             onnx_path, compiled):
    # a file where a folder should be: no such folder can be made (as root too)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    where = blocker / "sub" / "out"
    argv = {"compile": ["compile", onnx_path, "-o", where, "--no-verify"],
            "optimize": ["optimize", onnx_path, "-o", where],
            "run --output": ["run", compiled[3], "--random", "--output", f"{where}.npz"],
            "run --timeline": ["run", compiled[3], "--random", "--timeline", f"{where}.png"],
            "inspect --draw": ["inspect", onnx_path, "--draw", f"{where}.png"]}[command]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1, err
    assert_one_line_error(err, "cannot write", str(blocker))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
