"""Design-space exploration: a quantized model's layers costed on a sweep of descriptions.

``mmcompile explore model.onnx --calibration calib.npz --sweep "rows=8,16,32 cols=8,16,32
sram_kib=128,256,512"``: every combination of the values is a description (the base one,
``--target "accel{preset=...}"``, with those fields changed: :meth:`AccelSpec.with_overrides`);
each is asked which layers it runs (:func:`~.importer.analyse`), each layer is tiled for it
(:func:`~.lowering.lower`) and costed by the cycle model (:func:`~.cost.estimate`). Nothing is
simulated: the point is the model's figures before the hardware exists.

Per point: modelled latency (the layers one after another), energy, utilization (MACs over
PE-cycles) and an area proxy, ``PEs + SRAM KiB`` (scratchpad and accumulator): a ranking
aid, not a silicon estimate (one int8 MAC with its registers is taken to cost about as much
area as one KiB of SRAM). A point is on the Pareto front when no other point is at least as
good on latency, energy and area and better on one. A description the checks refuse (a
scratchpad too small for one tile of the array) is a row with the error, not a failure.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mmcompile.targets.accel.spec import AccelSpec, AccelSpecError

from mmcompile.errors import InputError

if TYPE_CHECKING:
    from mmcompile.ir import Graph

ALIASES = {"sram_kib": "scratchpad_kib", "acc_kib": "accumulator_kib"}


@dataclass
class Point:
    """One description of the sweep and what the cycle model says of the model on it."""

    overrides: dict[str, Any]
    name: str
    latency_ms: float = 0.0
    energy_uj: float = 0.0
    utilization: float = 0.0
    area: float = 0.0
    layers: int = 0
    host_layers: int = 0
    pareto: bool = False
    error: str = ""
    per_layer: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"overrides": self.overrides, "name": self.name,
                "latency_ms": round(self.latency_ms, 6), "energy_uj": round(self.energy_uj, 4),
                "utilization": round(self.utilization, 4), "area_proxy": round(self.area, 1),
                "layers": self.layers, "host_layers": self.host_layers, "pareto": self.pareto,
                "error": self.error}


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_sweep(text: str) -> dict[str, list[Any]]:
    """``"rows=8,16 cols=16 sram_kib=128,256"`` -> field -> values (``sram_kib`` is the
    scratchpad, ``acc_kib`` the accumulator; other names are :class:`AccelSpec` fields).

    Raises:
        InputError: an item is not ``FIELD=V1,V2,...``.
    """
    sweep: dict[str, list[Any]] = {}
    for item in text.split():
        key, sep, values = item.partition("=")
        if not sep or not key or not values.strip(","):
            raise InputError(f"expected FIELD=V1,V2,... in --sweep, got '{item}'")
        sweep[ALIASES.get(key, key)] = [_value(v) for v in values.split(",") if v]
    if not sweep:
        raise InputError("--sweep is empty; e.g. --sweep 'rows=8,16,32 cols=8,16,32'")
    return sweep


def cost_point(graph: Graph, spec: AccelSpec) -> tuple[list[dict[str, Any]], int]:
    """Per layer the ``spec`` runs: the cycle model's figures; and how many contractions
    stay on the host."""
    from mmcompile.targets.accel.cost import estimate
    from mmcompile.targets.accel.importer import analyse
    from mmcompile.targets.accel.lowering import lower
    found = analyse(graph, spec)
    rows = []
    for name, match in found.layers.items():
        report = estimate(lower(spec, match.layer), spec)
        rows.append({"name": name, "seconds": report.seconds, "cycles": report.cycles,
                     "macs": report.macs, "energy_uj": report.energy_pj["total"] / 1e6})
    return rows, len(found.refused)


def explore(graph: Graph, base: AccelSpec, sweep: Mapping[str, Sequence[Any]],
            progress: Callable[[str], None] = lambda message: None) -> list[Point]:
    """Every point of ``sweep`` over ``base``, costed (see the module docstring), the Pareto
    front marked.

    Raises:
        InputError: the sweep names no field of a description (an unknown field, named).
    """
    keys = list(sweep)
    combos = list(itertools.product(*(sweep[k] for k in keys)))
    points = []
    for index, values in enumerate(combos, 1):
        overrides = dict(zip(keys, values))
        label = ",".join(f"{k}={v}" for k, v in overrides.items())
        progress(f"[{index}/{len(combos)}] {label}")
        try:
            spec = base.with_overrides(**overrides)
        except AccelSpecError as exc:
            if "unknown field" in str(exc):
                raise InputError(f"--sweep: {exc}") from None
            points.append(Point(overrides, label, error=str(exc).split(": ", 1)[-1]))
            continue
        except TypeError as exc:
            raise InputError(f"--sweep: {exc}") from None
        rows, host = cost_point(graph, spec)
        cycles = sum(r["cycles"] for r in rows)
        points.append(Point(
            overrides, spec.name, latency_ms=sum(r["seconds"] for r in rows) * 1e3,
            energy_uj=sum(r["energy_uj"] for r in rows),
            utilization=sum(r["macs"] for r in rows) / (spec.pe_count * cycles) if cycles else 0,
            area=spec.pe_count + (spec.scratchpad_kib + spec.accumulator_kib),
            layers=len(rows), host_layers=host, per_layer=rows))
    mark_pareto(points)
    return points


def mark_pareto(points: Sequence[Point]) -> None:
    """Set ``pareto`` on the points no other valid point dominates (latency, energy, area);
    in place."""
    valid = [p for p in points if not p.error]

    def key(p: Point) -> tuple[float, float, float]:
        return (p.latency_ms, p.energy_uj, p.area)

    for p in valid:
        p.pareto = not any(all(a <= b for a, b in zip(key(q), key(p))) and key(q) != key(p)
                           for q in valid)


def plot(points: Sequence[Point], path: str, title: str) -> None:
    """Latency against energy and against the area proxy, the Pareto front marked; written
    as .png or .svg by extension."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmcompile.report import save_figure
    valid = [p for p in points if not p.error]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (attr, label) in zip(axes, (("energy_uj", "energy (uJ)"),
                                        ("area", "area proxy (PEs + SRAM KiB)"))):
        for front, style in ((False, {"color": "0.6", "marker": "o", "s": 18}),
                             (True, {"color": "tab:red", "marker": "*", "s": 90})):
            chosen = [p for p in valid if p.pareto == front]
            ax.scatter([p.latency_ms * 1e3 for p in chosen], [getattr(p, attr) for p in chosen],
                       label="Pareto front" if front else "other points", **style)
        for p in valid:
            if p.pareto:
                ax.annotate(",".join(str(v) for v in p.overrides.values()),
                            (p.latency_ms * 1e3, getattr(p, attr)), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("modelled latency (us)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
