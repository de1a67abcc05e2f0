"""``mmcompile bench --deploy``: what a deployed process costs, next to onnxruntime.

For each model and batch, the model is compiled once (an ``.mmc`` artifact, as ``mmcompile
compile`` writes it) and then each engine is started ``rounds`` times in a fresh process that
imports its runtime, loads the model, calls it once (the cold start: from just before the
process is started to the first result), calls it ``repeat`` more times and reports its
resident memory (the steady state) and peak. The processes run one at a time, the engines
alternating, so no measurement shares the machine with another.

Engines:

- ``onnxruntime``: an ``InferenceSession`` on the ONNX file (default optimizations);
- ``mmcompile``: ``mmcompile.load`` + ``run`` on the artifact, with TVM's runtime-only
  library as the deployment install has it (``TVM_USE_RUNTIME_LIB=1``; CPU stages do not
  import the ``tvm`` package at all, so a full install's process is the same).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmcompile.bench import BenchError

ENGINES = ("onnxruntime", "mmcompile")
_CHILD = Path(__file__).resolve().with_name("deploy_child.py")


def _environment(engine: str, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    env.update(OMP_NUM_THREADS=str(threads), TVM_NUM_THREADS=str(threads))
    if engine == "mmcompile":
        env["TVM_USE_RUNTIME_LIB"] = "1"
    return env


def start_once(engine: str, model: Path, inputs: Path, threads: int, runs: int,
               timeout: float) -> dict[str, Any]:
    """One fresh deployed process: cold start (ms), steady and peak RSS (MB), module count."""
    env = _environment(engine, threads)
    started = time.time()
    proc = subprocess.run([sys.executable, str(_CHILD), engine, str(model), str(inputs),
                           str(threads), str(runs)], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"{engine} on {model.name}: the deployed process failed: {tail}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"cold_start_ms": (report["first_result_at"] - started) * 1e3,
            "rss_mb": report["rss_mb"], "peak_rss_mb": report["peak_rss_mb"],
            "modules": report["modules"]}


def _compile(onnx: Path, out: Path, threads: int, fallback: str | None) -> Path:
    import mmcompile
    compiled = mmcompile.compile(str(onnx), target="cpu", verify=False, threads=threads,
                                 fallback=fallback)
    try:
        return compiled.save(out)
    finally:
        compiled.close()


def run_deploy(options, *, models: Sequence[str] | None = None,
               model_file: str | os.PathLike | None = None,
               corpus: Sequence[str] | None = None,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The deploy view of suite ``models`` (or one ``model_file``, or the named ``corpus``
    models at their real inputs) at each batch of
    ``options`` (a :class:`~mmcompile.bench.harness.BenchOptions`: ``batches``, ``threads``,
    ``rounds``, ``repeat``, ``timeout``, ``fallback``).

    Returns:
        ``machine``, ``settings``, ``results`` (per model x batch x engine: median cold start
        and steady RSS over the rounds, each round's figures, ratios to onnxruntime) and
        ``summary`` (the worst ratios).
    """
    from mmcompile.bench.harness import (available_cores, prepare_corpus, prepare_file,
                                         prepare_suite)
    from mmcompile.bench.results import machine_info
    from mmcompile.bench.suite import SUITES
    say = progress or (lambda message: None)
    started = time.perf_counter()
    cores = available_cores()
    threads = options.threads or cores
    rounds = max(1, options.rounds)
    runs = max(1, min(options.repeat, 20))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mmcompile-deploy-") as tmp:
        folder = Path(tmp)
        if model_file is not None:
            workloads = prepare_file(model_file, options.batches, folder, threads, say)
        elif corpus is not None:
            workloads = prepare_corpus(corpus, folder, threads, say)
        else:
            workloads = prepare_suite(list(models or SUITES["multimodal"]), options.batches,
                                      folder, say)
        for w in workloads:
            clock = time.perf_counter()
            artifact = _compile(w.onnx, folder / f"{w.onnx.stem}.mmc", threads,
                                options.fallback)
            say(f"compiled {w.model} at batch {w.batch} ({time.perf_counter() - clock:.1f}s)")
            models_for = {"onnxruntime": w.onnx, "mmcompile": artifact}
            tries: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
            for _ in range(rounds):
                for engine in ENGINES:
                    tries[engine].append(start_once(engine, models_for[engine], w.inputs,
                                                    threads, runs, options.timeout))
            for engine in ENGINES:
                done = tries[engine]
                rows.append({"model": w.model, "batch": w.batch, "engine": engine,
                             "cold_start_ms": statistics.median(t["cold_start_ms"]
                                                                for t in done),
                             "rss_mb": statistics.median(t["rss_mb"] for t in done),
                             "peak_rss_mb": statistics.median(t["peak_rss_mb"] for t in done),
                             "modules": done[-1]["modules"], "rounds": done})
            base = rows[-len(ENGINES)]
            for row in rows[-len(ENGINES):]:
                row["cold_start_ratio"] = row["cold_start_ms"] / base["cold_start_ms"]
                row["rss_ratio"] = row["rss_mb"] / base["rss_mb"]
            mm = rows[-len(ENGINES) + 1]
            say(f"{w.model} b{w.batch}: cold start {mm['cold_start_ms']:.0f} ms vs "
                f"{base['cold_start_ms']:.0f} ms ({mm['cold_start_ratio']:.2f}x), steady RSS "
                f"{mm['rss_mb']:.0f} MB vs {base['rss_mb']:.0f} MB ({mm['rss_ratio']:.2f}x)")
    deployed = [r for r in rows if r["engine"] == "mmcompile"]
    return {"machine": machine_info(threads, cores),
            "settings": {"batches": list(options.batches), "threads": threads,
                         "rounds": rounds, "runs_after_first": runs, "engines": list(ENGINES)},
            "results": rows,
            "summary": {"worst_cold_start_ratio": max(r["cold_start_ratio"] for r in deployed),
                        "worst_rss_ratio": max(r["rss_ratio"] for r in deployed)},
            "total_s": round(time.perf_counter() - started, 1)}


def deploy_table(doc: dict[str, Any]) -> str:
    """One line per model x batch x engine."""
    from mmcompile.report import format_table
    rows = [(r["model"], r["batch"], r["engine"], f"{r['cold_start_ms']:.0f}",
             f"{r['cold_start_ratio']:.2f}x", f"{r['rss_mb']:.0f}", f"{r['rss_ratio']:.2f}x",
             f"{r['peak_rss_mb']:.0f}", r["modules"]) for r in doc["results"]]
    table = format_table(["model", "batch", "engine", "cold start ms", "vs ORT",
                          "steady RSS MB", "vs ORT", "peak RSS MB", "modules"], rows)
    s = doc["summary"]
    return (f"{table}\n\nworst mmcompile / onnxruntime: cold start "
            f"{s['worst_cold_start_ratio']:.2f}x, steady RSS {s['worst_rss_ratio']:.2f}x "
            f"({doc['settings']['rounds']} round(s), medians; cold start = process start to "
            f"first result)")
