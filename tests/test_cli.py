"""The ``mmcompile`` command line, run in-process (plus one check of the console script)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import FLOAT, INT64, assert_one_line_error, run_cli
from onnx import helper

from mmcompile.cli import main

PASSES = "fold-constants,eliminate-dead-code"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """An image branch and a text branch joined by an Add; ``w + w`` is foldable."""
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values", "img_axes"], ["img"], keepdims=0),
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=FLOAT),
        helper.make_node("ReduceMean", ["ids_f", "txt_axes"], ["txt"], keepdims=0),
        helper.make_node("Add", ["img", "txt"], ["joint"]),
        helper.make_node("Add", ["w", "w"], ["w2"]),
        helper.make_node("Mul", ["joint", "w2"], ["out"]),
    ]
    init = [onnx.numpy_helper.from_array(v, k) for k, v in {
        "img_axes": np.array([1, 2, 3], np.int64), "txt_axes": np.array([1], np.int64),
        "w": np.ones(1, np.float32)}.items()]
    graph = helper.make_graph(
        nodes, "two-branch",
        [helper.make_tensor_value_info("pixel_values", FLOAT, [1, 3, 4, 4]),
         helper.make_tensor_value_info("input_ids", INT64, [1, 5])],
        [helper.make_tensor_value_info("out", FLOAT, [1])], initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path_factory.mktemp("cli") / "two.onnx"
    onnx.save_model(model, path)
    return path






# -- optimize -----------------------------------------------------------------------------------

def test_optimize_writes_output_and_prints_report(capsys, tmp_path, model_path):
    output = tmp_path / "opt.onnx"
    code, out, err = run_cli(capsys, "optimize", model_path, "-o", output, "--passes", PASSES,
                          "--report")
    assert code == 0, err
    onnx.checker.check_model(str(output), full_check=True)
    assert [n.op_type for n in onnx.load(output).graph.node].count("Add") == 1
    assert f"pipeline: {PASSES}" in out
    assert "nodes_folded=1" in out and "TOTAL" in out
    assert out.strip().splitlines()[-1] == f"wrote {output}: 6 -> 5 nodes"


def test_optimize_without_report_prints_one_line(capsys, tmp_path, model_path):
    output = tmp_path / "opt.onnx"
    code, out, _ = run_cli(capsys, "optimize", model_path, "-o", output, "--passes", PASSES)
    assert code == 0
    assert out.strip() == f"wrote {output}: 6 -> 5 nodes"


def test_optimize_json(capsys, tmp_path, model_path):
    output = tmp_path / "opt.onnx"
    code, out, _ = run_cli(capsys, "optimize", model_path, "-o", output, "--passes", PASSES, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["output"] == str(output)
    assert (data["nodes_before"], data["nodes_after"]) == (6, 5)
    assert [p["name"] for p in data["passes"]] == ["fold-constants", "eliminate-dead-code"]
    assert output.is_file()


def test_optimize_disable_and_dump_ir(capsys, tmp_path, model_path):
    dumps = tmp_path / "dumps"
    code, out, _ = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "opt.onnx", "--passes",
                        PASSES, "--disable", "fold-constants", "--dump-ir", dumps, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["passes"][0]["skipped"] == "disabled"
    assert data["nodes_before"] == data["nodes_after"] == 6
    assert list(dumps.iterdir()) == []  # nothing changed, nothing dumped


def test_optimize_preserves_modality_tags(capsys, tmp_path, model_path):
    output = tmp_path / "opt.onnx"
    assert run_cli(capsys, "optimize", model_path, "-o", output, "--passes", "none",
                "--modality", "input_ids=tabular")[0] == 0
    code, out, _ = run_cli(capsys, "inspect", output, "--json")
    inputs = {i["name"]: i for i in json.loads(out)["inputs"]}
    assert inputs["input_ids"]["modality"] == "tabular"
    assert inputs["input_ids"]["reason"] == "explicit mapping"


@pytest.mark.parametrize("content", ["text", "missing"])
def test_bad_model_file_is_a_one_line_error_and_writes_nothing(capsys, tmp_path, content):
    model = tmp_path / "bad.onnx"
    if content == "text":
        model.write_text("not a model\n")
    output = tmp_path / "out.onnx"
    code, out, err = run_cli(capsys, "optimize", model, "-o", output, "--passes", PASSES)
    assert code == 1
    assert_one_line_error(err, str(model))
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["bad.onnx"] if content == "text" else [])


def test_unknown_pass_is_exit_1(capsys, tmp_path, model_path):
    output = tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", output, "--passes",
                        "fold-constants,no-such-pass")
    assert code == 1
    assert_one_line_error(err, "unknown pass 'no-such-pass'")
    assert not output.exists()


def test_bad_pipeline_syntax_is_exit_1(capsys, tmp_path, model_path):
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "--passes",
                        "fold-constants{size_threshold}")
    assert code == 1
    assert_one_line_error(err, "column")


@pytest.mark.parametrize("shape", ["pixel_values", "pixel_values=1,x", "=1,3", "pixel_values="])
def test_malformed_input_shape_is_exit_1(capsys, tmp_path, model_path, shape):
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "--passes",
                        PASSES, "--input-shape", shape)
    assert code == 1
    assert_one_line_error(err, "NAME=D0,D1", shape)


def test_input_shape_for_unknown_input_is_exit_1(capsys, tmp_path, model_path):
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "o.onnx", "--passes",
                        PASSES, "--input-shape", "nope=1,2")
    assert code == 1
    assert_one_line_error(err, "'nope'", "pixel_values")


def test_modality_for_missing_input_is_exit_1(capsys, tmp_path, model_path):
    output = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", output, "--passes", PASSES,
                        "--modality", "x=image")
    assert code == 1
    assert_one_line_error(err, "['x']", "['pixel_values', 'input_ids']")
    assert not output.exists()


def test_output_in_missing_directory_is_exit_1(capsys, tmp_path, model_path):
    code, _, err = run_cli(capsys, "optimize", model_path, "-o", tmp_path / "nope" / "o.onnx",
                        "--passes", PASSES)
    assert code == 1
    assert_one_line_error(err, "cannot write")


def test_missing_output_is_usage_error_exit_2(capsys, model_path):
    with pytest.raises(SystemExit) as info:
        main(["optimize", str(model_path)])
    assert info.value.code == 2
    assert "-o/--output" in capsys.readouterr().err


def test_bad_opt_level_is_usage_error_exit_2(capsys, tmp_path, model_path):
    with pytest.raises(SystemExit) as info:
        main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "-O", "7"])
    assert info.value.code == 2


# -- inspect / passes ---------------------------------------------------------------------------

def test_inspect_prints_inputs_with_modality_reason_and_branches(capsys, model_path):
    code, out, _ = run_cli(capsys, "inspect", model_path)
    assert code == 0
    assert out.startswith("two.onnx: opset 18, 6 nodes")
    inputs = out.split("inputs:")[1].split("outputs:")[0]
    pixel = next(line for line in inputs.splitlines() if line.startswith("pixel_values"))
    assert "image" in pixel and "name 'pixel_values' contains 'pixel'" in pixel
    ids = next(line for line in inputs.splitlines() if line.startswith("input_ids"))
    assert "text" in ids and "name 'input_ids' contains 'input_ids'" in ids
    branches = out.split("branches")[1].split("\n\n")[0]  # up to the next section
    rows = {line.split()[0] for line in branches.strip().splitlines()[3:]}
    assert rows == {"image", "text", "fusion", "constant"}


def test_inspect_json(capsys, model_path):
    code, out, _ = run_cli(capsys, "inspect", model_path, "--json", "--modality", "pixel_values=video")
    assert code == 0
    info = json.loads(out)
    assert info["nodes"] == 6 and info["opset"] == 18
    assert [(i["name"], i["modality"]) for i in info["inputs"]] == [("pixel_values", "video"),
                                                                   ("input_ids", "text")]
    assert info["inputs"][0]["shape"] == [1, 3, 4, 4]
    assert info["branches"]["video"]["nodes"] == 1
    assert info["branches"]["text"]["nodes"] == 2
    assert info["branches"]["fusion"]["nodes"] == 2


def test_passes_lists_builtin_passes_and_pipelines(capsys):
    code, out, _ = run_cli(capsys, "passes")
    assert code == 0
    assert any(line.startswith("fold-constants ") for line in out.splitlines())
    assert "size_threshold=" in out
    assert "pipeline 'none': (no passes)" in out


def test_passes_json(capsys):
    code, out, _ = run_cli(capsys, "passes", "--json")
    assert code == 0
    data = json.loads(out)
    fold = next(p for p in data["passes"] if p["name"] == "fold-constants")
    assert fold["opt_level"] == 1
    assert "default" in data["pipelines"]


# -- the console script -------------------------------------------------------------------------

def test_console_script_help_mentions_exit_codes():
    script = Path(sys.executable).with_name("mmcompile")
    assert script.is_file(), "the mmcompile console script is not installed"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "exit codes:" in proc.stdout
    for line in ["0  success", "1  the input was at fault", "2  bad command-line usage",
                 "3  internal error"]:
        assert line in proc.stdout
