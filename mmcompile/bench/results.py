"""Result rows: a child's measurement -> the documented JSON row; ratios, geomeans, machine.

A row always has the keys in :data:`ROW_KEYS` (timing keys are None when the engine failed, and
``match`` is then False, with the reason in ``error``). ``ratio_vs_onnxruntime`` is the
engine's median time divided by onnxruntime's for the same model and batch: below 1 is faster.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np

from mmcompile.reference import compare_outputs
from mmcompile.schedule import cpu_info

ROW_KEYS = ("model", "batch", "engine", "median_ms", "p10_ms", "p90_ms", "compile_s",
            "peak_rss_mb", "match")
BASELINE = "onnxruntime"
INT8_BASELINE = "onnxruntime-int8"
_VERSIONS = ("mmcompile", "torch", "onnxruntime", "apache-tvm", "onnx", "onnxscript",
             "transformers", "numpy")


def check_outputs(reference: Mapping[str, np.ndarray], path: str,
                  tolerance: float) -> tuple[bool, float, str | None]:
    """(match, worst error relative to max(1, max|ref|), problem or None) for a child's outputs."""
    try:
        with np.load(path, allow_pickle=False) as data:
            got = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        return False, math.inf, f"no outputs to check: {exc}"
    missing = [name for name in reference if name not in got]
    if missing:
        return False, math.inf, f"outputs missing: {missing} (got {sorted(got)})"
    diffs = compare_outputs(reference, got)
    worst = max((d.max_abs / max(1.0, d.ref_scale) if d.shape_ok else math.inf for d in diffs),
                default=0.0)
    if worst <= tolerance:
        return True, worst, None
    bad = [str(d) for d in diffs if not (d.shape_ok and d.max_abs <= tolerance *
                                         max(1.0, d.ref_scale))]
    return False, worst, "outputs differ from the reference: " + "; ".join(bad)


def make_row(model: str, batch: int, engine: str, result: Mapping[str, Any],
             reference: Mapping[str, np.ndarray], outputs_path: str, tolerance: float,
             extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The row for one measurement (``result`` as written by the runner, or ``{"error": ...}``)."""
    row: dict[str, Any] = {"model": model, "batch": batch, "engine": engine, "median_ms": None,
                           "p10_ms": None, "p90_ms": None, "compile_s": None,
                           "peak_rss_mb": None, "match": False, **(extra or {})}
    if "error" in result:
        row.update(error=result["error"], wall_s=_round(result.get("wall_s"), 1))
        return row
    times = np.asarray(result["times_ms"])
    match, worst, problem = check_outputs(reference, outputs_path, tolerance)
    row.update(median_ms=_round(np.median(times), 4), p10_ms=_round(np.percentile(times, 10), 4),
               p90_ms=_round(np.percentile(times, 90), 4), compile_s=_round(result["compile_s"], 3),
               peak_rss_mb=_round(result["peak_rss_mb"], 1), match=match,
               max_err=float(f"{worst:.3g}") if math.isfinite(worst) else None, runs=len(times),
               import_s=_round(result["import_s"], 2), base_rss_mb=_round(result["base_rss_mb"], 1),
               detail=result.get("detail", ""), wall_s=_round(result.get("wall_s"), 1))
    if "schedule" in result:  # mmcompile: the branch schedule it ran (issue: branch scheduling)
        row["schedule"] = result["schedule"]
    if "fallback_nodes" in result:  # mmcompile: nodes its target could not run
        row["fallback_nodes"] = result["fallback_nodes"]
    if problem:
        row["error"] = problem
    return row


def median_round(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Of one engine's rounds (separate processes), the one with the median latency (the
    lower of the two middle ones for an even count), with every round's median in
    ``rounds_ms``; a round that failed is reported if none ran."""
    if len(rows) == 1:
        return rows[0]
    timed = sorted((r for r in rows if r["median_ms"] is not None and r["match"]),
                   key=lambda r: r["median_ms"]) or \
        sorted((r for r in rows if r["median_ms"] is not None), key=lambda r: r["median_ms"])
    if not timed:
        return rows[0]
    chosen = dict(timed[(len(timed) - 1) // 2])
    chosen["rounds_ms"] = [r["median_ms"] for r in rows]
    return chosen


def pick_variant(rows: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Of one engine's variants (e.g. onnxruntime sequential/parallel), the fastest that matched
    (else the fastest that ran, else the first); the others' medians go in ``variants``."""
    def key(item: tuple[str, dict[str, Any]]) -> tuple:
        _, row = item
        return (not row["match"], row["median_ms"] is None, row["median_ms"] or 0.0)
    name, best = min(rows.items(), key=key)
    if len(rows) > 1:
        best = dict(best, variant=name,
                    variants={n: (r["median_ms"] if r["median_ms"] is not None else r.get("error"))
                              for n, r in rows.items()})
    return best


def add_ratios(rows: Sequence[dict[str, Any]]) -> None:
    """Set ``ratio_vs_onnxruntime`` on every row that has a time, where onnxruntime has one;
    and on int8 rows ``ratio_vs_onnxruntime_int8``, where ``onnxruntime-int8`` has one."""
    for baseline, key in ((BASELINE, "ratio_vs_onnxruntime"),
                          (INT8_BASELINE, "ratio_vs_onnxruntime_int8")):
        base = {(r["model"], r["batch"]): r["median_ms"] for r in rows
                if r["engine"] == baseline and r["median_ms"]}
        for row in rows:
            if key == "ratio_vs_onnxruntime_int8" and "quantization" not in row:
                continue
            ref = base.get((row["model"], row["batch"]))
            row[key] = (_round(row["median_ms"] / ref, 4)
                        if ref and row["median_ms"] is not None else None)


def geomeans(rows: Sequence[dict[str, Any]], baseline: str = BASELINE
             ) -> dict[str, dict[str, float | None]]:
    """engine -> {"<batch>": geomean ratio, ..., "all": ...} over rows where the engine and
    ``baseline`` both ran and matched their references."""
    ratio = "ratio_vs_onnxruntime" if baseline == BASELINE else "ratio_vs_onnxruntime_int8"
    base_ok = {(r["model"], r["batch"]) for r in rows if r["engine"] == baseline and r["match"]}
    values: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if ratio not in row:
            continue
        per_engine = values.setdefault(row["engine"], {})
        if row["match"] and row.get(ratio) and (row["model"], row["batch"]) in base_ok:
            for key in (str(row["batch"]), "all"):
                per_engine.setdefault(key, []).append(row[ratio])
    return {engine: {k: _round(math.exp(sum(map(math.log, v)) / len(v)), 4)
                     for k, v in groups.items()}
            for engine, groups in values.items()}


def _cpu_name() -> str:
    return cpu_info()["model"] or platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info(threads: int, cores_available: int) -> dict[str, Any]:
    """CPU, cores, threads used, memory, load and package versions (read without importing)."""
    versions = {"python": platform.python_version()}
    for package in _VERSIONS:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "cores_available": cores_available,
            "threads": threads, "memory_gb": _memory_gb(), "platform": platform.platform(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "versions": versions}


def _round(value: Any, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)
