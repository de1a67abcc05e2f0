"""One benchmark measurement in a child process: ``python runner.py JOB.json``.

The parent starts this file by path, once per (model, batch, engine), with the thread count
already in the environment (OMP/MKL/TVM read theirs before any code here runs). The child
imports the engine's framework, records its resident memory, loads the model, prepares it
(compile / session creation), calls it once (``compile_s`` = prepare + first call), warms up,
then times up to ``repeat`` calls, stopping early once the timed calls add up to ``max_time``
seconds (after at least ``min_runs``): all at once, or, when the job names ``control`` pipes,
a slice at a time as the parent says, in lock-step with the other engines' children
(:func:`mmcompile.bench.harness.run_lockstep`). It writes the outputs of the last call to
``job["outputs"]`` (.npz) and a result to ``job["result"]`` (JSON); a failure is written there
as ``{"error": ...}`` with exit status 1.

Started by path and not as ``-m mmcompile.bench.runner``, so nothing beyond the engine's own
framework is imported: ``import mmcompile`` alone adds ~30 MB, which would be charged to
onnxruntime's peak memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent


def status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` memory figure (``VmHWM``, ``VmRSS``) in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux's ``VmHWM``, not ``getrusage().ru_maxrss``: the latter survives ``exec`` and so starts
    at the parent's size at fork time (the benchmark's parent holds torch and every exported
    model, ~450 MB), which would be charged to every engine.
    """
    peak = status_mb("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _load_engines():
    spec = importlib.util.spec_from_file_location("_mmcompile_bench_engines", _HERE / "engines.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job`` (see :func:`mmcompile.bench.harness.make_job`); returns the result fields."""
    engine = _load_engines().get_engine(job["engine"])()
    feeds = dict(np.load(job["inputs"], allow_pickle=False))

    start = time.perf_counter()
    engine.import_libraries(job)
    import_s = time.perf_counter() - start
    base_rss = _rss_mb()

    start = time.perf_counter()
    model = engine.load(job)
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    run, facts = engine.prepare(model, job)
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    outputs = run(feeds)
    first_s = time.perf_counter() - start

    # At least ``warmup`` calls and ``warmup_s`` seconds, the same for every engine: a freshly
    # compiled TVM model ran 30% slower over its first few hundred calls (MOSEI-TFN 0.42 ->
    # 0.32 ms), which a 3-call warm-up charged to the engine.
    warm_until = time.perf_counter() + job.get("warmup_s", 0.0)
    done = 0
    while done < job["warmup"] or time.perf_counter() < warm_until:
        outputs = run(feeds)
        done += 1
    times: list[float] = []
    slices: list[float] = []  # wall-clock start of each lock-step slice
    if job.get("control"):
        outputs = _timed_on_command(run, feeds, job, times, slices) or outputs
    else:
        outputs = _time_calls(run, feeds, job, times, job["repeat"]) or outputs
    peak_rss = _rss_mb()
    np.savez(job["outputs"], **{k: np.asarray(v) for k, v in outputs.items()})
    return {"times_ms": [t * 1e3 for t in times], "import_s": import_s, "load_s": load_s,
            "prepare_s": prepare_s, "first_run_s": first_s, "compile_s": prepare_s + first_s,
            "base_rss_mb": base_rss, "peak_rss_mb": peak_rss, "slice_starts": slices, **facts}


def _time_calls(run, feeds, job: dict[str, Any], times: list[float], calls: int):
    """Time up to ``calls`` more calls into ``times`` (never past ``repeat`` in all), stopping
    once ``max_time`` seconds of timed calls have passed with ``min_runs`` done; returns the
    last outputs (None when nothing ran)."""
    outputs, spent = None, sum(times)
    for _ in range(calls):
        if _full(job, len(times), spent):
            break
        t0 = time.perf_counter()
        outputs = run(feeds)
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return outputs


def _full(job: dict[str, Any], count: int, spent: float) -> bool:
    """Whether ``count`` timed calls taking ``spent`` seconds are all ``job`` asks for."""
    return count >= job["repeat"] or (spent > job["max_time"] and count >= job["min_runs"])


def _timed_on_command(run, feeds, job: dict[str, Any], times: list[float],
                      slices: list[float]):
    """Lock-step timing (see :func:`mmcompile.bench.harness.run_lockstep`): report ``ready``,
    then time ``run N`` calls at a time as the parent says (each slice after
    ``slice_warmup`` untimed calls), answering ``ran`` (or ``full`` once
    ``repeat`` calls or ``max_time`` are reached), until ``stop``."""
    commands = os.fdopen(job["control"]["commands"], "r")
    replies = os.fdopen(job["control"]["replies"], "w", buffering=1)
    replies.write("ready\n")
    outputs = None
    for line in commands:
        verb, _, arg = line.strip().partition(" ")
        if verb != "run":
            break
        slices.append(time.time())
        for _ in range(job.get("slice_warmup", 0)):  # back from idle: wake the pool, fill caches
            run(feeds)
        outputs = _time_calls(run, feeds, job, times, int(arg)) or outputs
        replies.write("full\n" if _full(job, len(times), sum(times)) else "ran\n")
    return outputs


def _one_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:500]


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[1]).read_text())
    try:
        result, status = measure(job), 0
    except Exception as exc:  # reported in the engine's row; the other engines go on
        result, status = {"error": _one_line(exc)}, 1
    tmp = Path(job["result"] + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, job["result"])
    return status


if __name__ == "__main__":
    # Python put this folder first on sys.path; drop it so that files here (suite.py,
    # report.py, ...) cannot shadow top-level modules of the same name.
    if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
        sys.path.pop(0)
    sys.exit(main(sys.argv))
