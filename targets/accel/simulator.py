"""The functional simulator: runs an instruction stream on the host, bit-exactly.

It is the executable specification of the ISA (:mod:`.isa`), as VTA's ``sim_driver.cc`` is
of VTA's: buffers are real arrays split into slots, every LOAD copies into its slot and every
GEMM reads what the slots hold at that moment, and the queues run in the most eager order
the dependency tokens allow (:func:`~.isa.execution_order`). A stream with a missing token
therefore computes the wrong numbers here instead of passing by luck.

Speed: a GEMM instruction is one BLAS call on the whole tile, not a loop per MAC. The int8
operands are held as float32 in their slots and multiplied with ``np.matmul`` (numpy's own
integer matmul has no BLAS behind it and runs at ~0.2 GMAC/s). float32 is exact here: a
product of two int8 values is at most 2^14 in magnitude, so a sum of up to 1024 of them
stays within 2^24, where every integer is a float32; longer reductions are summed in chunks
of 1024, each converted to int32 and added into the int32 accumulator, which wraps as the
hardware's does.

Measured (:func:`benchmark`, a 256x1024x1024 uint8 x int8 GEMM, one core with
``OPENBLAS_NUM_THREADS=1``, an AMD EPYC host shared with other jobs; loads, requantization
and stores included): 6.2 GMAC/s on ``gemmini-16x16`` (6272 instructions, 256x16x32 tiles),
11.1 on ``vta-16x16``, 16.7 on ``edge-32x32`` (1600 instructions); the issue asks for 1.
What is left per instruction is Python dispatch (~5 us), so small tiles cost the most.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from mmcompile.targets.accel.isa import (
    Alu,
    Gemm,
    Load,
    Pool,
    Store,
    Stream,
    TensorDecl,
    execution_order,
)

from mmcompile.errors import InputError

# Longest reduction whose float32 partial sums of int8 x int8 products are all exact.
EXACT_K = 1024


def _operand(tensor: TensorDecl, data: np.ndarray, view: str) -> np.ndarray:
    """The 2-D operand a load reads from DRAM ``data``: the matrix itself or the input's
    im2col patch matrix (padded with the zero point), as the int8 values the array sees
    (uint8 flipped to int8 when ``flip_sign``), held as float32."""
    if view == "im2col":
        geo = tensor.im2col
        _, _, h, w = geo["input_shape"]
        (kh, kw), (sh, sw), (dh, dw) = geo["kernel"], geo["strides"], geo["dilations"]
        top, left, bottom, right = geo["pads"]
        padded = np.pad(data, ((0, 0), (0, 0), (top, bottom), (left, right)),
                        constant_values=np.asarray(geo["pad_value"], data.dtype))
        windows = np.lib.stride_tricks.sliding_window_view(
            padded, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
        rows, cols = geo["matrix"]
        oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
        ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
        windows = windows[:, :, :oh * sh:sh, :ow * sw:sw, ::dh, ::dw]
        matrix = windows.transpose(0, 2, 3, 1, 4, 5).reshape(rows, cols)
    else:
        matrix = data.reshape(tensor.shape)
    out = matrix.astype(np.float32)
    if tensor.flip_sign:
        out -= 128.0  # the load unit flips the top bit: uint8 q -> int8 q - 128
    return out


class _Machine:
    """Buffers, DRAM and the four instructions' semantics."""

    def __init__(self, stream: Stream, dram: dict[str, np.ndarray]):
        self.stream, self.dram = stream, dram
        self.operands: dict[tuple[str, str], np.ndarray] = {}
        shapes = _slot_shapes(stream)
        # int8 operands held as float32 for BLAS (see the module docstring)
        types = {"inp": np.float32, "wgt": np.float32, "acc": np.int32, "scl": np.float32}
        self.slots = {name: [np.zeros(shapes[name], dtype)
                             for _ in range(stream.buffers[name].slots)]
                      for name, dtype in types.items()}

    def operand(self, name: str, view: str) -> np.ndarray:
        key = (name, view)
        if key not in self.operands:
            self.operands[key] = _operand(self.stream.tensors[name], self.dram[name], view)
        return self.operands[key]

    def load(self, ins: Load) -> None:
        (r0, r1), (c0, c1) = ins.rows, ins.cols
        slot = self.slots[ins.buffer][ins.slot]
        if ins.view == "row":
            slot[:r1 - r0, :c1 - c0] = self.dram[ins.tensor][c0:c1]
        else:
            slot[:r1 - r0, :c1 - c0] = self.operand(ins.tensor, ins.view)[r0:r1, c0:c1]

    def gemm(self, ins: Gemm) -> None:
        a = self.slots["inp"][ins.inp][:ins.m, :ins.k]
        b = self.slots["wgt"][ins.wgt][:ins.k, :ins.n]
        acc = self.slots["acc"][ins.acc][:ins.m, :ins.n]
        for k0 in range(0, ins.k, EXACT_K):
            part = np.matmul(a[:, k0:k0 + EXACT_K], b[k0:k0 + EXACT_K])
            acc += part.astype(np.int32)  # int32 addition wraps, as the accumulator does

    def pool(self, ins: Pool) -> None:
        tile = self.slots["inp"][ins.inp][:ins.m, :ins.n * ins.window]
        maxima = tile.reshape(ins.m, ins.n, ins.window).max(axis=2)
        self.slots["acc"][ins.acc][:ins.m, :ins.n] = maxima.astype(np.int32) - ins.offset

    def alu(self, ins: Alu) -> None:
        acc = self.slots["acc"][ins.acc][:ins.m, :ins.n]
        if ins.op == "rescale":
            factor, divisor = self.slots["scl"][ins.scl][0, :2]
            value = np.rint((acc.astype(np.float32) * factor).astype(np.float32) / divisor)
        else:
            value = np.rint(acc.astype(np.float32) * self.slots["scl"][ins.scl][0, :ins.n])
        # clamp before adding the zero point: float32 keeps the bounds exact at any size
        value = np.clip(value, ins.lo - ins.zero_point, ins.hi - ins.zero_point)
        acc[...] = value.astype(np.int32) + ins.zero_point

    def store(self, ins: Store) -> None:
        (r0, r1), (c0, c1) = ins.rows, ins.cols
        target = self.dram[ins.tensor]
        target[r0:r1, c0:c1] = self.slots["acc"][ins.acc][:r1 - r0, :c1 - c0].astype(
            target.dtype)


def _slot_shapes(stream: Stream) -> dict[str, tuple[int, int]]:
    """The largest tile each buffer's slots receive (every tile fits its slot's bytes)."""
    shapes = {"inp": [1, 1], "wgt": [1, 1], "acc": [1, 1], "scl": [1, 1]}

    def grow(buffer: str, rows: int, cols: int) -> None:
        shapes[buffer] = [max(shapes[buffer][0], rows), max(shapes[buffer][1], cols)]

    for ins in stream.instructions:
        if isinstance(ins, Load):
            grow(ins.buffer, *ins.shape)
        elif isinstance(ins, Gemm):
            grow("inp", ins.m, ins.k)
            grow("wgt", ins.k, ins.n)
            grow("acc", ins.m, ins.n)
        elif isinstance(ins, Pool):
            grow("inp", ins.m, ins.n * ins.window)
            grow("acc", ins.m, ins.n)
    return {k: tuple(v) for k, v in shapes.items()}


def _inputs(stream: Stream, inputs: Mapping[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
    declared = stream.inputs()
    if isinstance(inputs, np.ndarray):
        if len(declared) != 1:
            raise InputError(f"stream '{stream.name}' takes inputs "
                             f"{[t.name for t in declared]}; pass them by name")
        inputs = {declared[0].name: inputs}
    unknown = sorted(set(inputs) - {t.name for t in declared})
    if unknown:
        raise InputError(f"stream '{stream.name}' has no input {unknown[0]!r} (inputs: "
                         f"{', '.join(t.name for t in declared)})")
    out = {}
    for t in declared:
        if t.name not in inputs:
            raise InputError(f"stream '{stream.name}': input '{t.name}' is missing")
        value = np.asarray(inputs[t.name])
        if value.dtype != np.dtype(t.dtype) or tuple(value.shape) != tuple(t.logical_shape):
            raise InputError(f"stream '{stream.name}': input '{t.name}' must be {t.dtype} "
                             f"{list(t.logical_shape)}, got {value.dtype} {list(value.shape)}")
        out[t.name] = np.ascontiguousarray(value)
    return out


def run(stream: Stream, inputs: Mapping[str, Any] | np.ndarray) -> dict[str, np.ndarray]:
    """Run ``stream`` on ``inputs`` (name -> quantized array in the layer's layout, or the one
    input array); returns output name -> array in the layer's layout (NCHW for a
    convolution).

    Raises:
        InputError: an input is missing, unknown, or of the wrong type or shape.
        StreamError: the queues deadlock.
    """
    dram: dict[str, np.ndarray] = {**_inputs(stream, inputs)}
    for t in stream.tensors.values():
        if t.role == "const":
            dram[t.name] = stream.constants[t.name]
        elif t.role == "output":
            dram[t.name] = np.zeros(t.shape, t.dtype)
    machine = _Machine(stream, dram)
    execute = {Load: machine.load, Gemm: machine.gemm, Pool: machine.pool, Alu: machine.alu,
               Store: machine.store}
    for index in execution_order(stream.instructions, f"stream '{stream.name}'"):
        ins = stream.instructions[index]
        execute[type(ins)](ins)
    outputs = {}
    for t in stream.outputs():
        value = dram[t.name]
        if t.layout == "nhwc":
            n, f, oh, ow = t.logical_shape
            value = value.reshape(n, oh, ow, f).transpose(0, 3, 1, 2)
        outputs[t.name] = np.ascontiguousarray(value.reshape(t.logical_shape))
    return outputs


def benchmark(m: int = 256, k: int = 1024, n: int = 1024, accel: str = "gemmini-16x16",
              repeat: int = 3, seed: int = 0) -> dict[str, Any]:
    """Time the simulator on a random ``(m, k, n)`` int8 GEMM (not a test: the figure depends
    on the machine). Returns ``{"gmacs": best GMAC/s, "seconds": best run, "instructions":
    stream length, "blas_threads": OPENBLAS_NUM_THREADS or "default"}``. Run this module
    (``python -m mmcompile.targets.accel.simulator``) for the one-core figure."""
    from mmcompile.targets.accel.layers import QGemm, QParams
    from mmcompile.targets.accel.lowering import lower
    from mmcompile.targets.accel.spec import load_spec

    rng = np.random.default_rng(seed)
    layer = QGemm(name="bench", weight=rng.integers(-127, 128, (k, n), dtype=np.int8),
                  w_scale=np.full(n, 0.01, np.float32), x=QParams(0.02, 128, "uint8"),
                  y=QParams(0.5, 0, "int8"), input_shape=(m, k))
    stream = lower(load_spec(accel), layer)
    x = rng.integers(0, 256, (m, k), dtype=np.uint8)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run(stream, x)
        best = min(best, time.perf_counter() - start)
    return {"gmacs": round(m * k * n / best / 1e9, 2), "seconds": round(best, 4),
            "instructions": len(stream.instructions),
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default")}


if __name__ == "__main__":
    if os.environ.get("OPENBLAS_NUM_THREADS") != "1":  # one core: set before numpy loads BLAS
        os.environ.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        os.execv(sys.executable, [sys.executable, "-m", "mmcompile.targets.accel.simulator"])
    print(benchmark())
