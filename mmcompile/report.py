"""Plain-text tables for the CLI and reports (no dependency: the output must stay greppable)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmcompile.errors import MMCompileError


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned text columns, numbers right-aligned, with a header rule."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1
               for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(row, widths, numeric)).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def quantization_lines(info: dict[str, Any]) -> list[str]:
    """A quantized model's record (``QuantizedModel.info()``, kept in artifacts) as text."""
    samples = ", ".join(f"{m} {n}" for m, n in info["samples"].items())
    lines = [f"quantization: {info['scheme']} (QDQ), weights {info['weights']}, activations "
             f"{info['activations']}, calibration {info['method']} on {samples} sample(s) "
             f"(data sha256 {info['calibration_sha256'][:16]}...); {info['layers_int8']} "
             f"layer(s) int8, {len(info['float_layers'])} kept in float"]
    for acc in info.get("accuracy", []):
        top1 = "" if acc.get("top1") is None else f", top-1 agreement {acc['top1']:.1%}"
        lines.append(f"  vs float, {acc['output']}: cosine {acc['cosine']:.5f}, max error "
                     f"{acc['max_err']:.3g}{top1} ({acc['samples']} held-back samples)")
    lines += [f"  float: {name}: {why}" for name, why in info["float_layers"].items()]
    return lines


def _is_number(text: str) -> bool:
    try:
        float(text.lstrip("+"))
    except ValueError:
        return False
    return True


def draw_timeline(entries: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
    """Gantt chart of one run (``CompiledModel.profile`` entries): one lane per worker or
    device (copies between memories on a lane of their own), one bar per stage coloured by its
    target, idle time visible as gaps. Written as .png or .svg by extension."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    lanes = sorted({e["lane"] for e in entries},
                   key=lambda lane: (lane == "caller", lane == "copies", lane))
    palette = plt.get_cmap("tab10")
    targets = sorted({e.get("target", "") for e in entries})
    colour = {t: palette(i % 10) for i, t in enumerate(targets)}
    fig, ax = plt.subplots(figsize=(9, 1.3 + 0.6 * len(lanes)))
    for entry in entries:
        row = lanes.index(entry["lane"])
        width = entry["end_ms"] - entry["start_ms"]
        ax.barh(row, width, left=entry["start_ms"], color=colour[entry.get("target", "")],
                edgecolor="black", linewidth=0.5)
        ax.text(entry["start_ms"] + width / 2, row, entry["stage"], ha="center", va="center",
                fontsize=8)
    ax.legend(handles=[Patch(color=colour[t], label=t or "stage") for t in targets],
              loc="upper right", fontsize=8, title="target")
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_xlabel("ms since the start of the run")
    ax.set_title(title or "stage timeline")
    ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    """Write a matplotlib figure to ``path`` (format by extension) and close it.

    Raises:
        MMCompileError: the file cannot be written (a missing or read-only folder).
    """
    import matplotlib.pyplot as plt
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise MMCompileError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)
