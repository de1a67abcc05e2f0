"""The accelerator's instruction stream: VTA's instructions (and a POOL) on three queues.

The machine (modelled on VTA, ``apache/tvm-vta`` ``src/sim/sim_driver.cc``) has three
in-order queues that run side by side:

- the **load** queue: ``LOAD`` of an input tile or a weight tile from DRAM into the
  scratchpad (``inp`` / ``wgt`` buffers);
- the **compute** queue: ``LOAD`` into the accumulator (the bias, broadcast over the tile's
  rows) and into the per-channel scale registers (``scl``), ``GEMM`` (an int8 x int8 tile
  summed into the int32 accumulator), ``POOL`` (window maxima of an input tile into the
  accumulator, VTA's ALU ``MAX``) and ``ALU`` (requantize: int32 -> output type, the
  ReLU / Clip clamp included);
- the **store** queue: ``STORE`` of an accumulator tile (already requantized) to DRAM.

Buffers are split into ``slots`` (two when double-buffered); an instruction names the slot it
reads or writes. Queues synchronise only through **dependency tokens**, as VTA's do: each
instruction may pop a token from its neighbour queues before it starts (``pop_prev``,
``pop_next``) and push one to them when it ends (``push_prev``, ``push_next``); ``prev`` of
compute is load and ``next`` is store. A token from load to compute says "the tile is in the
slot" (read after write); one from compute back to load says "the slot may be overwritten"
(write after read); compute and store trade the same two for accumulator slots. This is
what lets a load of tile ``i+1`` run while tile ``i`` computes, and what a stream without
the right tokens gets wrong, so the functional simulator runs the queues in the most eager
order the tokens allow (:func:`execution_order`): a missing token shows as a wrong result.

:func:`insert_dependences` derives the tokens from the slots instructions read and write;
the tiler writes instructions in program order and never sets a flag by hand.

A stream is saved as one ``.npz`` file (:func:`save`, atomically: a temp file renamed into
place): a JSON header (tensors, buffers, instructions, the accelerator description and the
layer's facts) and the constant tensors (weights, folded bias, requantization multipliers).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from mmcompile.errors import MMCompileError

LOAD_Q, COMPUTE_Q, STORE_Q = "load", "compute", "store"
QUEUES = (LOAD_Q, COMPUTE_Q, STORE_Q)
# Buffer -> element type. ``scl`` holds one float32 multiplier per output channel of a tile.
BUFFER_DTYPES = {"inp": "int8", "wgt": "int8", "acc": "int32", "scl": "float32"}
VIEWS = ("matrix", "im2col", "row")
FORMAT = "mmcompile-accel-stream"
VERSION = 1


class StreamError(MMCompileError):
    """An instruction stream is malformed, deadlocks, overflows a buffer, or cannot be read
    or written; the message names the stream and the instruction."""


@dataclass(frozen=True)
class Deps:
    """VTA's four dependency flags of one instruction."""

    pop_prev: bool = False
    pop_next: bool = False
    push_prev: bool = False
    push_next: bool = False

    def to_int(self) -> int:
        return self.pop_prev | self.pop_next << 1 | self.push_prev << 2 | self.push_next << 3

    @classmethod
    def from_int(cls, bits: int) -> Deps:
        return cls(bool(bits & 1), bool(bits & 2), bool(bits & 4), bool(bits & 8))


NO_DEPS = Deps()


@dataclass(frozen=True)
class Load:
    """DRAM ``tensor[rows, cols]`` -> ``buffer[slot]``. ``view`` says how the tensor is read:
    ``matrix`` (a 2-D region), ``im2col`` (rows and columns of the input's patch matrix,
    gathered from the NCHW tensor by the load unit, padding included), ``row`` (a 1-D
    tensor's ``cols`` broadcast over ``rows[1] - rows[0]`` rows: bias into the
    accumulator). ``dram_bytes`` is what the load reads from DRAM (an im2col tile reads
    each input pixel once, not once per patch)."""

    buffer: str
    slot: int
    tensor: str
    rows: tuple[int, int]
    cols: tuple[int, int]
    view: str = "matrix"
    dram_bytes: int = 0
    deps: Deps = NO_DEPS

    opcode = "LOAD"

    @property
    def queue(self) -> str:
        return COMPUTE_Q if self.buffer in ("acc", "scl") else LOAD_Q

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]

    def accesses(self) -> tuple[tuple, tuple]:
        return (), ((self.buffer, self.slot),)


@dataclass(frozen=True)
class Gemm:
    """``acc[acc][:m, :n] += inp[inp][:m, :k] @ wgt[wgt][:k, :n]`` (int8 x int8 -> int32)."""

    inp: int
    wgt: int
    acc: int
    m: int
    k: int
    n: int
    deps: Deps = NO_DEPS

    opcode = "GEMM"
    queue = COMPUTE_Q

    @property
    def macs(self) -> int:
        return self.m * self.k * self.n

    def accesses(self) -> tuple[tuple, tuple]:
        return (("inp", self.inp), ("wgt", self.wgt), ("acc", self.acc)), (("acc", self.acc),)


@dataclass(frozen=True)
class Pool:
    """``acc[acc][:m, :n] = max_j inp[inp][:m, c * window + j] - offset`` for each column ``c <
    n``: the window maxima of a pooling tile whose input rows were gathered by an im2col load
    (columns ``(channel, window)``), less the input's zero point (as the int8 operand), on
    the ALU."""

    inp: int
    acc: int
    m: int
    n: int
    window: int
    offset: int = 0
    deps: Deps = NO_DEPS

    opcode = "POOL"
    queue = COMPUTE_Q

    def accesses(self) -> tuple[tuple, tuple]:
        return (("inp", self.inp), ("acc", self.acc)), (("acc", self.acc),)


@dataclass(frozen=True)
class Alu:
    """Requantize ``acc[acc][:m, :n]`` in place, the clamp carrying ReLU / Clip. ``op``:

    - ``requant``: ``clip(rint(float32(acc) * scl[scl][:n]) + zero_point, lo, hi)`` (one
      multiplier per column);
    - ``rescale``: ``clip(rint(float32(float32(acc) * s) / t) + zero_point, lo, hi)`` with ``s,
      t = scl[scl][:2]`` (a dequantize then a quantize, as the QDQ graph computes them).
    """

    acc: int
    scl: int
    m: int
    n: int
    zero_point: int
    lo: int
    hi: int
    op: str = "requant"
    deps: Deps = NO_DEPS

    opcode = "ALU"
    queue = COMPUTE_Q

    def accesses(self) -> tuple[tuple, tuple]:
        return (("acc", self.acc), ("scl", self.scl)), (("acc", self.acc),)


@dataclass(frozen=True)
class Store:
    """``acc[acc][:rows, :cols]`` -> DRAM ``tensor[rows, cols]``, narrowed to its type."""

    acc: int
    tensor: str
    rows: tuple[int, int]
    cols: tuple[int, int]
    dram_bytes: int = 0
    deps: Deps = NO_DEPS

    opcode = "STORE"
    queue = STORE_Q

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]

    def accesses(self) -> tuple[tuple, tuple]:
        return (("acc", self.acc),), ()


Instruction = Load | Gemm | Pool | Alu | Store
_OPCODES = {cls.opcode: cls for cls in (Load, Gemm, Pool, Alu, Store)}
ALU_OPS = ("requant", "rescale")


@dataclass(frozen=True)
class TensorDecl:
    """A tensor in DRAM. ``shape`` is the 2-D view loads and stores address (an im2col
    input keeps its NCHW shape; its patch matrix is ``im2col['matrix']``).

    Attributes:
        role: ``input``, ``output`` or ``const``.
        flip_sign: loads read uint8 data as int8 by flipping the top bit (``q - 128``).
        im2col: the convolution geometry of an im2col input (kernel, strides, pads,
            dilations, pad value, patch matrix shape).
        logical_shape: the shape the host sees; an output written as [N*Ho*Wo, F] rows
            (NHWC) is handed back as NCHW when ``layout == "nhwc"``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    flip_sign: bool = False
    im2col: dict[str, Any] | None = None
    logical_shape: tuple[int, ...] = ()
    layout: str = "matrix"


@dataclass(frozen=True)
class BufferDecl:
    """An on-chip buffer: ``slots`` of ``slot_bytes`` each."""

    slots: int
    slot_bytes: int


@dataclass(eq=False)
class Stream:
    """One layer compiled for one accelerator: instructions, tensors and constants.

    Attributes:
        name: the layer's name.
        accel: the accelerator description it was compiled for (``AccelSpec.to_dict()``).
        tensors: DRAM tensors by name.
        buffers: on-chip buffers by name (``inp``, ``wgt``, ``acc``, ``scl``).
        instructions: in program order, dependency flags set.
        constants: the ``const`` tensors' data.
        info: JSON-able facts about the layer and its tiling (for reports).
    """

    name: str
    accel: dict[str, Any]
    tensors: dict[str, TensorDecl]
    buffers: dict[str, BufferDecl]
    instructions: tuple[Instruction, ...]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def inputs(self) -> list[TensorDecl]:
        return [t for t in self.tensors.values() if t.role == "input"]

    def outputs(self) -> list[TensorDecl]:
        return [t for t in self.tensors.values() if t.role == "output"]

    def counts(self) -> dict[str, int]:
        """Instructions per opcode and queue (``LOAD/load: 12``), for reports."""
        return dict(Counter(f"{i.opcode}/{i.queue}" for i in self.instructions))

    def header(self) -> dict[str, Any]:
        """Everything but the constants' data, JSON-able (what :func:`save` writes)."""
        return {"format": FORMAT, "version": VERSION, "name": self.name, "accel": self.accel,
                "tensors": [_tensor_json(t) for t in self.tensors.values()],
                "buffers": {k: asdict(v) for k, v in self.buffers.items()},
                "instructions": [_instruction_json(i) for i in self.instructions],
                "info": self.info}


# -- dependency tokens ------------------------------------------------------------------------

def _neighbour(queue: str, other: str) -> str | None:
    """``prev`` or ``next`` when ``other`` is adjacent to ``queue``, else None."""
    delta = QUEUES.index(other) - QUEUES.index(queue)
    return {-1: "prev", 1: "next"}.get(delta)


def pops(instruction: Instruction) -> list[tuple[str, str]]:
    """The channels ``(from queue, to queue)`` this instruction takes a token from."""
    q = QUEUES.index(instruction.queue)
    out = []
    if instruction.deps.pop_prev:
        out.append((QUEUES[q - 1], instruction.queue))
    if instruction.deps.pop_next:
        out.append((QUEUES[q + 1], instruction.queue))
    return out


def pushes(instruction: Instruction) -> list[tuple[str, str]]:
    """The channels ``(from queue, to queue)`` this instruction gives a token to."""
    q = QUEUES.index(instruction.queue)
    out = []
    if instruction.deps.push_prev:
        out.append((instruction.queue, QUEUES[q - 1]))
    if instruction.deps.push_next:
        out.append((instruction.queue, QUEUES[q + 1]))
    return out


def insert_dependences(instructions: list[Instruction]) -> tuple[Instruction, ...]:
    """``instructions`` (program order, no flags) with the fewest tokens that keep every
    cross-queue read-after-write, write-after-read and write-after-write on a buffer slot.

    A token on a channel is matched to pops in order, so a pop also covers every
    dependency on an instruction at or before the one whose push it takes; a new token is
    added only when the last one taken is older than what the instruction waits for.

    Raises:
        StreamError: two queues that are not neighbours (load and store) share a slot.
    """
    wait: dict[tuple[int, str], int] = {}  # (instruction, queue waited on) -> latest source
    writer: dict[tuple, int] = {}
    readers: dict[tuple, list[int]] = {}

    def depend(j: int, i: int | None) -> None:
        if i is None or instructions[i].queue == instructions[j].queue:
            return
        if _neighbour(instructions[j].queue, instructions[i].queue) is None:
            raise StreamError(f"instruction {j} ({instructions[j].opcode}) depends on "
                              f"instruction {i} of the {instructions[i].queue} queue, which "
                              f"has no token channel to the {instructions[j].queue} queue")
        key = (j, instructions[i].queue)
        wait[key] = max(wait.get(key, -1), i)

    for j, ins in enumerate(instructions):
        reads, writes = ins.accesses()
        for slot in reads:
            depend(j, writer.get(slot))
        for slot in writes:
            depend(j, writer.get(slot))
            for i in readers.get(slot, ()):
                depend(j, i)
        for slot in reads:
            readers.setdefault(slot, []).append(j)
        for slot in writes:
            writer[slot] = j
            readers[slot] = [r for r in readers.get(slot, []) if r == j]

    flags: list[dict[str, bool]] = [{} for _ in instructions]
    for source in QUEUES:
        for target in QUEUES:
            side = _neighbour(target, source)  # how the target names the source
            if side is None:
                continue
            last_push = -1
            for j, ins in enumerate(instructions):
                if ins.queue != target or (j, source) not in wait:
                    continue
                i = wait[(j, source)]
                if i <= last_push:
                    continue  # the token already taken was pushed at or after i
                flags[j][f"pop_{side}"] = True
                flags[i][f"push_{_neighbour(source, target)}"] = True
                last_push = i
    return tuple(replace(ins, deps=Deps(**f)) if f else ins
                 for ins, f in zip(instructions, flags))


def execution_order(instructions: tuple[Instruction, ...] | list[Instruction],
                    name: str = "stream") -> list[int]:
    """Instruction indices in the most eager order the tokens allow: each queue in turn
    (load, compute, store) runs as far as it can before the next gets a turn, so loads run
    ahead into every slot the tokens free.

    Raises:
        StreamError: the queues deadlock (every head waits for a token never pushed).
    """
    owner = [ins.queue for ins in instructions]
    queues = {q: [i for i, o in enumerate(owner) if o == q] for q in QUEUES}
    taken = [pops(ins) for ins in instructions]
    given = [pushes(ins) for ins in instructions]
    heads = dict.fromkeys(QUEUES, 0)
    tokens: Counter = Counter()
    order: list[int] = []
    while len(order) < len(instructions):
        progressed = False
        for q in QUEUES:
            mine, head = queues[q], heads[q]
            while head < len(mine):
                i = mine[head]
                needed = taken[i]
                if needed and any(tokens[c] <= 0 for c in needed):
                    break
                for c in needed:
                    tokens[c] -= 1
                for c in given[i]:
                    tokens[c] += 1
                order.append(i)
                head += 1
                progressed = True
            heads[q] = head
        if not progressed:
            waiting = ", ".join(f"{q} at instruction {queues[q][heads[q]]}" for q in QUEUES
                                if heads[q] < len(queues[q]))
            raise StreamError(f"{name}: the queues deadlock ({waiting} wait for tokens that "
                              f"are never pushed)")
    return order


# -- checking ---------------------------------------------------------------------------------

def validate(stream: Stream) -> None:
    """Check that every instruction names declared tensors and slots, stays inside them and
    fits its buffer slot, and that the tokens neither deadlock nor name a missing queue.

    Raises:
        StreamError: naming the stream and the instruction.
    """
    def bad(i: int, message: str) -> StreamError:
        return StreamError(f"stream '{stream.name}', instruction {i} "
                           f"({stream.instructions[i].opcode}): {message}")

    for name in BUFFER_DTYPES:
        if name not in stream.buffers:
            raise StreamError(f"stream '{stream.name}': buffer '{name}' is not declared")
    for i, ins in enumerate(stream.instructions):
        q = QUEUES.index(ins.queue)
        if (ins.deps.pop_prev or ins.deps.push_prev) and q == 0 or \
                (ins.deps.pop_next or ins.deps.push_next) and q == len(QUEUES) - 1:
            raise bad(i, f"a dependency flag names a queue next to '{ins.queue}' that does "
                         f"not exist")
        for buffer, slot in ins.accesses()[0] + ins.accesses()[1]:
            if not 0 <= slot < stream.buffers[buffer].slots:
                raise bad(i, f"slot {slot} of buffer '{buffer}' (it has "
                             f"{stream.buffers[buffer].slots})")
        if isinstance(ins, (Load, Store)):
            tensor = stream.tensors.get(ins.tensor)
            if tensor is None:
                raise bad(i, f"tensor '{ins.tensor}' is not declared")
            _check_region(stream, i, ins, tensor, bad)
        if isinstance(ins, Load):
            if ins.buffer not in BUFFER_DTYPES or ins.view not in VIEWS:
                raise bad(i, f"unknown buffer '{ins.buffer}' or view '{ins.view}'")
            _check_fits(stream, i, ins.buffer, ins.shape, bad)
        elif isinstance(ins, Gemm):
            _check_fits(stream, i, "inp", (ins.m, ins.k), bad)
            _check_fits(stream, i, "wgt", (ins.k, ins.n), bad)
            _check_fits(stream, i, "acc", (ins.m, ins.n), bad)
        elif isinstance(ins, Pool):
            if ins.window < 1:
                raise bad(i, f"a window of {ins.window} elements")
            _check_fits(stream, i, "inp", (ins.m, ins.n * ins.window), bad)
            _check_fits(stream, i, "acc", (ins.m, ins.n), bad)
        elif isinstance(ins, Alu):
            if ins.op not in ALU_OPS:
                raise bad(i, f"unknown ALU operation '{ins.op}'")
            _check_fits(stream, i, "acc", (ins.m, ins.n), bad)
        elif isinstance(ins, Store):
            _check_fits(stream, i, "acc", ins.shape, bad)
    execution_order(stream.instructions, f"stream '{stream.name}'")


def _check_region(stream: Stream, i: int, ins: Load | Store, tensor: TensorDecl, bad) -> None:
    view = ins.view if isinstance(ins, Load) else "matrix"
    if view == "im2col":
        if not tensor.im2col:
            raise bad(i, f"tensor '{tensor.name}' has no im2col geometry")
        limit = tuple(tensor.im2col["matrix"])
    elif view == "row":
        limit = (ins.rows[1], tensor.shape[-1])
    else:
        limit = tuple(tensor.shape)
    (r0, r1), (c0, c1) = ins.rows, ins.cols
    if len(limit) != 2 or not (0 <= r0 < r1 <= limit[0] and 0 <= c0 < c1 <= limit[1]):
        raise bad(i, f"region rows {r0}:{r1}, cols {c0}:{c1} is outside tensor "
                     f"'{tensor.name}' {list(limit)}")


def _check_fits(stream: Stream, i: int, buffer: str, shape: tuple[int, int], bad) -> None:
    need = shape[0] * shape[1] * np.dtype(BUFFER_DTYPES[buffer]).itemsize
    if need > stream.buffers[buffer].slot_bytes:
        raise bad(i, f"a {shape[0]}x{shape[1]} tile ({need} bytes) overflows a slot of "
                     f"buffer '{buffer}' ({stream.buffers[buffer].slot_bytes} bytes)")


# -- files ------------------------------------------------------------------------------------

def _tensor_json(t: TensorDecl) -> dict[str, Any]:
    data = asdict(t)
    data["shape"], data["logical_shape"] = list(t.shape), list(t.logical_shape)
    return data


def _instruction_json(ins: Instruction) -> dict[str, Any]:
    data = {f.name: getattr(ins, f.name) for f in fields(ins) if f.name != "deps"}
    for key in ("rows", "cols"):
        if key in data:
            data[key] = list(data[key])
    return {"opcode": ins.opcode, **data, "deps": ins.deps.to_int()}


def _instruction_from_json(data: dict[str, Any]) -> Instruction:
    data = dict(data)
    cls = _OPCODES[data.pop("opcode")]
    data["deps"] = Deps.from_int(int(data.get("deps", 0)))
    for key in ("rows", "cols"):
        if key in data:
            data[key] = tuple(int(v) for v in data[key])
    return cls(**data)


def save(stream: Stream, path: str | os.PathLike) -> Path:
    """Write ``stream`` to ``path`` (``.npz``), atomically: a temp file in the same folder
    renamed into place, so a reader never sees half a stream. Returns the path.

    Raises:
        StreamError: the file cannot be written.
    """
    path = Path(path)
    arrays = {"header": np.frombuffer(json.dumps(stream.header()).encode(), np.uint8)}
    for index, (name, value) in enumerate(stream.constants.items()):
        arrays[f"const_{index}"] = np.ascontiguousarray(value)
        arrays[f"const_{index}_name"] = np.frombuffer(name.encode(), np.uint8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StreamError(f"cannot write stream '{stream.name}' to {path}: "
                          f"{exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike) -> Stream:
    """Read a stream written by :func:`save`, checked (:func:`validate`).

    Raises:
        StreamError: the file is missing, not a stream, of another version, or malformed.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(bytes(data["header"]).decode())
            constants = {}
            index = 0
            while f"const_{index}" in data.files:
                name = bytes(data[f"const_{index}_name"]).decode()
                constants[name] = data[f"const_{index}"]
                index += 1
    except (OSError, ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StreamError(f"{path}: not a readable accelerator stream ({exc})") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise StreamError(f"{path}: not an accelerator stream of version {VERSION} (format "
                          f"{header.get('format')!r}, version {header.get('version')!r})")
    try:
        tensors = {}
        for t in header["tensors"]:
            t = dict(t, shape=tuple(t["shape"]), logical_shape=tuple(t["logical_shape"]))
            tensors[t["name"]] = TensorDecl(**t)
        stream = Stream(name=header["name"], accel=header["accel"], tensors=tensors,
                        buffers={k: BufferDecl(**v) for k, v in header["buffers"].items()},
                        instructions=tuple(_instruction_from_json(i)
                                           for i in header["instructions"]),
                        constants=constants, info=header.get("info", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise StreamError(f"{path}: malformed accelerator stream ({exc!r})") from None
    for t in stream.tensors.values():
        if t.role == "const" and (t.name not in constants
                                  or tuple(constants[t.name].shape) != tuple(t.shape)):
            raise StreamError(f"{path}: constant '{t.name}' is missing or has the wrong shape")
    validate(stream)
    return stream
