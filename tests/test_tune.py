"""mmcompile tune: task extraction, the database (meta, durability, corruption, target checks),
applying it at compile time, resume after SIGKILL, and measuring through an RPC tracker.

Budgets are tiny (4-24 trials, random cost model): these tests check the machinery, not the
speedups; the long job is documented in README ("Tuning").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import mmcompile
from mmcompile.planning import plan
from mmcompile.tune import TuningDB, TuningDBError, TuningError, parse_duration, tune
from mmcompile.tune.database import META, RECORDS, WORKLOADS
from mmcompile.tune.tasks import Task, merge, select

TINY = dict(trials=8, trials_per_iter=4, cost_model="random", measure_model=False,
            progress=None)


def _matmul_model(path: Path, branches: int = 1, n: int = 32, k: int = 64, m: int = 64) -> Path:
    """MatMul + Add + Relu per input; with two branches the kernels have equal shapes."""
    rng = np.random.default_rng(0)
    nodes, inputs, outputs, inits = [], [], [], []
    for b in range(branches):
        inits += [numpy_helper.from_array(rng.standard_normal((k, m)).astype(np.float32), f"w{b}"),
                  numpy_helper.from_array(rng.standard_normal(m).astype(np.float32), f"b{b}")]
        nodes += [helper.make_node("MatMul", [f"x{b}", f"w{b}"], [f"y{b}"]),
                  helper.make_node("Add", [f"y{b}", f"b{b}"], [f"z{b}"]),
                  helper.make_node("Relu", [f"z{b}"], [f"out{b}"])]
        inputs.append(helper.make_tensor_value_info(f"x{b}", TensorProto.FLOAT, [n, k]))
        outputs.append(helper.make_tensor_value_info(f"out{b}", TensorProto.FLOAT, [n, m]))
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(model path, database) after one tiny tuning job."""
    root = tmp_path_factory.mktemp("tuned")
    model = _matmul_model(root / "tiny.onnx")
    report = tune(model, db=str(root / "db"), **TINY)
    return model, root / "db", report


def _copy(db: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(db, tmp_path / "db", ignore=shutil.ignore_patterns(".lock")))


def test_tune_writes_records_and_meta(tuned):
    model, db, report = tuned
    assert mmcompile.tune is tune
    meta = json.loads((db / META).read_text())
    assert meta["format"] == "mmcompile-tuning-db" and meta["format_version"] == 1
    assert meta["target"]["kind"] == "llvm" and meta["target"]["mcpu"]
    assert meta["host"]["cpu"] and meta["host"]["measured_on"] == "local"
    (task_key, task), = meta["tasks"].items()
    assert task["name"] == "fused_matmul_add_relu" and task["untuned_ms"] > 0
    (model_entry,) = meta["models"].values()
    assert model_entry["stages"] == {"main": [task_key]}
    (job,) = meta["jobs"]
    assert job["status"] == "finished" and job["trials_done"] == job["trials"] == 8
    assert len(_lines(db / RECORDS)) == 8 and len(_lines(db / WORKLOADS)) == 1
    assert report.trials == 8 and report.rows[0]["untuned_ms"] == task["untuned_ms"]
    assert "fused_matmul_add_relu" in report.table() and report.sha256 == \
        TuningDB.open(db).digest()


def test_compile_applies_faster_records_only(tuned, tmp_path, capsys):
    model, db, _ = tuned
    db = _copy(db, tmp_path)
    meta = json.loads((db / META).read_text())
    task = next(iter(meta["tasks"].values()))
    task["untuned_ms"] = 1e6  # every tuned record now beats the default schedule
    (db / META).write_text(json.dumps(meta))
    compiled = mmcompile.compile(model, tuning_db=db)  # verifies against onnxruntime
    used = compiled.metadata["tuning_db"]
    assert used["hits"] == 1 and used["kernels"] == 1 and "ok" in compiled.metadata["verification"]
    assert used["sha256"] == TuningDB.open(db).digest()
    manifest = json.loads((compiled.save(tmp_path / "m.mmc") / "manifest.json").read_text())
    assert manifest["metadata"]["tuning_db"]["sha256"] == used["sha256"]

    from mmcompile.cli import main
    assert main(["compile", str(model), "-o", str(tmp_path / "cli.mmc"), "--tuning-db", str(db),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tuning_db"]["hits"] == 1

    task["untuned_ms"] = 1e-9  # nothing beats the default: schedule_cpu keeps every kernel
    (db / META).write_text(json.dumps(meta))
    assert mmcompile.compile(model, tuning_db=db, verify=False).metadata["tuning_db"]["hits"] == 0


def test_a_record_that_does_not_replay_keeps_the_default_schedule(tuned, tmp_path):
    # Workloads match structurally, ignoring block names; traces look blocks up by name. A
    # record tuned on one layer once aborted the compile of an identical layer named otherwise.
    import tvm
    from tvm import tirx

    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import fuse_cpu
    from mmcompile.targets.tvm.target import import_relax
    from mmcompile.targets.tvm.tuning import apply_database
    model, db, _ = tuned
    db = _copy(db, tmp_path)
    meta = json.loads((db / META).read_text())
    next(iter(meta["tasks"].values()))["untuned_ms"] = 1e6  # the record would be chosen
    (db / META).write_text(json.dumps(meta))
    plans = plan(model).stages()
    target = llvm_target()

    def fused():
        return fuse_cpu(import_relax(plans[0].graph, "cpu"), target)

    assert apply_database(fused(), target, db)[1] == 1
    mod = fused()
    (gv, func), = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    text = func.script()
    assert 'T.sblock("matmul")' in text
    mod[gv] = tvm.script.from_source(text.replace('T.sblock("matmul")', 'T.sblock("renamed")'))
    with pytest.warns(UserWarning, match="did not replay"):
        mod, hits = apply_database(mod, target, db)
    assert hits == 0


def test_records_filed_under_a_differently_named_kernel_are_skipped_then_removed(tuned,
                                                                                 tmp_path):
    # MetaSchedule files a record under a structurally equal workload whatever its block
    # names; such a record then refuses to load and took the whole database down with it.
    model, db, _ = tuned
    db = _copy(db, tmp_path)
    meta = json.loads((db / META).read_text())
    next(iter(meta["tasks"].values()))["untuned_ms"] = 1e6
    (db / META).write_text(json.dumps(meta))
    good = (db / RECORDS).read_text().splitlines()[0]
    with open(db / RECORDS, "a") as f:
        f.write(good.replace('["matmul","main"]', '["renamed","main"]') + "\n")
    with pytest.warns(UserWarning, match="1 record"):
        compiled = mmcompile.compile(model, tuning_db=db)  # verifies against onnxruntime
    assert compiled.metadata["tuning_db"]["hits"] == 1  # the good records still apply
    report = tune(model, db=str(db), **{**TINY, "trials": 4})
    assert any("removed 1 record" in n for n in report.notes)
    assert "renamed" not in (db / RECORDS).read_text()


def test_second_job_reuses_tasks_and_stops_on_time_budget(tuned, tmp_path):
    model, db, _ = tuned
    db = _copy(db, tmp_path)
    report = tune(model, db=str(db), **{**TINY, "trials": 10_000, "cost_model": "xgb"},
                  time_budget=0.5)
    assert report.tasks_known == 1  # measured by the first job: not measured again
    assert any("cost model trained on" in n for n in report.notes)  # from the first job
    assert report.job["stop_reason"] == "time budget reached" and report.job["id"] == 2
    assert report.job["trials_done"] < 10_000


def test_branch_stages_share_one_task(tmp_path):
    model = _matmul_model(tmp_path / "two.onnx", branches=2)
    modalities = {"x0": "image", "x1": "text"}
    planned = plan(model, modalities=modalities, schedule="parallel")
    plans = planned.staged
    backend = planned.placement.choices[planned.placement.primary].target
    assert len(plans) == 2
    # auto compiles the stages and the whole graph: both are tuned
    both = plan(model, modalities=modalities).stages()
    assert [p.name for p in both] == [p.name for p in plans] + ["main"]
    from mmcompile.target import CompileOptions
    from mmcompile.tune import find_tuner
    tuner = find_tuner(backend, CompileOptions())
    tasks = merge([(p.name, tuner.extract(p.graph)) for p in plans], tuner.same)
    assert len(tasks) == 1 and tasks[0].weight == 2 and sorted(tasks[0].stages) == \
        sorted(p.name for p in plans)


def test_merge_and_select_are_pure():
    a, b = Task("k1", "mm", 1, "A"), Task("k1", "mm", 2, "A")
    clash = Task("k1", "other", 1, "B")  # same hash, different kernel
    merged = merge([("s1", [a]), ("s2", [b, clash])], lambda x, y: x == y)
    assert [(t.key, t.weight, t.stages) for t in merged] == [("k1", 3, ["s1", "s2"]),
                                                             ("k1'", 1, ["s2"])]
    big, gather = Task("k2", "conv", 1, "C"), Task("k3", "take", 6, "D")
    keep, skipped = select([*merged, big, gather], {"k1": 1.0, "k1'": 0.001, "k2": 5.0,
                                                    "k3": None}, min_share=0.01)
    assert [t.key for t in keep] == ["k2", "k1"]  # costliest first
    assert [t.key for t in skipped] == ["k1'", "k3"]  # too small; not measurable
    assert parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    with pytest.raises(TuningError):
        parse_duration("soon")


def test_corrupt_and_foreign_databases_are_refused(tuned, tmp_path):
    _, db, _ = tuned
    torn = _copy(db, tmp_path)
    good = _lines(torn / RECORDS)
    with open(torn / RECORDS, "ab") as f:  # a job killed in the middle of a write
        f.write(good[0][: len(good[0]) // 2])
    reader = TuningDB.open(torn)
    assert reader.records == len(good)  # the torn line is ignored, not an error
    with reader.lock():
        assert reader.repaired and _lines(torn / RECORDS) == good

    garbage = tmp_path / "garbage"
    shutil.copytree(torn, garbage)
    (garbage / RECORDS).write_bytes(good[0] + b"not json at all\n" + b"".join(good[1:]))
    with pytest.raises(TuningDBError, match="corrupt: line 2 of database_tuning_record"):
        TuningDB.open(garbage)
    with pytest.raises(TuningDBError, match="corrupt"):
        mmcompile.compile(tuned[0], tuning_db=garbage)

    bad_meta = tmp_path / "bad_meta"
    shutil.copytree(torn, bad_meta)
    (bad_meta / META).write_text("{truncated")
    with pytest.raises(TuningDBError, match="tuning.json is not JSON"):
        TuningDB.open(bad_meta)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(TuningDBError, match="not an mmcompile tuning database"):
        TuningDB.open(foreign, create=True)
    (bad_meta / META).unlink()
    with pytest.raises(TuningDBError, match="MetaSchedule database without"):
        TuningDB.open(bad_meta, create=True)
    with pytest.raises(TuningDBError, match="no tuning database"):
        TuningDB.open(tmp_path / "missing")


def test_database_for_another_target_is_refused_or_warned(tuned, tmp_path):
    model, db, _ = tuned
    db = _copy(db, tmp_path)
    meta = json.loads((db / META).read_text())
    here = dict(meta["target"])
    meta["target"] = {**here, "mcpu": "cortex-a76", "target": "llvm -mcpu=cortex-a76"}
    (db / META).write_text(json.dumps(meta))
    with pytest.raises(TuningDBError, match="does not apply to"):
        mmcompile.compile(model, tuning_db=db, verify=False)
    with pytest.raises(TuningDBError, match="does not apply to"):
        tune(model, db=str(db), **TINY)

    opened = TuningDB.open(db)
    opened.meta["target"] = {**here, "num-cores": here["num-cores"] + 6}
    opened.meta["host"]["cpu"] = "Some Other CPU"
    notes = opened.check_target(here, ("kind", "mcpu"), {"cpu": "This CPU"})
    assert any("num-cores" in n for n in notes) and any("Some Other CPU" in n for n in notes)
    with pytest.raises(TuningDBError):  # a tuning job does not mix core counts
        opened.check_target(here, ("kind", "mcpu", "num-cores"))


def test_one_job_per_database(tuned, tmp_path):
    _, db, _ = tuned
    db = _copy(db, tmp_path)
    with TuningDB.open(db).lock():
        with pytest.raises(TuningDBError, match="in use by another tuning job"):
            with TuningDB.open(db).lock():
                pass


def _start_and_signal(command: list[str], records: Path, more: int, sig: int):
    """Start ``command`` in its own process group; once ``more`` records were added, send
    ``sig`` to the group (as Ctrl-C in a terminal, or a kill -9 of the whole job)."""
    start = len(_lines(records))
    job = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(_lines(records)) < start + more and job.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(job.pid, sig)
    out, err = job.communicate(timeout=120)
    return job.returncode, out, err


@pytest.mark.slow
def test_interrupt_and_sigkill_then_resume_lose_nothing_committed(tmp_path):
    model = _matmul_model(tmp_path / "tiny.onnx")
    db = tmp_path / "db"
    records = db / RECORDS
    base = [sys.executable, "-m", "mmcompile.cli", "tune", str(model), "--db", str(db),
            "--cost-model", "random", "--no-measure", "--trials-per-iter", "4"]

    code, out, err = _start_and_signal(base + ["--trials", "24"], records, 4, signal.SIGINT)
    assert code == 130, err  # Ctrl-C: the batch in flight is finished and committed
    assert "--resume" in out
    job = json.loads((db / META).read_text())["jobs"][0]
    assert job["status"] == "interrupted" and job["trials_done"] == len(_lines(records)) >= 4
    failed = [r for r in map(json.loads, _lines(records)) if min(r[1][1]) >= 1e9]
    assert not failed  # the workers ignored the Ctrl-C: nothing in flight was lost

    before = _lines(records)
    code, _, err = _start_and_signal(base + ["--resume"], records, 4, signal.SIGKILL)
    assert code == -signal.SIGKILL, err
    killed = _lines(records)
    assert killed[:len(before)] == before and len(killed) >= len(before) + 4
    assert json.loads((db / META).read_text())["jobs"][0]["status"] == "running"

    resumed = subprocess.run(base + ["--resume", "--json"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    after = _lines(records)
    complete = [line for line in killed if line.endswith(b"\n")]
    assert after[:len(complete)] == complete  # every committed record survived, unchanged
    assert report["job"]["status"] == "finished" and report["job"]["trials_done"] >= 24
    assert len(after) >= 24 and report["trials"] <= 24 - len(complete) + 4
    assert len(json.loads((db / META).read_text())["jobs"]) == 1  # one job, resumed twice


@pytest.mark.slow
def test_rpc_tracker_and_two_servers(tmp_path):
    import psutil

    from mmcompile.tune.rpc import LocalRPCCluster
    model = _matmul_model(tmp_path / "tiny.onnx")
    db = tmp_path / "db"
    seen: set[int] = set()
    with LocalRPCCluster(servers=2, key="test-cpu") as cluster:
        seen |= cluster.pids()
        assert cluster.registered() == 2
        result = {}

        def run():
            result["report"] = tune(model, db=str(db), rpc_tracker=cluster.address,
                                    rpc_key="test-cpu", **{**TINY, "trials": 16})

        worker = threading.Thread(target=run)
        worker.start()
        while len(_lines(db / RECORDS)) < 2 and worker.is_alive():
            time.sleep(0.2)
        seen |= cluster.pids()
        cluster.kill_server(0)  # a measuring machine dies mid-job
        worker.join(timeout=300)
        assert not worker.is_alive()
        report = result["report"]
        assert report.job["status"] == "finished" and report.job["trials_done"] >= 16
        assert json.loads((db / META).read_text())["host"]["measured_on"] == \
            f"rpc://{cluster.address}/test-cpu"
        failed = [r for r in map(json.loads, _lines(db / RECORDS)) if min(r[1][1]) >= 1e9]
        assert len(failed) <= 4  # at most the batch that was in flight on the dead server
        seen |= cluster.pids()
    time.sleep(0.5)
    left = []
    for pid in seen:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert not left
