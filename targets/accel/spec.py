"""An accelerator description: :class:`AccelSpec`, read from a small TOML file or a preset.

One file says everything the tiler, the simulator and the cycle model need to know about an
int8 systolic-array accelerator, as VTA's ``vta_config.json`` does for VTA (and Gemmini's
``GemminiArrayConfig`` for Gemmini): the PE array, its dataflow, the on-chip buffers, the DRAM
interface, the clock, the ops it runs and what each access costs in energy. A description
is checked when it is read: a typo or an impossible value is an :class:`AccelSpecError` that
names the file (or preset) and the field, never a wrong answer later.

The file is flat (every field at the top level) plus an optional ``[energy]`` table::

    name = "my-npu"
    rows = 32
    cols = 32
    dataflow = "ws"            # "ws" weight-, "os" output-, "is" input-stationary
    clock_mhz = 800
    scratchpad_kib = 512       # inputs + weights (or give input_kib and weight_kib)
    accumulator_kib = 128
    double_buffer = true
    dram_gbps = 25.6           # or dram_bytes_per_cycle = 32
    dram_latency_cycles = 200
    ops = ["Conv", "MatMul", "Gemm", "Relu", "Clip", "QuantizeLinear", "DequantizeLinear",
           "MaxPool"]

    [energy]
    dram_pj_per_byte = 120.0

Dataflows follow SCALE-Sim's naming, with a GEMM ``(M, K) x (K, N)`` (a convolution: M output
pixels, K = C*kh*kw, N filters) mapped as: ``ws`` rows <- K, cols <- N, M streamed; ``os``
rows <- M, cols <- N, K streamed; ``is`` rows <- K, cols <- M, N streamed.

Default energies (45 nm, the figures the literature still scales from):

- MAC 0.3 pJ: an 8-bit integer multiply (0.2 pJ) plus a 32-bit integer add (0.1 pJ),
  M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014.
- PE register 0.15 pJ/byte: Eyeriss puts a register-file access at about 1x a MAC's energy
  for a 16-bit word (Chen, Emer, Sze, "Eyeriss: a spatial architecture for energy-efficient
  dataflow for CNNs", ISCA 2016, Fig. 4; the same normalised table Timeloop/Accelergy use).
- Scratchpad and accumulator SRAM 2.5 pJ/byte: Horowitz's 32 KB SRAM, 20 pJ per 64-bit read.
  Larger SRAMs cost more (his 1 MB figure is 100 pJ per 64 bits); presets say where they
  scale it.
- DRAM 160 pJ/byte: Horowitz's DRAM access, 1.3-2.6 nJ per 64 bits (the low end).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from mmcompile.errors import MMCompileError

DATAFLOWS = ("ws", "os", "is")
# ONNX op types the description may list. The contractions (Conv, MatMul, Gemm) are the ones
# the array runs; the others are what the ALU does around them (requantize = QuantizeLinear /
# DequantizeLinear folded into the epilogue, Relu / Clip as the clamp of the requantization,
# MaxPool on the ALU when declared). AveragePool may be declared (hardware that has it) but
# is not lowered: its float mean has no bit-exact integer form, so it stays on the host.
KNOWN_OPS = ("Conv", "MatMul", "Gemm", "Relu", "Clip", "QuantizeLinear", "DequantizeLinear",
             "MaxPool", "AveragePool")
CONTRACTIONS = ("Conv", "MatMul", "Gemm")
# The simulator is an int8 x int8 -> int32 machine; other widths are described but refused.
OPERAND_BITS = 8
ACCUMULATOR_BITS = 32


class AccelSpecError(MMCompileError):
    """An accelerator description is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class EnergyModel:
    """Energy per access at each level of the memory hierarchy (pJ). Defaults: see the module
    docstring for their sources."""

    mac_pj: float = 0.3
    register_pj_per_byte: float = 0.15
    scratchpad_pj_per_byte: float = 2.5
    accumulator_pj_per_byte: float = 2.5
    dram_pj_per_byte: float = 160.0


@dataclass(frozen=True)
class AccelSpec:
    """An int8 systolic-array accelerator.

    Attributes:
        name: what reports and errors call it.
        rows, cols: the PE array.
        dataflow: the dataflow compiled for (one of ``dataflows``).
        dataflows: the dataflows the hardware can run (Gemmini: both ``ws`` and ``os``).
        clock_mhz: array and buffer clock.
        scratchpad_kib: on-chip SRAM for input and weight tiles.
        input_kib, weight_kib: a fixed split of the scratchpad (VTA has separate buffers);
            None: one shared scratchpad the tiler splits as it likes.
        accumulator_kib: int32 accumulator SRAM.
        output_kib: a separate int8 output buffer (VTA), informational; None: results are
            requantized on their way out of the accumulator (Gemmini).
        double_buffer: whether tiles are double-buffered (loads overlap compute).
        dram_bytes_per_cycle: DRAM bandwidth at ``clock_mhz``.
        dram_latency_cycles: cycles from a DRAM request to its first byte.
        ops: the ONNX op types it runs (:data:`KNOWN_OPS`).
        energy: per-access energies.
        operand_bits, accumulator_bits: 8 and 32 (the only widths simulated).
        source: where the figures come from (free text, for reports).
    """

    name: str
    rows: int
    cols: int
    dataflow: str
    clock_mhz: float
    scratchpad_kib: float
    accumulator_kib: float
    dram_bytes_per_cycle: float
    dram_latency_cycles: int
    ops: tuple[str, ...]
    dataflows: tuple[str, ...] = ()
    input_kib: float | None = None
    weight_kib: float | None = None
    output_kib: float | None = None
    double_buffer: bool = True
    energy: EnergyModel = field(default_factory=EnergyModel)
    operand_bits: int = OPERAND_BITS
    accumulator_bits: int = ACCUMULATOR_BITS
    source: str = ""

    # -- derived figures ------------------------------------------------------------------

    @property
    def slots(self) -> int:
        """Buffers per operand: 2 when double-buffered (one loads while the other computes)."""
        return 2 if self.double_buffer else 1

    @property
    def scratchpad_bytes(self) -> int:
        return int(self.scratchpad_kib * 1024)

    @property
    def accumulator_bytes(self) -> int:
        return int(self.accumulator_kib * 1024)

    @property
    def dram_gbps(self) -> float:
        return self.dram_bytes_per_cycle * self.clock_mhz / 1000.0

    @property
    def pe_count(self) -> int:
        return self.rows * self.cols

    def supports_op(self, op_type: str) -> bool:
        """Whether ``op_type`` (an ONNX op type) is one this accelerator declares."""
        return op_type in self.ops

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> AccelSpec:
        """An :class:`AccelSpec` from a TOML-shaped dict (see the module docstring).

        Raises:
            AccelSpecError: an unknown key, a missing field, a wrong type or an impossible
                value; the message names ``source`` and the field.
        """
        return _build(dict(data), source)

    def with_overrides(self, **changes: Any) -> AccelSpec:
        """A copy with some fields changed (a sweep's ``rows=8,16,32``), checked again.
        ``energy`` may be a partial dict of :class:`EnergyModel` fields; ``name`` defaults to
        this name with the changes appended, so sweep points stay distinguishable.

        Raises:
            AccelSpecError: as :meth:`from_dict`.
        """
        data = self.to_dict()
        energy = changes.pop("energy", None)
        if energy is not None:
            if not isinstance(energy, dict):
                raise AccelSpecError(f"overrides of '{self.name}': field 'energy' must be a "
                                     f"table of energies, got {energy!r}")
            data["energy"] = {**data["energy"], **energy}
        if "name" not in changes and (changes or energy):
            suffix = ",".join(f"{k}={v}" for k, v in changes.items())
            data["name"] = f"{self.name}{{{suffix}}}" if suffix else self.name
        if "dataflow" in changes and "dataflows" not in changes \
                and changes["dataflow"] not in data["dataflows"]:
            data["dataflows"] = [*data["dataflows"], changes["dataflow"]]
        data.update(changes)
        return _build(data, f"overrides of '{self.name}'")

    def to_dict(self) -> dict[str, Any]:
        """The TOML-shaped dict :meth:`from_dict` reads back (None fields left out)."""
        data = {k: v for k, v in asdict(self).items() if v is not None}
        data["ops"] = list(self.ops)
        data["dataflows"] = list(self.dataflows)
        return data

    def describe(self) -> dict[str, Any]:
        """JSON-able facts for a manifest or a CLI table: the fields plus derived figures."""
        data = self.to_dict()
        data.update(pe_count=self.pe_count,
                    peak_gops=round(2 * self.pe_count * self.clock_mhz / 1000.0, 3),
                    dram_gbps=round(self.dram_gbps, 3),
                    sram_bytes=self.scratchpad_bytes + self.accumulator_bytes)
        return data


# -- checking ---------------------------------------------------------------------------------

_REQUIRED = ("name", "rows", "cols", "dataflow", "clock_mhz", "scratchpad_kib",
             "accumulator_kib", "dram_latency_cycles", "ops")
_FIELDS = {f.name for f in fields(AccelSpec)}
_INPUT_ONLY = {"dram_gbps"}  # accepted in a file, stored as dram_bytes_per_cycle


def _fail(source: str, name: str, message: str) -> AccelSpecError:
    return AccelSpecError(f"{source}: field '{name}': {message}")


def _positive_int(data: dict, source: str, name: str) -> int:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, name, f"must be an integer, got {value!r}")
    if value <= 0:
        raise _fail(source, name, f"must be positive, got {value}")
    return value


def _positive_number(data: dict, source: str, name: str, allow_zero: bool = False,
                     shown: str | None = None) -> float:
    value, name = data[name], shown or name
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(source, name, f"must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise _fail(source, name, f"must be {'non-negative' if allow_zero else 'positive'}, "
                                  f"got {value}")
    return float(value)


def _unknown(source: str, key: str, known: set[str]) -> AccelSpecError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return _fail(source, key, f"unknown field{hint}; fields: {', '.join(sorted(known))}")


def _energy(value: Any, source: str) -> EnergyModel:
    if isinstance(value, EnergyModel):
        return value
    if not isinstance(value, dict):
        raise _fail(source, "energy", f"must be a table of energies, got {value!r}")
    known = {f.name for f in fields(EnergyModel)}
    for key in value:
        if key not in known:
            raise _unknown(source, f"energy.{key}", {f"energy.{k}" for k in known})
    return EnergyModel(**{k: _positive_number(value, source, k, allow_zero=True,
                                              shown=f"energy.{k}") for k in value})


def _names(data: dict, source: str, name: str, known: tuple[str, ...]) -> tuple[str, ...]:
    value = data[name]
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise _fail(source, name, f"must be a non-empty list of names, got {value!r}")
    for item in value:
        if item not in known:
            raise _fail(source, name, f"unknown {'op' if name == 'ops' else 'dataflow'} "
                                      f"{item!r}; known: {', '.join(known)}")
    return tuple(dict.fromkeys(value))


def _build(data: dict[str, Any], source: str) -> AccelSpec:
    known = (_FIELDS | _INPUT_ONLY)
    for key in data:
        if key not in known:
            raise _unknown(source, key, known)
    if "dram_gbps" in data and "dram_bytes_per_cycle" in data:
        raise _fail(source, "dram_gbps", "give dram_gbps or dram_bytes_per_cycle, not both")
    if "scratchpad_kib" not in data and "input_kib" in data and "weight_kib" in data:
        data["scratchpad_kib"] = _positive_number(data, source, "input_kib") + \
            _positive_number(data, source, "weight_kib")
    for name in _REQUIRED:
        if name not in data:
            raise _fail(source, name, "missing (required)")
    if "dram_gbps" not in data and "dram_bytes_per_cycle" not in data:
        raise _fail(source, "dram_bytes_per_cycle", "missing (give it, or dram_gbps)")

    if not isinstance(data["name"], str) or not data["name"].strip():
        raise _fail(source, "name", f"must be a non-empty string, got {data['name']!r}")
    rows, cols = _positive_int(data, source, "rows"), _positive_int(data, source, "cols")
    clock = _positive_number(data, source, "clock_mhz")
    if "dram_gbps" in data:
        bandwidth = _positive_number(data, source, "dram_gbps") * 1000.0 / clock
    else:
        bandwidth = _positive_number(data, source, "dram_bytes_per_cycle")
    latency = data["dram_latency_cycles"]
    if isinstance(latency, bool) or not isinstance(latency, int) or latency < 0:
        raise _fail(source, "dram_latency_cycles",
                    f"must be a non-negative integer, got {latency!r}")
    flow = data["dataflow"]
    if flow not in DATAFLOWS:
        raise _fail(source, "dataflow", f"unknown dataflow {flow!r}; known: "
                                        f"{', '.join(DATAFLOWS)}")
    flows = _names(data, source, "dataflows", DATAFLOWS) if data.get("dataflows") else (flow,)
    if flow not in flows:
        raise _fail(source, "dataflow", f"{flow!r} is not among the dataflows the hardware "
                                        f"runs ({', '.join(flows)})")
    ops = _names(data, source, "ops", KNOWN_OPS)
    if not set(ops) & set(CONTRACTIONS):
        raise _fail(source, "ops", f"must include at least one of {', '.join(CONTRACTIONS)}")
    for name, expected in (("operand_bits", OPERAND_BITS),
                           ("accumulator_bits", ACCUMULATOR_BITS)):
        if name in data and (isinstance(data[name], bool) or data[name] != expected):
            raise _fail(source, name, f"only {expected} is supported (int8 operands, int32 "
                                      f"accumulators), got {data[name]!r}")
    double = data.get("double_buffer", True)
    if not isinstance(double, bool):
        raise _fail(source, "double_buffer", f"must be true or false, got {double!r}")
    for name in ("source",):
        if name in data and not isinstance(data[name], str):
            raise _fail(source, name, f"must be a string, got {data[name]!r}")

    scratchpad = _positive_number(data, source, "scratchpad_kib")
    accumulator = _positive_number(data, source, "accumulator_kib")
    parts = {k: _positive_number(data, source, k) for k in ("input_kib", "weight_kib",
                                                            "output_kib")
             if data.get(k) is not None}
    if ("input_kib" in parts) != ("weight_kib" in parts):
        missing = "weight_kib" if "input_kib" in parts else "input_kib"
        raise _fail(source, missing, "give both input_kib and weight_kib (a fixed split of "
                                     "the scratchpad), or neither")
    if "input_kib" in parts and parts["input_kib"] + parts["weight_kib"] > scratchpad + 1e-9:
        raise _fail(source, "scratchpad_kib", f"{scratchpad:g} KiB cannot hold input_kib + "
                                              f"weight_kib = "
                                              f"{parts['input_kib'] + parts['weight_kib']:g} KiB")
    spec = AccelSpec(name=data["name"].strip(), rows=rows, cols=cols, dataflow=flow,
                     dataflows=flows, clock_mhz=clock, scratchpad_kib=scratchpad,
                     input_kib=parts.get("input_kib"), weight_kib=parts.get("weight_kib"),
                     output_kib=parts.get("output_kib"), accumulator_kib=accumulator,
                     double_buffer=double, dram_bytes_per_cycle=bandwidth,
                     dram_latency_cycles=latency, ops=ops,
                     energy=_energy(data.get("energy", {}), source),
                     source=data.get("source", ""))
    _check_one_tile_fits(spec, source)
    return spec


def _check_one_tile_fits(spec: AccelSpec, source: str) -> None:
    """The smallest tile the tiler can make is one array fold of weights (rows x cols int8),
    one input vector (rows int8) and one accumulator row (cols int32), per buffer slot. A
    description whose buffers cannot hold that can run nothing."""
    slots = spec.slots
    weights, inputs, accs = spec.rows * spec.cols * slots, spec.rows * slots, spec.cols * 4 * slots
    if spec.input_kib is not None:
        if spec.weight_kib * 1024 < weights:
            raise _fail(source, "weight_kib", f"{spec.weight_kib:g} KiB cannot hold one "
                                              f"{spec.rows}x{spec.cols} weight tile per slot "
                                              f"({weights} bytes with {slots} slot(s))")
        if spec.input_kib * 1024 < inputs:
            raise _fail(source, "input_kib", f"{spec.input_kib:g} KiB cannot hold one input "
                                             f"vector of {spec.rows} per slot")
    elif spec.scratchpad_bytes < weights + inputs:
        raise _fail(source, "scratchpad_kib", f"{spec.scratchpad_kib:g} KiB cannot hold one "
                                              f"{spec.rows}x{spec.cols} tile ({weights + inputs} "
                                              f"bytes with {slots} slot(s)); the array is too "
                                              f"big for it")
    if spec.accumulator_bytes < accs:
        raise _fail(source, "accumulator_kib", f"{spec.accumulator_kib:g} KiB cannot hold one "
                                               f"row of {spec.cols} int32 sums per slot")


# -- presets ----------------------------------------------------------------------------------

# Every preset pools: VTA's ALU has MAX (VTA_ALU_OPCODE_MAX, used for its max pooling) and
# Gemmini max-pools on the way out of the accumulator (gemmini.h: gemmini_extended_config_st's
# pool_size / pool_stride); the edge NPU, ours, follows them.
_BASE_OPS = ["Conv", "MatMul", "Gemm", "Relu", "Clip", "QuantizeLinear", "DequantizeLinear",
             "MaxPool"]

_PRESETS: dict[str, dict[str, Any]] = {
    # apache/tvm-vta config/vta_config.json: LOG_BATCH=0, LOG_BLOCK=4 (a 1x16x16 GEMM per
    # cycle), LOG_INP/WGT/ACC_BUFF_SIZE = 15/18/17 (32 KiB / 256 KiB / 128 KiB), the output
    # buffer a quarter of the accumulator (int8 vs int32: 32 KiB). VTA's GEMM core reads a
    # 16x16 weight block per cycle and keeps it while inputs stream: weight-stationary. The
    # Pynq-Z1 build runs at 100 MHz over a 64-bit AXI port (8 bytes/cycle); the DRAM latency
    # is our assumption (Zynq-7000 DDR3 through the HP port, ~0.5 us).
    "vta-16x16": {
        "name": "vta-16x16", "rows": 16, "cols": 16, "dataflow": "ws", "clock_mhz": 100.0,
        "scratchpad_kib": 288, "input_kib": 32, "weight_kib": 256, "accumulator_kib": 128,
        "output_kib": 32, "double_buffer": True, "dram_bytes_per_cycle": 8.0,
        "dram_latency_cycles": 50, "ops": _BASE_OPS,
        "source": "TVM VTA vta_config.json defaults (pynq, 100 MHz, 64-bit AXI)"},
    # Gemmini's GemminiConfigs.defaultConfig: 16x16 mesh of 1x1 tiles, int8 inputs, int32
    # accumulators, sp_capacity 256 KiB, acc_capacity 64 KiB, Dataflow.BOTH, a 128-bit DMA
    # bus (16 bytes/cycle). Clock and DRAM latency are ours (1 GHz Chipyard SoC, ~100 ns).
    # Its scratchpad is 8x the 32 KB SRAM of Horowitz's figure: 2x the per-byte energy.
    "gemmini-16x16": {
        "name": "gemmini-16x16", "rows": 16, "cols": 16, "dataflow": "ws",
        "dataflows": ["ws", "os"], "clock_mhz": 1000.0, "scratchpad_kib": 256,
        "accumulator_kib": 64, "double_buffer": True, "dram_bytes_per_cycle": 16.0,
        "dram_latency_cycles": 100, "ops": _BASE_OPS,
        "energy": {"scratchpad_pj_per_byte": 5.0, "accumulator_pj_per_byte": 3.5},
        "source": "Gemmini defaultConfig (16x16 mesh, 256 KiB scratchpad, 64 KiB "
                  "accumulator, WS+OS, 128-bit DMA); 1 GHz assumed"},
    # Ours: a 32x32 weight-stationary edge NPU of the kind found next to a mobile SoC's
    # LPDDR4X (25.6 GB/s at 800 MHz = 32 bytes/cycle, ~250 ns latency), 512 KiB of shared
    # scratchpad, 128 KiB of accumulators, double-buffered; 1024 MACs, 1.6 TOPS peak.
    # SRAM energies scaled from Horowitz's 32 KB figure by size (his 1 MB costs 5x); DRAM at
    # 120 pJ/byte is our figure for LPDDR4X, below his DDR3 access (not a measured one).
    "edge-32x32": {
        "name": "edge-32x32", "rows": 32, "cols": 32, "dataflow": "ws",
        "dataflows": ["ws", "os"], "clock_mhz": 800.0, "scratchpad_kib": 512,
        "accumulator_kib": 128, "double_buffer": True, "dram_gbps": 25.6,
        "dram_latency_cycles": 200, "ops": _BASE_OPS,
        "energy": {"scratchpad_pj_per_byte": 6.0, "accumulator_pj_per_byte": 4.0,
                   "dram_pj_per_byte": 120.0},
        "source": "mmcompile's edge NPU: 32x32 WS, 512 KiB SRAM, LPDDR4X 25.6 GB/s, 800 MHz"},
}


def presets() -> dict[str, AccelSpec]:
    """The shipped descriptions by name: ``vta-16x16``, ``gemmini-16x16``, ``edge-32x32``."""
    return {name: _build(dict(data), f"preset '{name}'") for name, data in _PRESETS.items()}


def load_spec(path_or_name: str | Path) -> AccelSpec:
    """A preset by name, or a TOML description from a file.

    Raises:
        AccelSpecError: neither a preset nor a readable TOML file, or an invalid description
            (the message names the file and the field).
    """
    if isinstance(path_or_name, str) and path_or_name in _PRESETS:
        return _build(dict(_PRESETS[path_or_name]), f"preset '{path_or_name}'")
    path = Path(path_or_name)
    if not path.is_file():
        raise AccelSpecError(f"'{path_or_name}' is neither an accelerator preset "
                             f"({', '.join(_PRESETS)}) nor a description file")
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise AccelSpecError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise AccelSpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return _build(data, str(path))


__all__ = [
    "DATAFLOWS",
    "KNOWN_OPS",
    "AccelSpec",
    "AccelSpecError",
    "EnergyModel",
    "load_spec",
    "presets",
]
