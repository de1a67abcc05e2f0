"""The ``accel`` target: quantized layers on the FPGA-like accelerator, the rest on its host.

Placement asks :meth:`AccelTarget.supports` node by node, of the instance
:meth:`AccelTarget.configured` made for the options (one per description, holding it); the
answer comes from :func:`~.importer.analyse` (cached per graph): the nodes of each QDQ Conv /
MatMul / Gemm layer (and MaxPool, when listed) the description runs go to the accelerator,
everything else to the host
target (``host``, default ``cpu``), each with the reason kept for the report. The planner may
also move whole branches to the host when the modelled latency drops
(:mod:`mmcompile.planning.moves`; option ``branch_moves=false`` turns that off). A graph
with no quantization is refused: the accelerator is an int8 machine, and the message says how to
quantize (``quantize="int8", calibration=...``; CLI ``--quantize int8 --calibration``).

A stage compiles to one instruction stream per layer (:func:`~.lowering.lower`), run in graph
order by the functional simulator (:func:`~.simulator.run`). The stage reads and writes the
quantized tensors of the QDQ graph (the uint8 / int8 outputs of its ``QuantizeLinear``
nodes): no quantization happens at its boundary (:mod:`.importer`). Its cost is the cycle
model's time (:func:`~.cost.estimate`, the layers one after another at the description's
clock), recorded as ``modelled_ms`` in the stage's info: the planner schedules with that
figure instead of the host time the simulation takes. The artifact holds each stream as
``<stage>.<i>.npz`` (:func:`~.isa.save`), and loading reads them back without recompiling.

Imports here stay cheap (no numpy, onnx or TVM): every target module loads with the
targets, in deployed processes too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcompile.targets.accel.spec import AccelSpec, load_spec, presets

from mmcompile.errors import MMCompileError
from mmcompile.target import (
    SUPPORTED,
    CompileOptions,
    Executable,
    Support,
    Target,
    TargetError,
    TargetOption,
    register_target,
)

if TYPE_CHECKING:
    from mmcompile.ir import Graph

DEFAULT_PRESET = "gemmini-16x16"
QUANTIZE_HINT = ("quantize it first: mmcompile compile ... --quantize int8 --calibration "
                 "calib.npz (Python: mmcompile.compile(..., quantize='int8', "
                 "calibration=...))")


def spec_from_options(options: Mapping[str, Any]) -> AccelSpec:
    """The description the options name: ``spec`` (a TOML file or a preset name) over
    ``preset``.

    Raises:
        AccelSpecError: an unknown preset, an unreadable or invalid file.
    """
    return load_spec(options.get("spec") or options.get("preset") or DEFAULT_PRESET)


class AccelExecutable(Executable):
    """A stage of accelerator layers: their streams, run one after another by the simulator.

    ``layers`` holds, per stream, the tensors it reads and writes and their shapes in the
    graph (a 1-D convolution's stream sees them with a unit height)."""

    def __init__(self, streams: list[Any], layers: list[dict[str, Any]], outputs: list[str],
                 info: Mapping[str, Any]):
        self.streams, self.layers, self.outputs = streams, layers, list(outputs)
        self.info = dict(info)

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        from mmcompile.targets.accel.simulator import run as simulate
        from mmcompile.runtime import host_array
        env = {name: host_array(value) for name, value in inputs.items()}
        for stream, layer in zip(self.streams, self.layers):
            x = env[layer["input"]].reshape(stream.tensors["x"].logical_shape)
            env[layer["output"]] = simulate(stream, {"x": x})["y"].reshape(
                layer["output_shape"])
        return {name: env[name] for name in self.outputs}

    def save(self, directory: Path, stem: str) -> dict[str, str]:
        from mmcompile.targets.accel.isa import save
        files = {}
        for index, stream in enumerate(self.streams):
            name = f"{stem}.{index}.npz"
            save(stream, Path(directory) / name)
            files[f"stream{index}"] = name
        return files

    def describe(self) -> dict[str, Any]:
        return dict(self.info)

    def replica(self) -> AccelExecutable:
        return self  # the simulator keeps no state between runs


@register_target
class AccelTarget(Target):
    """An int8 systolic-array accelerator (:mod:`mmcompile.targets.accel`), simulated on the
    host, with a cycle / energy model as its cost."""

    name = "accel"
    description = ("FPGA-like int8 systolic array (simulated; modelled cycles and energy): "
                   "QDQ Conv/MatMul/Gemm/MaxPool layers, the rest on the host target; presets "
                   + ", ".join(presets()))
    device = "accel"
    options = (
        TargetOption("preset", str, DEFAULT_PRESET, "the accelerator description: a preset "
                     "(see 'mmcompile targets')", tuple(presets())),
        TargetOption("spec", str, None, "a TOML description file instead of the preset "
                     "(CLI: --accel-spec FILE)"),
        TargetOption("host", str, "cpu", "the target for the nodes the accelerator does not "
                     "run (cpu, or onnxruntime for a quick build)"),
        TargetOption("branch_moves", bool, True, "let the planner move whole branches "
                     "(modality or fusion) to the host when that lowers the modelled latency "
                     "(schedule auto/parallel; false keeps every supported layer here)"),
    )

    def __init__(self, spec: AccelSpec | None = None) -> None:
        self.spec = spec  # None: the default preset
        self._analysis: tuple[int, str, int, Any] | None = None

    def configured(self, options: Mapping[str, Any]) -> AccelTarget:
        """A new instance holding the description the options name (placement asks it
        :meth:`supports`; two descriptions in one process are two instances).

        Raises:
            AccelSpecError: an invalid description.
        """
        return AccelTarget(spec_from_options(options))

    def host(self, options: Mapping[str, Any]) -> str:
        """The target that runs what the accelerator does not."""
        host = options.get("host") or "cpu"
        if host.split("{")[0].strip() == self.name:
            raise TargetError("target 'accel': option 'host' must name another target "
                              "(cpu, onnxruntime)")
        return host

    def branch_moves(self, options: Mapping[str, Any]) -> bool:
        """Whether the planner may move a whole branch to the host when the modelled latency
        drops (option ``branch_moves``, default true; see :mod:`mmcompile.planning.moves`)."""
        return bool(options.get("branch_moves", True))

    def analysis(self, graph: Graph) -> Any:
        """:func:`~.importer.analyse` of ``graph``, computed once per graph.

        Raises:
            MMCompileError: the graph has no quantized layer at all (not quantized).
        """
        from mmcompile.targets.accel.importer import analyse
        key = (id(graph), graph.name, len(graph.gs.nodes))
        if self._analysis is None or self._analysis[:3] != key:
            result = analyse(graph, self.spec or load_spec(DEFAULT_PRESET))
            if not result.quantized:
                raise MMCompileError(f"target 'accel' runs int8 QDQ layers and {graph.name} "
                                     f"is not quantized: {QUANTIZE_HINT}")
            self._analysis = (*key, result)
        return self._analysis[3]

    @classmethod
    def catalog(cls) -> tuple[str, list[str], list[tuple]]:
        """The shipped descriptions, for ``mmcompile targets``: a title, headers, rows."""
        rows = []
        for name, spec in presets().items():
            facts = spec.describe()
            rows.append((name, f"{spec.rows}x{spec.cols}", "/".join(spec.dataflows),
                         f"{spec.clock_mhz:g}", f"{spec.scratchpad_kib:g}",
                         f"{spec.accumulator_kib:g}", f"{facts['dram_gbps']:g}",
                         spec.dram_latency_cycles, f"{facts['peak_gops']:g}",
                         "yes" if spec.double_buffer else "no"))
        title = ("accel presets (accel{preset=NAME}, or --accel-spec FILE.toml with the same "
                 "fields)")
        return (title, ["preset", "array", "dataflows", "MHz", "scratchpad KiB",
                            "acc KiB", "DRAM GB/s", "DRAM latency", "peak GOPS",
                            "double buffer"], rows)

    def explore(self, graph: Graph, options: Mapping[str, Any], sweep: str,
                plot: str | None = None, progress: Any = None) -> list[dict[str, Any]]:
        """The cost model over a sweep of descriptions (:mod:`.explore`): one row per point,
        the Pareto front marked; the plot written to ``plot`` when given.

        Raises:
            AccelSpecError: the base description is invalid.
            InputError: a malformed sweep, or one naming no field of a description.
            MMCompileError: ``graph`` is not quantized.
        """
        from mmcompile.targets.accel import explore as space
        target = self.configured(options)
        target.analysis(graph)  # a graph that is not quantized is refused here, with the hint
        points = space.explore(graph, target.spec, space.parse_sweep(sweep),
                               progress or (lambda message: None))
        if plot:
            space.plot(points, plot, f"{graph.name} on {target.spec.name} variants")
        return [p.to_dict() for p in points]

    def supports(self, node: Any, graph: Graph) -> Support:
        found = self.analysis(graph)
        if node.name in found.owner:
            return SUPPORTED
        return Support(False, found.reason(node))

    def compile(self, graph: Graph, options: CompileOptions) -> Executable:
        from mmcompile.targets.accel.cost import estimate
        from mmcompile.targets.accel.importer import analyse
        from mmcompile.targets.accel.lowering import lower
        spec = spec_from_options(options.config)
        found = analyse(graph, spec)
        stray = [n.name for n in graph.gs.nodes if n.name not in found.owner]
        if stray:
            raise TargetError(f"accel: stage {graph.name} holds node(s) the accelerator does "
                              f"not run: {', '.join(stray[:5])}")
        order = [n.name for n in graph.gs.nodes if n.name in found.layers]
        streams, layers, reports = [], [], []
        for index, name in enumerate(order, 1):
            match = found.layers[name]
            options.progress(f"accel: lowering {name} ({index}/{len(order)}, "
                             f"{match.layer.label}) for {spec.name}")
            stream = lower(spec, match.layer)
            report = estimate(stream, spec)
            streams.append(stream)
            reports.append(report)
            layers.append(layer_facts(match, stream, report))
        info = stage_facts(spec, layers, [t.name for t in graph.gs.inputs],
                           [t.name for t in graph.gs.outputs])
        return AccelExecutable(streams, layers, info["outputs"], info)

    def load(self, directory: Path, files: Mapping[str, str], info: Mapping[str, Any],
             threads: int = 0) -> Executable:
        from mmcompile.targets.accel.isa import StreamError
        from mmcompile.targets.accel.isa import load as load_stream

        from mmcompile.artifact import ArtifactError
        try:
            layers = list(info["layers"])
            streams = [load_stream(Path(directory) / files[f"stream{i}"])
                       for i in range(len(layers))]
            return AccelExecutable(streams, layers, info["outputs"], info)
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{directory}: accelerator stage info lacks {exc}") from exc
        except StreamError as exc:
            raise ArtifactError(str(exc)) from exc


def layer_facts(match: Any, stream: Any, report: Any) -> dict[str, Any]:
    """What the manifest and ``inspect`` show of one layer: its wiring and the cycle
    model's figures."""
    return {"name": match.layer.name, "op": match.layer.op_type, "input": match.input,
            "output": match.output, "input_shape": list(match.input_shape),
            "output_shape": list(match.output_shape), "shape": match.layer.label,
            **({"gemm": list(match.layer.gemm_shape)} if hasattr(match.layer, "gemm_shape")
               else {"pool": list(match.layer.pool_shape)}),
            "tile": stream.info.get("tile"), "instructions": len(stream.instructions),
            "cycles": report.cycles, "seconds": report.seconds,
            "utilization": round(report.utilization, 4),
            "dram_bytes": report.dram_read_bytes + report.dram_write_bytes,
            "energy_uj": round(report.energy_pj["total"] / 1e6, 4), "macs": report.macs}


def stage_facts(spec: AccelSpec, layers: list[dict[str, Any]], inputs: list[str],
                outputs: list[str]) -> dict[str, Any]:
    """The stage's info: its layers, totals, and ``modelled_ms`` (the planner's cost)."""
    cycles = sum(layer["cycles"] for layer in layers)
    seconds = sum(layer["seconds"] for layer in layers)
    energy = sum(layer["energy_uj"] for layer in layers)
    macs = sum(layer["macs"] for layer in layers)
    return {"inputs": inputs, "outputs": outputs, "layers": layers,
            "accel": {"name": spec.name, "rows": spec.rows, "cols": spec.cols,
                      "dataflow": spec.dataflow, "clock_mhz": spec.clock_mhz,
                      "scratchpad_kib": spec.scratchpad_kib,
                      "accumulator_kib": spec.accumulator_kib},
            "modelled_ms": round(seconds * 1e3, 6), "cycles": cycles,
            "energy_uj": round(energy, 4),
            "utilization": round(macs / (spec.pe_count * cycles), 4) if cycles else 0.0,
            "detail": f"{spec.name}: {len(layers)} layer(s), {cycles:,} cycles = "
                      f"{seconds * 1e6:.1f} us modelled, {energy:.2f} uJ"}
