"""``mmcompile bench``: the suite models, the FLOP counter, the harness and the command line.

Runs are tiny (``--repeat 3``, batch 1 or 2); the numbers are not checked, the schema, the
output check and the error paths are.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from helpers import FLOAT, assert_one_line_error, make_graph, run_cli
from onnx import helper

from mmcompile.bench import harness, runner, suite
from mmcompile.flops import count_flops
from mmcompile.bench.results import ROW_KEYS
from mmcompile.targets.onnxruntime import int8_exact

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"






def _mlp(path, batch_dim):
    """x[batch, 16] -> MatMul(16x8) -> Add -> Relu, saved at ``path``."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
         helper.make_node("Relu", ["a"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", FLOAT, [batch_dim, 16])],
        [helper.make_tensor_value_info("y", FLOAT, [batch_dim, 8])],
        initializer=[onnx.numpy_helper.from_array(rng.standard_normal((16, 8), np.float32), "w"),
                     onnx.numpy_helper.from_array(rng.standard_normal(8, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    return _mlp(tmp_path_factory.mktemp("bench") / "mlp.onnx", "batch")


# -- suite and FLOPs ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", suite.SUITES["multimodal"])
def test_suite_models_build_deterministically_and_run(name):
    module, inputs = suite.build(name, 2)
    again, _ = suite.build(name, 2)
    assert suite.num_parameters(module) > 0
    with torch.inference_mode():
        out, out_again = module(**inputs), again(**inputs)
    outs = out if isinstance(out, tuple) else (out,)
    outs_again = out_again if isinstance(out_again, tuple) else (out_again,)
    for a, b in zip(outs, outs_again):
        assert a.shape[0] == 2 and torch.isfinite(a).all()
        assert torch.equal(a, b)  # what the torch engines' children rebuild is what was exported


def test_suite_export_counts_flops_like_torch(tmp_path):
    # av_mnist is convolutions and linears only, which torch's FlopCounterMode counts fully.
    graph, module, inputs = suite.export("av_mnist", 1, tmp_path / "av.onnx")
    from torch.utils.flop_counter import FlopCounterMode
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(**inputs)
    flops = count_flops(graph)
    assert flops.total == counter.get_total_flops() > 0
    assert not flops.uncounted
    assert (tmp_path / "av.onnx").is_file()


def test_flop_counter_on_a_hand_built_graph():
    graph = make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Flatten", ["c"], ["f"]),
         helper.make_node("Gemm", ["f", "g"], ["y"], transB=1),
         helper.make_node("MatMul", ["y", "m"], ["z"])],
        [("x", FLOAT, [2, 3, 8, 8])], [("z", FLOAT, [2, 5])],
        {"w": np.ones((4, 3, 3, 3), np.float32), "g": np.ones((10, 256), np.float32),
         "m": np.ones((10, 5), np.float32)})
    flops = count_flops(graph)
    conv = 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3)
    assert flops.by_op == {"Conv": conv, "Gemm": 2 * 2 * 10 * 256, "MatMul": 2 * 2 * 5 * 10}
    assert flops.total == sum(flops.by_op.values())


def test_unknown_suite_model_is_a_bench_error():
    with pytest.raises(Exception, match="unknown suite model 'nope'; known models: av_mnist"):
        suite.build("nope", 1)


# -- the command ---------------------------------------------------------------------------------

def test_bench_suite_model_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "sub" / "results.json", tmp_path / "results.png"
    code, out, err = run_cli(capsys, "bench", "--suite", "multimodal", "--models", "clip",
                          "--batch", "1", "--repeat", "3", "--against", "onnxruntime",
                          "--json", out_json, "--plot", out_png)
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert {"cpu", "cores", "threads", "versions"} <= set(doc["machine"])
    assert doc["machine"]["versions"]["onnxruntime"]
    rows = doc["results"]
    assert [r["engine"] for r in rows] == ["mmcompile", "onnxruntime"]
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        assert row["model"] == "clip" and row["batch"] == 1
        assert row["match"] is True, row
        assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["compile_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["params"] == 973_313 and row["flops"] > 0
    assert rows[1]["ratio_vs_onnxruntime"] == 1.0
    assert set(rows[1]["variants"]) == {"sequential", "parallel"}
    assert math.isclose(doc["summary"]["geomean_ratio_vs_onnxruntime"]["mmcompile"]["1"],
                        rows[0]["ratio_vs_onnxruntime"])
    assert out_png.read_bytes().startswith(PNG_MAGIC)
    assert "clip" in out and "vs ORT" in out and "geometric mean" in out
    assert "exported clip at batch 1" in err


def test_bench_model_file(mlp_file, tmp_path, capsys):
    out_json = tmp_path / "file.json"
    # onnxruntime only, to stay quick: the mmcompile engine runs in the two tests around this.
    code, out, err = run_cli(capsys, "bench", mlp_file, "--batch", "1,2", "--repeat", "3",
                          "--engines", "onnxruntime", "--json", out_json, "-q")
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert [(r["model"], r["batch"], r["engine"], r["match"]) for r in doc["results"]] == [
        ("mlp.onnx", 1, "onnxruntime", True), ("mlp.onnx", 2, "onnxruntime", True)]
    assert doc["models"][0]["flops"] == {"1": 2 * 16 * 8, "2": 2 * 2 * 16 * 8}
    assert doc["models"][0]["params"] == 16 * 8 + 8
    assert "graph optimizations off" in doc["settings"]["reference"]
    assert err == ""


def test_bench_int8_engines_run_one_qdq_file_and_report_accuracy_against_float(
        mlp_file, tmp_path, capsys):
    out_json = tmp_path / "int8.json"
    code, out, err = run_cli(capsys, "bench", mlp_file, "--batch", "2", "--repeat", "3",
                             "--engines", "onnxruntime,onnxruntime-int8,mmcompile-int8",
                             "--json", out_json, "-q")
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    rows = {r["engine"]: r for r in doc["results"]}
    for engine in ("onnxruntime-int8", "mmcompile-int8"):
        row = rows[engine]
        if engine == "mmcompile-int8" or int8_exact():  # else onnxruntime's kernels saturate
            assert row["match"], row.get("error")  # against the QDQ file's own outputs
        assert row["accuracy_vs_float"]["y"]["cosine"] > 0.99
        assert row["quantization"]["layers_int8"] == 1
        assert row["ratio_vs_onnxruntime_int8"] is not None
        held = row["quantization"]["held_back"]  # 200 input sets, apart from calibration
        assert held["samples"] == 200
        assert 0.99 < held["outputs"]["y"]["cosine"] <= 1.0
        assert 0.9 <= held["outputs"]["y"]["top1"] <= 1.0  # 8 classes per row
    assert "ratio_vs_onnxruntime_int8" not in rows["onnxruntime"]
    assert "mmcompile-int8" in doc["summary"]["geomean_ratio_vs_onnxruntime_int8"]
    assert "accuracy against the float model" in out
    assert "top-1, 200 sets" in out


def test_a_model_the_quantizer_refuses_fails_its_int8_rows_not_the_run(mlp_file, tmp_path,
                                                                        capsys, monkeypatch):
    # Magika did this to a corpus run: onnxruntime's quantizer raised, and no model got a row.
    from mmcompile.bench import harness
    from mmcompile.quantize import QuantizationError

    def refuse(onnx_path, *args):
        raise QuantizationError(f"onnxruntime's quantizer failed on {onnx_path.stem}: boom")
    monkeypatch.setattr(harness, "quantize_workload", refuse)
    out_json = tmp_path / "refused.json"
    code, out, err = run_cli(capsys, "bench", mlp_file, "--repeat", "3",
                             "--engines", "onnxruntime,mmcompile-int8", "--json", out_json, "-q")
    assert code == 0, err
    rows = {r["engine"]: r for r in json.loads(out_json.read_text())["results"]}
    assert rows["onnxruntime"]["match"] and rows["onnxruntime"]["median_ms"] > 0
    failed = rows["mmcompile-int8"]
    assert failed["median_ms"] is None and not failed["match"]
    assert failed["error"].startswith("quantization failed: onnxruntime's quantizer failed on mlp")
    assert failed["error"].endswith(": boom")
    assert "quantization failed" in out


def test_rounds_run_each_engine_in_several_processes_and_report_the_median(mlp_file, tmp_path,
                                                                           capsys):
    out_json = tmp_path / "rounds.json"
    code, out, err = run_cli(capsys, "bench", mlp_file, "--repeat", "3", "--rounds", "3",
                          "--engines", "onnxruntime", "--json", out_json, "-q")
    assert code == 0, err
    (row,) = json.loads(out_json.read_text())["results"]
    assert len(row["rounds_ms"]) == 3 and all(m > 0 for m in row["rounds_ms"])
    assert row["median_ms"] == sorted(row["rounds_ms"])[1]


def test_each_round_gets_its_own_inductor_cache(tmp_path):
    from mmcompile.bench.harness import BenchOptions, Workload, make_job
    w = Workload("m", 1, tmp_path / "m.onnx", tmp_path / "in.npz", {}, 0, 0)
    jobs = [make_job(w, "torch-compile", "default", BenchOptions(["torch-compile"]), 2, tmp_path, r)
            for r in range(3)]
    assert len({j["inductor_cache"] for j in jobs}) == 3


def test_median_round_skips_failed_rounds():
    from mmcompile.bench.results import median_round
    ok = [{"median_ms": m, "match": True} for m in (3.0, 1.0, 2.0, 4.0)]
    failed = {"median_ms": None, "match": False, "error": "killed"}
    assert median_round([*ok, failed])["median_ms"] == 2.0  # lower middle of 1, 2, 3, 4
    assert median_round([failed, failed])["error"] == "killed"
    assert median_round(ok[:1]) is ok[0]


def _lstm(path):
    """x[batch, 6, 4] -> LSTM (hidden 3) -> last hidden state [batch, 3]: onnxruntime runs it;
    the cpu target lowers LSTMs itself, but not one with ``clip``."""
    rng = np.random.default_rng(0)
    weights = {"W": rng.standard_normal((1, 12, 4), np.float32),
               "R": rng.standard_normal((1, 12, 3), np.float32),
               "axes": np.array([0], np.int64)}
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
         helper.make_node("LSTM", ["t", "W", "R"], ["", "h"], hidden_size=3, clip=10.0),
         helper.make_node("Squeeze", ["h", "axes"], ["y"])], "lstm",
        [helper.make_tensor_value_info("x", FLOAT, ["batch", 6, 4])],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", 3])],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save_model(model, path)
    return path


def test_a_failing_engine_is_a_row_and_the_others_go_on(tmp_path, capsys):
    out_json = tmp_path / "lstm.json"
    # native lowering only: the LSTM has no TVM converter and no fallback may take it
    code, out, err = run_cli(capsys, "bench", _lstm(tmp_path / "lstm.onnx"), "--repeat", "3",
                          "--json", out_json, "-q", "--fallback", "none")
    assert code == 0, err
    failed, ok = json.loads(out_json.read_text())["results"]
    assert failed["engine"] == "mmcompile" and failed["match"] is False
    assert failed["median_ms"] is None and "unsupported op 'LSTM'" in failed["error"]
    assert ok["engine"] == "onnxruntime" and ok["match"] is True
    assert ok["ratio_vs_onnxruntime"] == 1.0 and failed["ratio_vs_onnxruntime"] is None
    assert "problems:" in out and "unsupported op 'LSTM'" in out


def test_the_default_fallback_runs_what_the_target_cannot(tmp_path, capsys):
    out_json = tmp_path / "lstm.json"
    code, _, err = run_cli(capsys, "bench", _lstm(tmp_path / "lstm.onnx"), "--repeat", "3",
                           "--json", out_json, "-q")
    assert code == 0, err
    rows = {r["engine"]: r for r in json.loads(out_json.read_text())["results"]}
    assert rows["mmcompile"]["match"] is True and rows["mmcompile"]["median_ms"] > 0
    assert rows["mmcompile"]["fallback_nodes"] == 1
    assert "onnxruntime" in rows["mmcompile"]["detail"]


def test_an_engine_process_over_its_timeout_is_killed(mlp_file, tmp_path):
    job = {"engine": "onnxruntime", "variant": "sequential", "onnx": str(mlp_file),
           "inputs": str(tmp_path / "in.npz"), "outputs": str(tmp_path / "out.npz"),
           "result": str(tmp_path / "result.json"), "log": str(tmp_path / "log"), "threads": 1,
           "repeat": 3, "warmup": 0, "max_time": 1.0, "min_runs": 1,
           "inductor_cache": str(tmp_path / "inductor")}
    np.savez(job["inputs"], x=np.zeros((1, 16), np.float32))
    [result] = harness.run_lockstep([job], timeout=0.01)  # Python alone takes longer to start
    assert result["error"] == "timed out after 0.01s"


def test_engines_of_one_workload_take_turns_in_lockstep(mlp_file, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 16), np.float32))

    def job(variant):
        stem = tmp_path / variant
        return {"engine": "onnxruntime", "variant": variant, "onnx": str(mlp_file),
                "inputs": str(tmp_path / "in.npz"), "outputs": f"{stem}.npz",
                "result": f"{stem}.json", "log": f"{stem}.log", "threads": 1, "repeat": 40,
                "warmup": 0, "max_time": 60.0, "min_runs": 1,
                "inductor_cache": f"{stem}.inductor"}
    first, second = harness.run_lockstep([job("sequential"), job("parallel")], timeout=120)
    assert len(first["times_ms"]) == len(second["times_ms"]) == 40
    # 10 turns of 4 calls each: every turn runs each engine once (a b, b a, a b, ...: the
    # order rotates), so each engine's slices are spread over the same stretch of time
    a, b = first["slice_starts"], second["slice_starts"]
    assert len(a) == len(b) == harness.SLICES
    order = [name for _, name in sorted([(t, "a") for t in a] + [(t, "b") for t in b])]
    turns = [set(order[i:i + 2]) for i in range(0, len(order), 2)]
    assert turns == [{"a", "b"}] * harness.SLICES, order
    assert order[:4] == ["a", "b", "b", "a"]


def test_runner_reports_an_engine_exception_as_an_error_result(tmp_path):
    job = {"engine": "onnxruntime", "variant": "sequential", "onnx": str(tmp_path / "missing.onnx"),
           "inputs": str(tmp_path / "in.npz"), "outputs": str(tmp_path / "out.npz"),
           "result": str(tmp_path / "result.json"), "threads": 1, "repeat": 3, "warmup": 0,
           "max_time": 1.0, "min_runs": 1}
    np.savez(job["inputs"], x=np.zeros((1, 16), np.float32))
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert runner.main(["runner.py", str(tmp_path / "job.json")]) == 1
    result = json.loads((tmp_path / "result.json").read_text())
    assert "missing.onnx" in result["error"] and "\n" not in result["error"]


@pytest.mark.parametrize("argv, fragments", [
    (["--batch", "1,x"], ["--batch expects comma-separated positive integers", "'1,x'"]),
    (["--batch", "0"], ["--batch expects"]),
    (["--models", "nope"], ["unknown suite model 'nope'", "av_mnist"]),
    (["--against", "tensorrt"], ["unknown engine 'tensorrt'", "torch-compile"]),
    (["--repeat", "0"], ["--repeat must be at least 1"]),
    (["--rounds", "0"], ["--rounds must be at least 1"]),
    (["--baseline", "/nonexistent"], ["--baseline /nonexistent", "not a checkout of mmcompile"]),
    (["--engines", "mmcompile-baseline"], ["needs --baseline CHECKOUT"]),
    (["--engines", "mmcompile-int8-baseline"], ["'mmcompile-int8-baseline' needs --baseline"]),
    (["--deploy", "--engines", "onnxruntime"], ["--deploy runs its own engines"]),
    (["--suite", "corpus", "--models", "nope"], ["unknown corpus model 'nope'", "ppocr_det"]),
    (["--suite", "corpus", "--batch", "8"], ["real inputs", "--batch does not apply"]),
    (["--suite", "corpus", "--against", "torch"], ["engine 'torch' runs the torch module"]),
])
def test_bad_suite_arguments_fail_fast_with_one_line(capsys, argv, fragments):
    code, _, err = run_cli(capsys, "bench", *argv)
    assert code == 1
    assert_one_line_error(err, *fragments)


def test_bench_corpus_runs_a_real_model_at_its_real_inputs(tmp_path, capsys):
    from mmcompile.bench.corpus import Unavailable, by_name, fetch
    try:
        fetch(by_name("g2p_lstm_encoder"))
    except Unavailable as exc:
        pytest.skip(f"corpus unavailable: {exc}")
    out_json = tmp_path / "corpus.json"
    code, out, err = run_cli(capsys, "bench", "--suite", "corpus", "--models", "g2p_lstm_encoder",
                          "--repeat", "3", "--json", out_json, "-q")
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    # the default engines for real model files: mmcompile against onnxruntime, both matching
    # onnxruntime's unoptimized run of the graph within 1e-3 of max(1, max|ref|)
    assert [(r["model"], r["engine"], r["match"]) for r in doc["results"]] == [
        ("g2p_lstm_encoder", "mmcompile", True), ("g2p_lstm_encoder", "onnxruntime", True)]
    assert "graph optimizations off" in doc["settings"]["reference"]
    assert doc["models"][0]["params"] > 100_000  # the pretrained encoder, not a stand-in
    assert "g2p_lstm_encoder" in out and "geometric mean" in out


def test_bad_model_file_arguments_fail_fast_with_one_line(mlp_file, tmp_path, capsys):
    static = _mlp(tmp_path / "static.onnx", 1)
    code, _, err = run_cli(capsys, "bench", static, "--batch", "8")
    assert code == 1
    assert_one_line_error(err, "static.onnx", "static batch of 1", "--batch 8")
    code, _, err = run_cli(capsys, "bench", mlp_file, "--against", "torch")
    assert code == 1
    assert_one_line_error(err, "engine 'torch' runs the torch module")
    code, _, err = run_cli(capsys, "bench", mlp_file, "--models", "clip")
    assert code == 1
    assert_one_line_error(err, "not both")
    code, _, err = run_cli(capsys, "bench", tmp_path / "absent.onnx")
    assert code == 1
    assert_one_line_error(err, "no such model file")


@pytest.mark.parametrize("engines, expected", [
    (["onnxruntime", "mmcompile"], ["onnxruntime", "mmcompile-baseline", "mmcompile"]),
    (["onnxruntime-int8", "mmcompile-int8"],
     ["onnxruntime-int8", "mmcompile-int8-baseline", "mmcompile-int8"]),
    (["mmcompile", "mmcompile-int8"],
     ["mmcompile-baseline", "mmcompile", "mmcompile-int8-baseline", "mmcompile-int8"]),
    (["onnxruntime"], ["onnxruntime", "mmcompile-baseline"]),
    (["mmcompile-baseline", "mmcompile"], ["mmcompile-baseline", "mmcompile"]),
])
def test_baseline_adds_the_twin_of_each_mmcompile_engine(engines, expected):
    """``--baseline``: an int8 A/B needs the int8 engine from the other checkout too."""
    from mmcompile.bench.engines import baseline_engines, get_engine
    assert baseline_engines(engines) == expected
    assert get_engine("mmcompile-int8-baseline").int8
    assert get_engine("mmcompile-int8-baseline").baseline


def test_the_baseline_engine_imports_mmcompile_from_the_other_checkout(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import mmcompile
    repo = Path(mmcompile.__file__).resolve().parent.parent
    checkout = tmp_path / "checkout"
    for package in ("mmcompile", "targets", "passes"):
        shutil.copytree(repo / package, checkout / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "run").mkdir()
    shim = harness.baseline_path(checkout, tmp_path / "run")
    job = {"threads": 1, "inductor_cache": str(tmp_path / "cache"), "baseline": shim}
    probe = ("import mmcompile, mmcompile.targets.tvm, mmcompile.passes, mmcompile.bench; "
             "print(mmcompile.__file__); print(mmcompile.targets.tvm.__file__); "
             "print(mmcompile.passes.__file__)")
    # (from another folder, as the runner script is: a current directory of this checkout
    # would come first on sys.path)
    out = subprocess.run([sys.executable, "-c", probe], env=harness.child_env(job),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         check=True).stdout
    paths = [Path(line).resolve() for line in out.split()]
    assert all(checkout in p.parents for p in paths), paths  # not this checkout's modules
    plain = subprocess.run([sys.executable, "-c", probe], env=harness.child_env(
        {**job, "baseline": None}), cwd=tmp_path, capture_output=True, text=True, timeout=120,
        check=True).stdout
    assert all(repo in Path(line).resolve().parents for line in plain.split())


def test_bench_deploy_measures_cold_start_and_rss_against_onnxruntime(mlp_file, tmp_path,
                                                                      capsys):
    out_json = tmp_path / "deploy.json"
    code, out, err = run_cli(capsys, "bench", mlp_file, "--deploy", "--batch", "1",
                             "--repeat", "3", "--json", out_json, "-q")
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    rows = {r["engine"]: r for r in doc["results"]}
    assert list(rows) == ["onnxruntime", "mmcompile"]
    assert rows["onnxruntime"]["cold_start_ratio"] == 1.0
    for row in rows.values():
        assert 0 < row["cold_start_ms"] < 60_000 and 0 < row["rss_mb"] <= row["peak_rss_mb"]
    # numpy, tvm-ffi and the runtime: not the ~1100 modules of a process importing tvm
    assert rows["mmcompile"]["modules"] < 600
    assert doc["summary"]["worst_cold_start_ratio"] == rows["mmcompile"]["cold_start_ratio"]
    assert "cold start" in out and "steady RSS" in out
