"""Branch-parallel execution: the worker pool, compiled models under every schedule, failing
stages, concurrent callers, artifacts that keep their schedule, and the CLI.

The models are compiled once per module, with ``threads=2`` so the parallel plan is the same on
any machine: three branches on two workers. Outputs are compared bit for bit across schedules:
a schedule only decides where and when the same kernels run, never what they compute. The
whole-graph stage of ``schedule="sequential"`` also matches the four branch stages exactly on
this model (a failure there, unlike between schedules of one model, could be a legitimate
last-bit change in how TVM fuses across the stage boundary). Against onnxruntime the tolerance
is 1e-5.
"""

import gc
import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import FLOAT, INT64, make_graph
from onnx import helper

import mmcompile
from mmcompile.planning import auto as autoschedule
from mmcompile.artifact import read_manifest
from mmcompile.cli import main
from mmcompile.errors import MMCompileError
from mmcompile.executor import StageError, WorkerPool, run_parallel
from mmcompile.reference import run_onnxruntime
from mmcompile.planning.parallel import replan
from mmcompile.runtime import CompiledModel
from mmcompile.schedule import Schedule

BRANCHES = ["audio", "image", "text"]
PNG = b"\x89PNG\r\n\x1a\n"


def three_branch_model():
    """image Conv+Relu+GAP+Flatten, text Gather+ReduceMean, audio MatMul -> Concat -> Gemm."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    nodes = [
        helper.make_node("Conv", ["pixel_values", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["img_feat"]),
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("ReduceMean", ["emb", "axis1"], ["txt_feat"], keepdims=0),
        helper.make_node("MatMul", ["audio_values", "audio_w"], ["aud_feat"]),
        helper.make_node("Concat", ["img_feat", "txt_feat", "aud_feat"], ["joint"], axis=1),
        helper.make_node("Gemm", ["joint", "head_w", "head_b"], ["logits"]),
    ]
    graph = make_graph(
        nodes, [("pixel_values", FLOAT, [1, 3, 16, 16]), ("input_ids", INT64, [1, 12]),
                ("audio_values", FLOAT, [1, 64])], [("logits", FLOAT, [1, 3])],
        {"conv_w": w(8, 3, 3, 3), "table": w(50, 16), "axis1": np.array([1], np.int64),
         "audio_w": w(64, 8), "head_w": w(8 + 16 + 8, 3), "head_b": w(3)})
    return graph.to_onnx()


@pytest.fixture(scope="module")
def model():
    return three_branch_model()


@pytest.fixture(scope="module")
def parallel(model):
    return mmcompile.compile(model, target="cpu", schedule="parallel", threads=2)


@pytest.fixture(scope="module")
def sequential(model):
    return mmcompile.compile(model, target="cpu", schedule="sequential", threads=2)


@pytest.fixture(scope="module")
def auto(model):
    return mmcompile.compile(model, target="cpu", schedule="auto", threads=2)


@pytest.fixture(scope="module")
def feeds(parallel):
    return parallel.signature.random_inputs(seed=1)


def twin(compiled, schedule):
    """Another model over the same compiled stages (its own lock and workers). The two must
    not run at the same time: they share the stages' VMs."""
    return CompiledModel(compiled.signature, compiled.stages, compiled.target, compiled.metadata,
                         schedule)


def call_within(seconds, fn, *args):
    """``fn(*args)`` on a daemon thread; fails the test if it has not returned in time.
    Returns ``(result, exception)``."""
    box = {}

    def target():
        try:
            box["result"] = fn(*args)
        except Exception as exc:  # handed to the test to inspect
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a worker is hanging"
    return box.get("result"), box.get("error")


def lanes(entries):
    return {e["stage"]: e["lane"] for e in entries}


# -- the worker pool, without a compiler --------------------------------------------------------

def _pool(n):
    return WorkerPool([lambda: None] * n)


def test_workers_run_side_by_side_then_the_tail_on_the_caller():
    pool = _pool(2)
    ran, timeline = {}, []
    barrier = threading.Barrier(2, timeout=5)  # passes only if both workers run at once

    def run_one(name):
        if name in ("a", "b"):
            barrier.wait()
        ran[name] = threading.current_thread().name

    try:
        run_parallel(pool, [["a"], ["b"]], ["fuse"], run_one, timeline)
    finally:
        pool.close()
    assert ran == {"a": "mmcompile-worker-0", "b": "mmcompile-worker-1",
                   "fuse": threading.current_thread().name}
    assert lanes([{"stage": s, "lane": lane} for s, lane, _, _ in timeline]) == {
        "a": "worker 0", "b": "worker 1", "fuse": "caller"}
    ends = {s: end for s, _, _, end in timeline}
    fuse_start = next(start for s, _, start, _ in timeline if s == "fuse")
    assert fuse_start >= max(ends["a"], ends["b"])
    assert not any(w.is_alive() for w in pool.workers)


def test_a_failing_stage_is_reported_once_after_the_other_workers_finish():
    pool = _pool(2)
    finished = []

    def run_one(name):
        if name == "bad":
            raise RuntimeError("boom")
        time.sleep(0.2)
        finished.append(name)

    try:
        with pytest.raises(StageError, match=r"^stage 'bad' failed: RuntimeError: boom$") as info:
            run_parallel(pool, [["bad", "never"], ["slow"]], ["fuse"], run_one)
        assert info.value.stage == "bad"
        assert isinstance(info.value.__cause__, RuntimeError)
        assert finished == ["slow"]  # waited for, and neither the rest nor the tail ran
        run_parallel(pool, [["slow"], ["slow"]], [], run_one)  # the workers are still usable
        assert finished == ["slow"] * 3
    finally:
        pool.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failing_worker_setup_is_an_error_not_a_hang():
    def setup():
        raise RuntimeError("no threads for you")

    pool = WorkerPool([setup, lambda: None])
    _, error = call_within(2, run_parallel, pool, [["a"], ["b"]], [], lambda name: None)
    assert isinstance(error, MMCompileError) and "no threads for you" in str(error)


# -- compiled models ---------------------------------------------------------------------------

def test_branches_compile_to_stages_and_workers(parallel, sequential, auto):
    assert [s.name for s in parallel.stages] == BRANCHES + ["fusion"]
    assert parallel.stages[-1].depends_on == BRANCHES
    assert all(not s.depends_on for s in parallel.stages[:-1])
    assert all(s.info["cost_ms"] > 0 for s in parallel.stages)
    schedule = parallel.schedule
    assert schedule.kind == "parallel" and len(schedule.workers) == 2
    assert sorted(s for names in schedule.workers for s in names) == BRANCHES
    assert schedule.threads == [1, 1]
    assert 0 < schedule.bound_ms <= schedule.estimate_ms
    assert "schedule: parallel: worker 0 (1 thread)" in parallel.report()
    assert [s.name for s in sequential.stages] == ["main"]
    assert sequential.schedule.kind == "sequential"
    # auto: the staged model on its parallel schedule, or the whole graph as one stage
    expected = {"parallel": BRANCHES + ["fusion"], "sequential": ["main"]}
    assert [s.name for s in auto.stages] == expected[auto.schedule.kind]
    assert "sequential" in auto.schedule.measured_ms
    assert set(auto.schedule.measured_ms) in ({"sequential", "parallel"},  # raced
                                              {"sequential", "2 side by side"})  # not promising
    assert "measured: sequential" in auto.report()


@pytest.mark.parametrize("side_by_side_ms, staged", [(0.8, True), (2.5, False)])
def test_auto_compiles_the_stages_only_when_the_prediction_is_promising(
        model, monkeypatch, side_by_side_ms, staged):
    # Two copies of the whole graph side by side in 0.8x the time of one: branches on one core
    # each should beat the whole graph by more than PROSPECT asks, so the stages are compiled
    # and raced. 2.5x: they cannot.
    monkeypatch.setattr(autoschedule, "side_by_side",
                        lambda whole, feeds, workers, threads: (1.0, side_by_side_ms))
    progress = []
    compiled = mmcompile.compile(model, target="cpu", schedule="auto", threads=2,
                                 progress=progress.append)
    compiled_stages = [m for m in progress if m.startswith("compiling stage")]
    measured = compiled.schedule.measured_ms
    if staged:
        assert len(compiled_stages) == 1 + len(BRANCHES) + 1  # whole, branches, fusion
        assert set(measured) == {"sequential", "parallel"}
    else:
        assert [s.name for s in compiled.stages] == ["main"] and len(compiled_stages) == 1
        assert measured == {"sequential": 1.0, "2 side by side": 2.5}
        # three branches of equal work on two workers: 2/3 of it on one core, at 2.5x
        assert compiled.schedule.estimate_ms > autoschedule.PROSPECT * 1.0
        assert "branch stages not compiled" in compiled.report()
        assert any("branch stages not compiled" in m for m in progress)
    compiled.close()


def test_auto_without_measuring_keeps_the_whole_graph(model):
    compiled = mmcompile.compile(model, target="cpu", schedule="auto", threads=2, measure=False)
    assert [s.name for s in compiled.stages] == ["main"]
    assert compiled.schedule.kind == "sequential" and not compiled.schedule.measured_ms


def test_side_by_side_runs_copies_of_the_whole_graph(sequential, feeds):
    expected = sequential.run(feeds)["logits"]
    alone, together = autoschedule.side_by_side(sequential, feeds, workers=2, threads=1)
    assert alone > 0 and together > 0
    assert sequential.schedule.kind == "sequential"
    replica = sequential.stages[0].executable.replica()
    np.testing.assert_array_equal(replica.run(feeds)["logits"].numpy(), expected)
    assert np.array_equal(sequential.run(feeds)["logits"], expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outputs_are_identical_for_every_schedule(model, parallel, sequential, auto, seed):
    feeds = parallel.signature.random_inputs(seed=seed)
    expected = sequential.run(feeds)["logits"]
    same_stages = twin(parallel, replan(parallel, "sequential"))
    for compiled in (parallel, auto, same_stages):
        assert np.array_equal(compiled.run(feeds)["logits"], expected), compiled.schedule.kind
    reference = run_onnxruntime(model, feeds)["logits"]
    np.testing.assert_allclose(expected, reference, rtol=1e-5, atol=1e-5)


def test_profile_of_the_parallel_schedule(parallel, feeds):
    entries = parallel.profile(feeds)
    assert sorted(e["stage"] for e in entries) == sorted(BRANCHES + ["fusion"])
    assert all(0 <= e["start_ms"] < e["end_ms"] for e in entries)
    expected = {stage: f"worker {i}" for i, names in enumerate(parallel.schedule.workers)
                for stage in names}
    assert lanes(entries) == {**expected, "fusion": "caller"}
    assert len({lanes(entries)[b] for b in BRANCHES}) == 2  # branches on two lanes
    fusion = next(e for e in entries if e["stage"] == "fusion")
    assert fusion["start_ms"] >= max(e["end_ms"] for e in entries if e["stage"] != "fusion")


def test_profile_of_the_sequential_schedule(parallel, feeds):
    entries = twin(parallel, Schedule("sequential")).profile(feeds)
    assert [e["stage"] for e in entries] == BRANCHES + ["fusion"]
    assert {e["lane"] for e in entries} == {"caller"}
    assert all(a["end_ms"] <= b["start_ms"] for a, b in itertools.pairwise(entries))


def test_one_modality_compiles_to_one_sequential_stage():
    graph = make_graph([helper.make_node("Relu", ["pixel_values"], ["y"])],
                       [("pixel_values", FLOAT, [1, 3, 4, 4])], [("y", FLOAT, [1, 3, 4, 4])])
    compiled = mmcompile.compile(graph, schedule="parallel", threads=2)
    assert [s.name for s in compiled.stages] == ["main"]
    assert compiled.schedule.kind == "sequential"
    assert lanes(compiled.profile(compiled.signature.random_inputs())) == {"main": "caller"}


def test_artifact_keeps_the_schedule_and_load_can_override_it(parallel, feeds, tmp_path):
    expected = parallel.run(feeds)["logits"]
    path = parallel.save(tmp_path / "parallel.mmc")
    assert read_manifest(path)["schedule"] == parallel.schedule.to_dict()
    loaded = mmcompile.load(path)
    assert loaded.schedule.to_dict() == parallel.schedule.to_dict()
    assert np.array_equal(loaded.run(feeds)["logits"], expected)

    overridden = mmcompile.load(path, schedule="sequential")
    assert overridden.schedule.kind == "sequential"
    assert set(lanes(overridden.profile(feeds)).values()) == {"caller"}
    assert np.array_equal(overridden.run(feeds)["logits"], expected)
    with pytest.raises(MMCompileError, match="unknown schedule 'fastest'"):
        mmcompile.load(path, schedule="fastest")


def test_load_replans_a_sequential_artifact_from_the_recorded_costs(parallel, feeds, tmp_path):
    path = twin(parallel, Schedule("sequential")).save(tmp_path / "sequential.mmc")
    assert read_manifest(path)["schedule"]["kind"] == "sequential"
    assert mmcompile.load(path).schedule.kind == "sequential"
    replanned = mmcompile.load(path, schedule="parallel", threads=2)
    assert replanned.schedule.kind == "parallel"
    assert replanned.schedule.workers == parallel.schedule.workers
    assert np.array_equal(replanned.run(feeds)["logits"], parallel.run(feeds)["logits"])


def test_a_loaded_artifact_can_be_saved_with_a_new_schedule(parallel, feeds, tmp_path):
    path = parallel.save(tmp_path / "parallel.mmc")
    resaved = mmcompile.load(path, schedule="sequential").save(tmp_path / "sequential.mmc")
    reloaded = mmcompile.load(resaved)
    assert reloaded.schedule.kind == "sequential"
    assert np.array_equal(reloaded.run(feeds)["logits"], parallel.run(feeds)["logits"])


def test_four_threads_at_once_on_one_parallel_model(parallel, sequential):
    calls = 25
    cases = [[parallel.signature.random_inputs(seed=100 * t + i) for i in range(calls)]
             for t in range(4)]
    expected = [[sequential.run(case)["logits"] for case in thread] for thread in cases]
    start = threading.Barrier(4)

    def caller(t):
        start.wait()
        return [np.array(parallel.run(case)["logits"]) for case in cases[t]]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(caller, range(4), timeout=60))
    for got, want in zip(results, expected):
        assert len(got) == calls
        for a, b in zip(got, want):
            assert np.array_equal(a, b)


def _boom(inputs):
    raise RuntimeError("boom")


@pytest.mark.parametrize("stage", ["image", "fusion"])
def test_a_failing_stage_is_one_clear_error_and_leaves_no_worker_hanging(parallel, feeds,
                                                                         monkeypatch, stage):
    expected = parallel.run(feeds)["logits"]  # the workers exist from here on
    threads = threading.active_count()
    executable = next(s for s in parallel.stages if s.name == stage).executable
    with monkeypatch.context() as patch:
        patch.setattr(executable, "run", _boom)
        for _ in range(5):
            _, error = call_within(10, parallel.run, feeds)
            assert isinstance(error, StageError)
            assert error.stage == stage
            assert str(error) == f"stage '{stage}' failed: RuntimeError: boom"
    assert threading.active_count() == threads
    result, error = call_within(10, parallel.run, feeds)
    assert error is None
    assert np.array_equal(result["logits"], expected)


def test_a_failing_stage_under_the_sequential_schedule(parallel, feeds, monkeypatch):
    model = twin(parallel, Schedule("sequential"))
    executable = next(s for s in parallel.stages if s.name == "text").executable
    monkeypatch.setattr(executable, "run", _boom)
    with pytest.raises(StageError, match="^stage 'text' failed: RuntimeError: boom$"):
        model.run(feeds)


def test_close_stops_the_workers(parallel, feeds):
    model = twin(parallel, parallel.schedule)
    model.run(feeds)
    threads = threading.active_count()
    model.close()
    assert threading.active_count() == threads - len(parallel.schedule.workers)


def test_dropped_models_do_not_leak_worker_threads(parallel, feeds):
    threads = threading.active_count()
    for _ in range(3):
        model = twin(parallel, parallel.schedule)
        model.run(feeds)
        del model
    gc.collect()
    deadline = time.monotonic() + 1
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == threads


# -- command line --------------------------------------------------------------------------------

def test_cli_compile_parallel_then_run_with_a_timeline(model, tmp_path, capsys):
    import onnx
    source = tmp_path / "three.onnx"
    onnx.save_model(model, source)
    artifact = tmp_path / "three.mmc"
    assert main(["compile", str(source), "-o", str(artifact), "--schedule", "parallel",
                 "--threads", "2", "--json"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in compiled["stages"]] == BRANCHES + ["fusion"]

    timeline = tmp_path / "timeline.png"
    out_parallel = tmp_path / "parallel.npz"
    assert main(["run", str(artifact), "--random", "--timeline", str(timeline),
                 "--output", str(out_parallel), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schedule"] == "parallel"
    assert timeline.read_bytes()[:8] == PNG

    out_sequential = tmp_path / "sequential.npz"
    assert main(["run", str(artifact), "--random", "--schedule", "sequential",
                 "--output", str(out_sequential), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schedule"] == "sequential"
    with np.load(out_parallel) as a, np.load(out_sequential) as b:
        assert np.array_equal(a["logits"], b["logits"])
