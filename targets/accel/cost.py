"""The performance model: cycles, utilization, DRAM traffic and energy of a stream.

Timing is a list schedule of the stream's three queues (:mod:`.isa`) under its dependency
tokens: an instruction starts when its queue is free and every token it pops has been
pushed; the earliest-ready instruction of any queue is placed next. What each instruction
costs:

- ``GEMM``: the array's cycles for its tile (:func:`.dataflow.gemm_cycles`: folds times
  preload + stream + the ``rows + cols - 2`` fill and drain skew);
- ``ALU``: one vector of ``cols`` lanes per cycle; ``POOL`` likewise, once per window
  element (a running maximum, VTA's ALU ``MAX`` over the window's rows);
- ``LOAD`` / ``STORE``: ``dram_latency_cycles`` plus ``bytes / dram_bytes_per_cycle``. The
  queues are in order, so one queue's transfers do not overlap each other's latency (as in
  VTA, whose load and store modules finish one instruction before taking the next); the
  queues share one DRAM channel, which carries one transfer's bytes at a time.

Buffer capacity shows up as stalls through the tokens: a load waits for a slot the array is
still reading (write after read), the array waits for a tile still in flight (read after
write). With double buffering the next tile's loads run under the current tile's GEMMs;
without it every tile pays its loads, compute and store in turn.

Energy is counted from the same instructions with the description's per-access figures:
MACs; PE registers (two operand bytes and a four-byte partial sum per MAC); scratchpad
writes (loaded bytes) and reads (:func:`.dataflow.sram_accesses`, and a pool's window);
accumulator words (bias load, GEMM partial sums, pool maxima, ALU read and write, store
read); DRAM bytes.

Validation: ``ideal_compute_cycles`` (the layer as one untiled GEMM, as SCALE-Sim maps it)
matches SCALE-Sim 3's stall-free "Total Cycles" to the cycle (its count is one lower; see
``tests/test_accel_cost.py`` and ``tests/data/accel_scalesim.json``); ``compute_cycles``
adds the fill and drain of the extra folds that tiling for the buffers costs, which SCALE-Sim
(its SRAMs streamed without re-tiling) does not model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from math import ceil
from typing import Any

from mmcompile.targets.accel import dataflow as df
from mmcompile.targets.accel.isa import (
    QUEUES,
    Alu,
    Gemm,
    Load,
    Pool,
    Store,
    Stream,
    StreamError,
    pops,
    pushes,
)
from mmcompile.targets.accel.spec import AccelSpec

REGISTER_BYTES_PER_MAC = 6  # two int8 operands read, one int32 partial sum updated


@dataclass
class LayerReport:
    """What the cycle model says about one stream.

    Attributes:
        cycles: end of the last instruction (all queues).
        seconds: ``cycles`` at the description's clock.
        compute_cycles: cycles the array is busy (sum of GEMM instructions).
        ideal_compute_cycles: the layer as one untiled GEMM (SCALE-Sim's figure).
        alu_cycles: cycles of ALU and POOL instructions.
        stall_cycles: cycles the compute queue waits (for data, or for a free accumulator).
        macs: multiply-accumulates of the layer.
        utilization: ``macs / (rows * cols * cycles)``.
        dram_read_bytes, dram_write_bytes: DRAM traffic.
        energy_pj: per level (``mac``, ``register``, ``scratchpad``, ``accumulator``,
            ``dram``) and ``total``.
        queue_busy: busy cycles per queue.
    """

    name: str
    accel: str
    dataflow: str
    cycles: int
    seconds: float
    compute_cycles: int
    ideal_compute_cycles: int
    alu_cycles: int
    stall_cycles: int
    macs: int
    utilization: float
    dram_read_bytes: int
    dram_write_bytes: int
    energy_pj: dict[str, float] = field(default_factory=dict)
    queue_busy: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.name} on {self.accel}: {self.cycles} cycles ({self.seconds * 1e6:.1f} "
                f"us), utilization {self.utilization:.1%}, DRAM "
                f"{self.dram_read_bytes + self.dram_write_bytes} B, energy "
                f"{self.energy_pj['total'] / 1e6:.3f} uJ")


def _duration(spec: AccelSpec, ins) -> tuple[int, float]:
    """``(cycles, DRAM bytes)`` of one instruction."""
    if isinstance(ins, Gemm):
        return df.gemm_cycles(spec.dataflow, spec.rows, spec.cols, ins.m, ins.k, ins.n), 0
    if isinstance(ins, Alu):
        return ceil(ins.m * ins.n / spec.cols), 0
    if isinstance(ins, Pool):
        return ceil(ins.m * ins.n / spec.cols) * ins.window, 0
    transfer = ceil(ins.dram_bytes / spec.dram_bytes_per_cycle)
    return spec.dram_latency_cycles + transfer, ins.dram_bytes


def schedule(stream: Stream, spec: AccelSpec) -> list[tuple[int, int]]:
    """``(start, end)`` cycle of every instruction (program order), by the list schedule in
    the module docstring.

    Raises:
        StreamError: the tokens deadlock.
    """
    instructions = stream.instructions
    queues = {q: [i for i, ins in enumerate(instructions) if ins.queue == q] for q in QUEUES}
    heads = dict.fromkeys(QUEUES, 0)
    free = dict.fromkeys(QUEUES, 0)
    pushed: dict[tuple[str, str], list[int]] = {}
    popped: Counter = Counter()
    dram_free = 0.0
    times: list[tuple[int, int]] = [(0, 0)] * len(instructions)
    for _ in range(len(instructions)):
        best = None
        for q in QUEUES:
            if heads[q] == len(queues[q]):
                continue
            i = queues[q][heads[q]]
            channels = pops(instructions[i])
            if any(popped[c] >= len(pushed.get(c, ())) for c in channels):
                continue
            ready = max([free[q]] + [pushed[c][popped[c]] for c in channels])
            if best is None or ready < best[0]:
                best = (ready, q, i, channels)
        if best is None:
            raise StreamError(f"stream '{stream.name}': the queues deadlock")
        ready, q, i, channels = best
        cycles, dram_bytes = _duration(spec, instructions[i])
        start = ready
        if dram_bytes:
            start = max(ready, dram_free)
            dram_free = start + dram_bytes / spec.dram_bytes_per_cycle
        start = ceil(start)
        end = start + cycles
        times[i] = (start, end)
        for c in channels:
            popped[c] += 1
        for c in pushes(instructions[i]):
            pushed.setdefault(c, []).append(end)
        free[q] = end
        heads[q] += 1
    return times


def _energy(stream: Stream, spec: AccelSpec, macs: int) -> dict[str, float]:
    e = spec.energy
    scratchpad = accumulator = 0
    dram = 0
    for ins in stream.instructions:
        if isinstance(ins, Load):
            dram += ins.dram_bytes
            rows, cols = ins.shape
            if ins.buffer in ("inp", "wgt"):
                scratchpad += rows * cols
            elif ins.buffer == "acc":
                accumulator += 4 * rows * cols
        elif isinstance(ins, Gemm):
            reads = df.sram_accesses(spec.dataflow, spec.rows, spec.cols, ins.m, ins.k, ins.n)
            scratchpad += reads["inp"] + reads["wgt"]
            accumulator += 4 * reads["acc"]
        elif isinstance(ins, Alu):
            accumulator += 8 * ins.m * ins.n
        elif isinstance(ins, Pool):
            scratchpad += ins.m * ins.n * ins.window
            accumulator += 4 * ins.m * ins.n
        elif isinstance(ins, Store):
            dram += ins.dram_bytes
            accumulator += 4 * ins.shape[0] * ins.shape[1]
    out = {"mac": macs * e.mac_pj,
           "register": macs * REGISTER_BYTES_PER_MAC * e.register_pj_per_byte,
           "scratchpad": scratchpad * e.scratchpad_pj_per_byte,
           "accumulator": accumulator * e.accumulator_pj_per_byte,
           "dram": dram * e.dram_pj_per_byte}
    out["total"] = sum(out.values())
    return {k: round(v, 3) for k, v in out.items()}


def estimate(stream: Stream, spec: AccelSpec | None = None) -> LayerReport:
    """Cycles, utilization, DRAM bytes and energy of ``stream``.

    Args:
        stream: a stream from :func:`~.lowering.lower` or :func:`~.isa.load`.
        spec: the accelerator to cost it on; by default the one it was compiled for. Another
            description may change clock, bandwidth, latency and energies, not the buffers
            or the array the tiles were made for.

    Raises:
        StreamError: the tokens deadlock.
        AccelSpecError: the stream's recorded description is invalid.
    """
    spec = spec or AccelSpec.from_dict(stream.accel, f"stream '{stream.name}'")
    times = schedule(stream, spec)
    cycles = max((end for _, end in times), default=0)
    busy: Counter = Counter()
    compute = alu = macs = reads = writes = 0
    for ins, (start, end) in zip(stream.instructions, times):
        busy[ins.queue] += end - start
        if isinstance(ins, Gemm):
            compute += end - start
            macs += ins.macs
        elif isinstance(ins, (Alu, Pool)):
            alu += end - start
        elif isinstance(ins, Load):
            reads += ins.dram_bytes
        elif isinstance(ins, Store):
            writes += ins.dram_bytes
    m, k, n = stream.info.get("gemm", (0, 0, 0))
    ideal = df.gemm_cycles(spec.dataflow, spec.rows, spec.cols, m, k, n) if m else 0
    return LayerReport(
        name=stream.name, accel=spec.name, dataflow=spec.dataflow, cycles=cycles,
        seconds=cycles / (spec.clock_mhz * 1e6), compute_cycles=compute,
        ideal_compute_cycles=ideal, alu_cycles=alu,
        stall_cycles=cycles - busy["compute"], macs=macs,
        utilization=macs / (spec.pe_count * cycles) if cycles else 0.0,
        dram_read_bytes=reads, dram_write_bytes=writes, energy_pj=_energy(stream, spec, macs),
        queue_busy=dict(busy))
