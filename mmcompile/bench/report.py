"""Benchmark output: terminal tables, the JSON file and a bar chart (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmcompile.bench import BenchError
from mmcompile.report import format_table


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def models_table(doc: dict[str, Any]) -> str:
    """Model, parameters, GFLOPs per forward pass at each batch, inputs (per sample)."""
    batches = [str(b) for b in doc["settings"]["batches"]]
    rows = [(m["model"], f"{m['params']:,}",
             *(_fmt(m["flops"].get(b) and m["flops"][b] / 1e9, ".4f") for b in batches),
             ", ".join(f"{k}{v}" for k, v in m["inputs"].items()))
            for m in doc["models"]]
    return format_table(["model", "params", *(f"GFLOP b={b}" for b in batches),
                         "inputs (per sample)"], rows)


def results_table(doc: dict[str, Any]) -> str:
    """One line per model x batch x engine."""
    rows = []
    for r in doc["results"]:
        ratio = r.get("ratio_vs_onnxruntime")
        rows.append((r["model"], r["batch"], r["engine"], _fmt(r["median_ms"], ".3f"),
                     _fmt(r["p10_ms"], ".3f"), _fmt(r["p90_ms"], ".3f"),
                     f"{ratio:.2f}x" if ratio else "-", _fmt(r["compile_s"], ".2f"),
                     _fmt(r["peak_rss_mb"], ".0f"),
                     "yes" if r["match"] else ("ERROR" if r["median_ms"] is None else "NO")))
    return format_table(["model", "batch", "engine", "median ms", "p10 ms", "p90 ms", "vs ORT",
                         "compile s", "peak MB", "match"], rows)


def summary_table(doc: dict[str, Any], key: str = "geomean_ratio_vs_onnxruntime") -> str:
    """Geometric-mean time ratio to onnxruntime (or, ``key``, its int8 run) per engine and
    batch."""
    keys = [str(b) for b in doc["settings"]["batches"]] + ["all"]
    means = doc["summary"][key]
    rows = [(engine, *(f"{means[engine][k]:.3f}x" if means.get(engine, {}).get(k) else "-"
                       for k in keys)) for engine in doc["settings"]["engines"]
            if engine in means]
    return format_table(["engine", *(f"b={k}" if k != "all" else "all" for k in keys)], rows)


def int8_table(doc: dict[str, Any]) -> str:
    """Int8 rows: accuracy against the float model per output, and the quantization."""
    rows = []
    for r in doc["results"]:
        if "quantization" not in r:
            continue
        q = r["quantization"]
        held = (q.get("held_back") or {}).get("outputs", {})
        for name, acc in (r.get("accuracy_vs_float") or {"-": {}}).items():
            many = held.get(name, {})
            rows.append((r["model"], r["batch"], r["engine"], name,
                         _fmt(acc.get("cosine"), ".5f"),
                         "-" if acc.get("top1") is None else f"{acc['top1']:.0%}",
                         _fmt(many.get("cosine"), ".5f"),
                         "-" if many.get("top1") is None else f"{many['top1']:.1%}",
                         f"{q['layers_int8']}/{q['float_layers']}", f"{q['drop']:.4f}"))
    samples = next((r["quantization"]["held_back"]["samples"] for r in doc["results"]
                    if (r.get("quantization") or {}).get("held_back")), "held-back")
    return format_table(["model", "batch", "engine", "output", "cosine vs float",
                         "top-1 vs float", f"cosine, {samples} sets", f"top-1, {samples} sets",
                         "int8/float layers", "calibration drop"], rows)


def print_report(doc: dict[str, Any], out: Callable[[str], None] = print) -> None:
    machine = doc["machine"]
    out(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads per "
        f"engine, load average {machine['load_average'][0]} -> {machine['load_average_end'][0]}")
    out("")
    out(models_table(doc))
    out("")
    out(results_table(doc))
    if "onnxruntime" in doc["settings"]["engines"]:
        out("")
        out("geometric mean of time / onnxruntime time (below 1: faster than onnxruntime):")
        out(summary_table(doc))
    if "geomean_ratio_vs_onnxruntime_int8" in doc["summary"]:
        out("")
        out("int8 (the same QDQ file): accuracy against the float model")
        out(int8_table(doc))
        if "onnxruntime-int8" in doc["settings"]["engines"]:
            out("geometric mean of time / onnxruntime-int8 time:")
            out(summary_table(doc, "geomean_ratio_vs_onnxruntime_int8"))
    errors = [r for r in doc["results"] if r.get("error")]
    if errors:
        out("")
        out("problems:")
        for r in errors:
            out(f"  {r['model']} b={r['batch']} {r['engine']}: {r['error']}")
    out("")
    out(f"total {doc['total_s']:.0f}s; outputs checked against {doc['settings']['reference']} "
        f"(tolerance {doc['settings']['tolerance']:g} x max(1, max|ref|))")


def _atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise BenchError(f"cannot write {path}: {exc}") from exc
    return path


def write_json(doc: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the document (atomically); returns the path."""
    return _atomic(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=2) + "\n"))


def plot(doc: dict[str, Any], path: str | os.PathLike) -> Path:
    """Grouped bars, one panel per batch size: each model's time relative to onnxruntime per
    engine on a log scale (bars grow up from 1 when slower, down when faster), plus the geometric
    mean; median ms when onnxruntime was not run. Failed engines are marked with a red x,
    mismatching outputs hatched."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = doc["settings"]["batches"]
    relative = "onnxruntime" in doc["settings"]["engines"]
    engines = [e for e in doc["settings"]["engines"] if not (relative and e == "onnxruntime")]
    models = [m["model"] for m in doc["models"]]
    groups = models + (["geomean"] if relative else [])
    by_key = {(r["model"], r["batch"], r["engine"]): r for r in doc["results"]}
    means = doc["summary"]["geomean_ratio_vs_onnxruntime"]
    base = 1.0 if relative else 0.0
    fig, axes = plt.subplots(len(batches), 1, squeeze=False,
                             figsize=(max(7.0, 1.3 * len(groups) + 3), 3.4 * len(batches)))
    width = 0.8 / max(1, len(engines))
    for ax, batch in zip(axes[:, 0], batches):
        values = [base]
        for i, engine in enumerate(engines):
            for j, group in enumerate(groups):
                x = j - 0.4 + width * (i + 0.5)
                if group == "geomean":
                    value, ok = means.get(engine, {}).get(str(batch)), True
                else:
                    row = by_key.get((group, batch, engine), {})
                    value = row.get("ratio_vs_onnxruntime" if relative else "median_ms")
                    ok = bool(row.get("match"))
                if value is None:
                    ax.text(x, base or 1.0, "x", color="red", ha="center", va="center",
                            fontweight="bold")
                    continue
                values.append(value)
                ax.bar(x, value - base, width, bottom=base, color=f"C{i}",
                       hatch=None if ok else "//", edgecolor=None if ok else "black",
                       label=engine if j == 0 else None)
                ax.text(x, value, f"{value:.2f}", ha="center",
                        va="bottom" if value >= base else "top", fontsize=6)
        if relative:
            ax.set_yscale("log")
            ax.set_ylim(min(values) / 1.6, max(values) * 1.6)
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_ylabel("time / onnxruntime")
        else:
            ax.set_ylim(0, max(values) * 1.15)
            ax.set_ylabel("median ms")
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    machine = doc["machine"]
    fig.suptitle(f"mmcompile bench: {machine['cpu']}, {machine['threads']} threads per engine "
                 f"(lower is faster)", fontsize=10)
    fig.tight_layout()
    try:
        return _atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
