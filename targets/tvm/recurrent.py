"""ONNX ``LSTM``, ``GRU`` and ``RNN`` lowered natively for the CPU target.

TVM 0.27's ONNX importer has no converter for them. Each layer becomes:

1. the input projection of every time step and direction at once, ``xw = X W^T + b`` (one
   Relax matmul that :class:`~.cpu_matmul.BlockedMatmul` register-blocks, like any dense
   layer);
2. one recurrent kernel (a hand-written TIR function, scheduled here and marked so, opaque to
   ``FuseOps``) that walks the time steps: per step, the matrix-vector product of the hidden
   state with the recurrent weights ``R^T`` (padded to whole register tiles of 4 or 8
   vectors and packed tile by tile, ``[tiles, hidden, tile]``, so each tile's weights are one
   contiguous stream; accumulated in registers over the hidden units) and the gate
   activations, fused: one kernel for the whole sequence, not a dozen per step;
3. every direction in that one kernel, which writes ONNX's layouts directly; the directions
   (and blocks of the batch) run in parallel: eeg_seizure's two bidirectional 100-unit
   LSTMs over 59 steps at batch 1, whole model 1.21 -> 1.04 ms (znver5, 2 threads).

Activations use the polynomial ``exp`` TVM's ``topi.fast_exp`` uses (sigmoid
``1 / (1 + e^-x)``, tanh ``1 - 2 / (e^2x + 1)``): LLVM would call libm once per lane for
``expf``. Steps run on one thread: a parallel region per step cost ~6.5 us to launch on the
2-core machines (50 steps of a 64-unit LSTM: 49 us serial, 376 us parallel). Except where
the recurrent weights outgrow a core's L2 (``SPLIT_WEIGHT_BYTES``) and one batch block runs:
then the threads share each step, each reading its part of the weights from its own L2.
An LSTM whose hidden units are whole tiles does it in one parallel region for the whole
sequence (:func:`lstm_split_kernel`): each thread owns chunks of units, computes their four
gates, activations and states, and a barrier ends the step; others split each step's
product in a region of its own, the activations on one thread. One 256-unit LSTM, 24 steps,
batch 1 (the g2p encoder's), 2 threads, znver5, same process: 162 us with unpacked weights
and a region per step, 146 packed, 126 in one region (onnxruntime 133-140 us alone).

Measured (znver4, one layer, 50 steps, batch 1, 74 inputs; the kernel alone against
onnxruntime's whole LSTM op at 2 threads): hidden 64 49 us vs 71-80 us, 128 147 vs 177-214
us, 256 1144 vs 447-861 us (its 1 MB of recurrent weights no longer fit L2, and onnxruntime
splits each step's product over both cores): see ``tests/test_recurrent.py`` and the bench.

What is supported (``refusal`` says why not, and the planner falls back to onnxruntime):
forward, reverse and bidirectional; initial states given or not; ``sequence_lens`` absent or
constant and equal to the sequence length; layouts 0 and 1; the default activations (LSTM
sigmoid/tanh/tanh, GRU sigmoid/tanh, RNN tanh, relu or sigmoid); GRU's
``linear_before_reset`` 0 and 1. Not: peepholes, ``clip``, ``input_forget``, other
activations, dynamic shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
from tvm import relax, tirx
from tvm.script import tirx as T

F32 = "float32"
OPAQUE = 8  # FuseOps pattern: the kernel runs alone


def _c(value: float):
    return tirx.const(value, F32)


def _exp(x):
    """``topi.fast_exp``'s polynomial on one scalar expression (vectorizes)."""
    x = tirx.max(tirx.min(x, _c(88.3762626647950)), _c(-88.3762626647949))
    n = tirx.floor(x * _c(1.44269504088896341) + _c(0.5))
    f = x - n * _c(0.6931471805599453)
    y = _c(1.9875691500e-4)
    for coefficient in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                        5.0000001201e-1):
        y = y * f + _c(coefficient)
    y = y * f * f + f + _c(1.0)
    two_n = tirx.reinterpret(F32, tirx.shift_left(tirx.Cast("int32", n + _c(127.0)),
                                                  tirx.const(23, "int32")))
    return two_n * y


def sigmoid(x):
    return _c(1.0) / (_c(1.0) + _exp(-x))


def tanh(x):
    return _c(1.0) - _c(2.0) / (_exp(x * _c(2.0)) + _c(1.0))


def relu(x):
    return tirx.max(x, _c(0.0))


ACTIVATIONS = {"Sigmoid": sigmoid, "Tanh": tanh, "Relu": relu}


# -- kernels -----------------------------------------------------------------------------------
# Shared shape (D directions, width = gates padded to whole tiles): xw [steps, batch, D * width]
# (the input projections of every direction, from one matmul), rt [D, tiles, hidden, tile]
# (R^T packed tile by tile), states [D, batch, hidden] in and out, y [steps, D, batch, hidden]
# (ONNX's own layouts). The state buffers double as the running state.
#
# The batch rows of a recurrence never meet, and neither do its directions, so the kernel
# splits the batch into blocks of ``rows`` (the register tile's rows: each R^T vector loaded
# once serves them all) and runs every (direction, block) pair in parallel, each over the
# whole sequence: one parallel launch per call, not per step. A bidirectional layer at batch
# 1 runs its two directions side by side (onnxruntime does too); one pair runs serially.


def _tiling(batch: int, lanes: int) -> tuple[int, int]:
    """(rows per register tile, batch blocks): at most 4 x 4 vectors with 32 vector registers
    (AVX-512), 2 x 4 with 16."""
    limit = 4 if lanes >= 16 else 2
    rows = next(r for r in range(min(limit, batch), 0, -1) if batch % r == 0)
    return rows, batch // rows


def tile_vectors(batch: int, width: int, lanes: int) -> int:
    """Vectors per register tile of the recurrent product (``NV``): 8 for one row of states,
    4 for several; no more than ``width`` (the gates) fills.

    An FMA has a latency of 4 cycles on 2 pipes, so 8 independent accumulators keep it busy:
    one row of 4 vectors left half of it idle (the g2p encoder's 256-unit LSTM, 1 thread,
    whole model 0.60 -> 0.34 ms; onnxruntime 0.33-0.35)."""
    rows, _ = _tiling(batch, lanes)
    return max(1, min(8 if rows == 1 else 4, -(-width // lanes)))


def _time(step, d, steps: int, directions: int, reverse: bool):
    """The time index direction ``d`` reads and writes at ``step``: the second of two
    directions, or the only one of a reverse layer, walks the sequence backwards."""
    if directions == 2:
        return step + d * (steps - 1 - 2 * step)
    return steps - 1 - step if reverse else step


@T.macro(hygienic=False)
def recurrent_product(count, tiles):
    """``gates[d, rows of this task, first count tiles] = h[d] @ rt[d]``: per tile of ``NV``
    vectors, ``rows x NV`` accumulators over the hidden units, each R^T vector loaded once for
    all rows; the tiles one after another (``tiles``: ``T.serial``) or split over the threads
    (``T.parallel``; each tile has its own accumulator). (A macro expanded inside the
    kernels: ``acc``, ``gates``, ``h``, ``rt``, ``t``, ``d``, ``task``, ``rows``, ``H``, ``V``
    and ``NV`` are theirs.)"""
    for jo in tiles(count):
        for i, jv in T.grid(rows, NV):
            for ji in T.vectorized(V):
                acc[t, jo, i, jv * V + ji] = T.float32(0.0)
        for k in range(H):
            for i in T.unroll(rows):
                for jv in T.unroll(NV):
                    for ji in T.vectorized(V):
                        acc[t, jo, i, jv * V + ji] = acc[t, jo, i, jv * V + ji] + \
                            h[d, task * rows + i, k] * rt[d, jo, k, jv * V + ji]
        for i, jv in T.grid(rows, NV):
            for ji in T.vectorized(V):
                gates[d, task * rows + i, jo * V * NV + jv * V + ji] = acc[t, jo, i, jv * V + ji]


# Recurrent weights (R^T of one direction, bytes) from which one batch block shares each step
# over the threads, each reading its part of the weights from its own L2. Below it, one
# thread per (direction, batch block).
SPLIT_WEIGHT_BYTES = 768 * 1024


def _split(tasks: int, hidden: int, width: int) -> bool:
    return tasks == 1 and hidden * width * 4 >= SPLIT_WEIGHT_BYTES


def _unit_chunk(batch: int, hidden: int, width: int, lanes: int) -> int | None:
    """Units per thread chunk of :func:`lstm_split_kernel` (a register tile's columns), or
    None where it does not apply: several batch blocks, weights within one L2, or hidden
    units that are not whole chunks."""
    _, tasks = _tiling(batch, lanes)
    chunk = lanes * tile_vectors(batch, width, lanes)
    if not _split(tasks, hidden, width) or hidden % chunk or width != 4 * hidden:
        return None
    return chunk


def _loops(batch: int, width: int, hidden: int, lanes: int, directions: int,
           may_split: bool = False):
    """(NV, blocks, rows, tasks, outer loop kind, tile loop kind) of a kernel: (direction,
    batch block) pairs in parallel, or (``may_split``: an LSTM) one block's tiles split over
    the threads per step."""
    nv = tile_vectors(batch, width, lanes)
    rows, tasks = _tiling(batch, lanes)
    split = may_split and _split(tasks, hidden, width)
    outer = T.parallel if directions * tasks > 1 and not split else T.serial
    return nv, width // (lanes * nv), rows, tasks, outer, T.parallel if split else T.serial


def lstm_kernel(steps: int, batch: int, hidden: int, width: int, lanes: int, directions: int,
                reverse: bool):
    """LSTM, ONNX gate order i, o, f, c; biases folded into ``xw``."""
    NV, blocks, rows, tasks, outer, tiles = _loops(  # noqa: N806
        batch, width, hidden, lanes, directions, may_split=True)
    H, V, D = hidden, lanes, directions  # noqa: N806

    @T.prim_func(s_tir=True)
    def lstm(xw: T.Buffer((steps, batch, D * width), F32),
             rt: T.Buffer((D, blocks, hidden, V * NV), F32),
             h0: T.Buffer((D, batch, hidden), F32), c0: T.Buffer((D, batch, hidden), F32),
             y: T.Buffer((steps, D, batch, hidden), F32), h: T.Buffer((D, batch, hidden), F32),
             cs: T.Buffer((D, batch, hidden), F32)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        gates = T.alloc_buffer((D, batch, width), F32)
        acc = T.alloc_buffer((D * tasks, blocks, rows, V * NV), F32)  # noqa: F841
        for t in outer(D * tasks):
            d = T.bind(t // tasks)
            task = T.bind(t % tasks)
            for i, u in T.grid(rows, H):
                h[d, task * rows + i, u] = h0[d, task * rows + i, u]
                cs[d, task * rows + i, u] = c0[d, task * rows + i, u]
            for step in range(steps):
                at = T.bind(_time(step, d, steps, D, reverse))
                recurrent_product(blocks, tiles)
                for i in range(rows):
                    r = T.bind(task * rows + i)
                    for u in T.vectorized(H):
                        gates[d, r, u] = gates[d, r, u] + xw[at, r, d * width + u]
                        gates[d, r, H + u] = gates[d, r, H + u] + xw[at, r, d * width + H + u]
                        gates[d, r, 2 * H + u] = gates[d, r, 2 * H + u] + \
                            xw[at, r, d * width + 2 * H + u]
                        gates[d, r, 3 * H + u] = gates[d, r, 3 * H + u] + \
                            xw[at, r, d * width + 3 * H + u]
                    for u in T.vectorized(H):
                        cs[d, r, u] = sigmoid(gates[d, r, 2 * H + u]) * cs[d, r, u] + \
                            sigmoid(gates[d, r, u]) * tanh(gates[d, r, 3 * H + u])
                    for u in T.vectorized(H):
                        h[d, r, u] = sigmoid(gates[d, r, H + u]) * tanh(cs[d, r, u])
                    for u in T.vectorized(H):
                        y[at, d, r, u] = h[d, r, u]

    return lstm


def lstm_split_kernel(steps: int, batch: int, hidden: int, width: int, lanes: int,
                      directions: int, reverse: bool):
    """LSTM whose threads each own whole chunks of hidden units: ``xw`` and ``rt`` hold the
    gate columns chunk by chunk (:func:`split_columns`), so a chunk's four gate tiles, its
    activations and its part of the new state are one thread's work. One parallel region
    per direction for the whole sequence; a barrier ends each step (the state is
    double-buffered: a step reads one buffer whole and writes its units into the other)."""
    NV = tile_vectors(batch, width, lanes)  # noqa: N806
    H, V, D = hidden, lanes, directions  # noqa: N806
    C = V * NV  # noqa: N806 - units per chunk
    chunks = H // C
    rows = batch

    @T.prim_func(s_tir=True)
    def lstm(xw: T.Buffer((steps, batch, D * width), F32),
             rt: T.Buffer((D, 4 * chunks, hidden, C), F32),
             h0: T.Buffer((D, batch, hidden), F32), c0: T.Buffer((D, batch, hidden), F32),
             y: T.Buffer((steps, D, batch, hidden), F32), h: T.Buffer((D, batch, hidden), F32),
             cs: T.Buffer((D, batch, hidden), F32)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        hb = T.alloc_buffer((2, batch, hidden), F32)
        g = T.alloc_buffer((chunks, 4, rows, C), F32)
        for d in range(D):
            for i, u in T.grid(rows, H):
                hb[0, i, u] = h0[d, i, u]
                cs[d, i, u] = c0[d, i, u]
            for _launch in T.serial(1, annotations={"pragma_parallel_launch_point": 1}):
                for step in range(steps):
                    for c in T.parallel(chunks, annotations={
                            "pragma_parallel_barrier_when_finish": 1}):
                        at = T.bind(_time(step, d, steps, D, reverse))
                        for gate in range(4):
                            for i, jv in T.grid(rows, NV):
                                for ji in T.vectorized(V):
                                    g[c, gate, i, jv * V + ji] = \
                                        xw[at, i, d * width + (c * 4 + gate) * C + jv * V + ji]
                            for k in range(H):
                                for i in T.unroll(rows):
                                    for jv in T.unroll(NV):
                                        for ji in T.vectorized(V):
                                            g[c, gate, i, jv * V + ji] = \
                                                g[c, gate, i, jv * V + ji] + hb[step % 2, i, k] \
                                                * rt[d, c * 4 + gate, k, jv * V + ji]
                        for i in range(rows):
                            for u in T.vectorized(C):
                                cs[d, i, c * C + u] = \
                                    sigmoid(g[c, 2, i, u]) * cs[d, i, c * C + u] + \
                                    sigmoid(g[c, 0, i, u]) * tanh(g[c, 3, i, u])
                            for u in T.vectorized(C):
                                hb[(step + 1) % 2, i, c * C + u] = sigmoid(g[c, 1, i, u]) * \
                                    tanh(cs[d, i, c * C + u])
                            for u in T.vectorized(C):
                                y[at, d, i, c * C + u] = hb[(step + 1) % 2, i, c * C + u]
            for i, u in T.grid(rows, H):
                h[d, i, u] = hb[steps % 2, i, u]

    return lstm


def split_columns(hidden: int, chunk: int) -> np.ndarray:
    """The gate columns of :func:`lstm_split_kernel`: chunk by chunk of units, in each the
    four gates' columns (i, o, f, c) of those units; ``order[new] = old``."""
    return np.array([gate * hidden + c * chunk + j for c in range(hidden // chunk)
                     for gate in range(4) for j in range(chunk)])


def gru_kernel(steps: int, batch: int, hidden: int, width: int, lanes: int, directions: int,
               reverse: bool, linear_before_reset: bool):
    """GRU, gate order z, r, h. ``xw`` holds ``X W^T + Wb`` (and ``Rb`` for z and r); ``rb``
    holds ``Rb`` of the h gate (zeros elsewhere), added inside the reset because ``r``
    multiplies the whole recurrent term of h.

    With ``linear_before_reset`` (what torch exports): ``h~ = tanh(xw_h + r * (h Rh + Rbh))``,
    one product per step. Without: ``h~ = tanh(xw_h + (r * h) Rh + Rbh)``, so the product of
    the h gate waits for r (a second product, over ``r * h``, from ``rth``: Rh^T unpacked)."""
    NV, blocks, rows, tasks, outer, _ = _loops(  # noqa: N806
        batch, width, hidden, lanes, directions)
    H, V, D = hidden, lanes, directions  # noqa: N806
    zr_blocks = -(-2 * H // (V * NV))  # tiles covering z and r
    tiles = T.serial

    @T.prim_func(s_tir=True)
    def gru(xw: T.Buffer((steps, batch, D * width), F32),
            rt: T.Buffer((D, blocks, hidden, V * NV), F32), rb: T.Buffer((D, width), F32),
            rth: T.Buffer((D, hidden, hidden), F32), h0: T.Buffer((D, batch, hidden), F32),
            y: T.Buffer((steps, D, batch, hidden), F32), h: T.Buffer((D, batch, hidden), F32)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        gates = T.alloc_buffer((D, batch, width), F32)
        rh = T.alloc_buffer((D, batch, hidden), F32)
        acc = T.alloc_buffer((D * tasks, blocks, rows, V * NV), F32)  # noqa: F841
        for t in outer(D * tasks):
            d = T.bind(t // tasks)
            task = T.bind(t % tasks)
            for i, u in T.grid(rows, H):
                h[d, task * rows + i, u] = h0[d, task * rows + i, u]
            for step in range(steps):
                at = T.bind(_time(step, d, steps, D, reverse))
                recurrent_product(blocks if linear_before_reset else zr_blocks, tiles)
                for i in range(rows):
                    r = T.bind(task * rows + i)
                    if not linear_before_reset:  # r first, then the h gate over r * h
                        for u in T.vectorized(H):
                            rh[d, r, u] = sigmoid(xw[at, r, d * width + H + u]
                                                  + gates[d, r, H + u]) * h[d, r, u]
                        for u in range(H):
                            gates[d, r, 2 * H + u] = T.float32(0.0)
                        for k in range(H):
                            for u in T.vectorized(H):
                                gates[d, r, 2 * H + u] = gates[d, r, 2 * H + u] + \
                                    rh[d, r, k] * rth[d, k, u]
                    for u in T.vectorized(H):
                        rh[d, r, u] = tanh(
                            xw[at, r, d * width + 2 * H + u]
                            + (sigmoid(xw[at, r, d * width + H + u] + gates[d, r, H + u])
                               * (gates[d, r, 2 * H + u] + rb[d, 2 * H + u])
                               if linear_before_reset
                               else gates[d, r, 2 * H + u] + rb[d, 2 * H + u]))
                    for u in T.vectorized(H):
                        h[d, r, u] = rh[d, r, u] + sigmoid(
                            xw[at, r, d * width + u] + gates[d, r, u]) * (h[d, r, u] - rh[d, r, u])
                    for u in T.vectorized(H):
                        y[at, d, r, u] = h[d, r, u]

    return gru


def rnn_kernel(steps: int, batch: int, hidden: int, width: int, lanes: int, directions: int,
               reverse: bool, activation: str):
    """Simple RNN: ``h = f(xw + h R^T)``."""
    NV, blocks, rows, tasks, outer, _ = _loops(  # noqa: N806
        batch, width, hidden, lanes, directions)
    H, V, D = hidden, lanes, directions  # noqa: N806
    act = ACTIVATIONS[activation]
    tiles = T.serial

    @T.prim_func(s_tir=True)
    def rnn(xw: T.Buffer((steps, batch, D * width), F32),
            rt: T.Buffer((D, blocks, hidden, V * NV), F32),
            h0: T.Buffer((D, batch, hidden), F32), y: T.Buffer((steps, D, batch, hidden), F32),
            h: T.Buffer((D, batch, hidden), F32)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        gates = T.alloc_buffer((D, batch, width), F32)
        acc = T.alloc_buffer((D * tasks, blocks, rows, V * NV), F32)  # noqa: F841
        for t in outer(D * tasks):
            d = T.bind(t // tasks)
            task = T.bind(t % tasks)
            for i, u in T.grid(rows, H):
                h[d, task * rows + i, u] = h0[d, task * rows + i, u]
            for step in range(steps):
                at = T.bind(_time(step, d, steps, D, reverse))
                recurrent_product(blocks, tiles)
                for i in range(rows):
                    for u in T.vectorized(H):
                        h[d, task * rows + i, u] = act(gates[d, task * rows + i, u] + xw[
                            at, task * rows + i, d * width + u])
                    for u in T.vectorized(H):
                        y[at, d, task * rows + i, u] = h[d, task * rows + i, u]

    return rnn


# -- what is supported ---------------------------------------------------------------------------

DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"),
                       "RNN": ("Tanh",)}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _static(tensor) -> bool:
    return tensor is not None and tensor.shape is not None and \
        all(isinstance(d, int) and d > 0 for d in tensor.shape)


def _given(node, index: int):
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def refusal(node, graph) -> str | None:
    """Why this module cannot lower a recurrent ``node`` natively, or None (it can)."""
    import onnx_graphsurgeon as gs
    x, w, r = node.inputs[:3]
    if not _static(x) or not isinstance(w, gs.Constant) or not isinstance(r, gs.Constant):
        return "needs a static input shape and constant W and R"
    bias = _given(node, 3)
    if bias is not None and not isinstance(bias, gs.Constant):
        return "needs a constant bias B"
    if node.op == "LSTM" and _given(node, 7) is not None:
        return "peephole weights (P) are not supported"
    if node.attrs.get("clip") is not None:
        return "clip is not supported"
    if node.attrs.get("input_forget", 0):
        return "input_forget is not supported"
    lens = _given(node, 4)
    steps = x.shape[1 if node.attrs.get("layout", 0) else 0]
    if lens is not None and not (isinstance(lens, gs.Constant)
                                 and np.all(np.asarray(lens.values) == steps)):
        return "sequence_lens must be absent or constant and equal to the sequence length"
    activations = tuple(_text(a) for a in node.attrs.get("activations", ()))
    directions = 2 if _text(node.attrs.get("direction", "forward")) == "bidirectional" else 1
    default = DEFAULT_ACTIVATIONS[node.op]
    if node.op == "RNN":
        if any(a not in ACTIVATIONS for a in activations):
            return f"RNN activation {activations} is not supported (Tanh, Relu, Sigmoid are)"
        if len(set(activations)) > 1:
            return "RNN directions with different activations are not supported"
    elif activations and activations != default * directions:
        return f"activations {list(activations)} are not supported (only the defaults)"
    if x.dtype is not None and np.dtype(x.dtype) != np.float32:
        return "only float32 is supported"
    return None


# -- Relax converters --------------------------------------------------------------------------

def _array(expr) -> np.ndarray:
    return expr.value.numpy()


def _padded(gates: int, batch: int, lanes: int) -> int:
    tile = lanes * tile_vectors(batch, gates, lanes)
    return -(-gates // tile) * tile


def _state(bb, given, directions: int, batch: int, hidden: int, layout: int):
    """An initial state as ``[directions, batch, hidden]`` (zeros when not given)."""
    if given is None:
        return relax.const(np.zeros((directions, batch, hidden), np.float32))
    if layout:  # [batch, directions, hidden] -> [directions, batch, hidden]
        given = bb.emit(relax.op.permute_dims(given, [1, 0, 2]))
    return given


def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape.values]


class _Recurrent:
    """The part LSTM, GRU and RNN share: layouts, directions, projections, stacking."""

    op = ""
    gates = 1
    states = 1  # LSTM: 2 (h and c)

    @classmethod
    def convert(cls, bb, inputs, attr, lanes):
        x, w, r = inputs[0], _array(inputs[1]), _array(inputs[2])
        layout = int(attr.get("layout", 0))
        if layout:  # [batch, steps, input] -> [steps, batch, input]
            x = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
        steps, batch, width_in = _shape(x)
        directions, gates_h, _ = w.shape
        hidden = int(attr["hidden_size"])
        bias = _array(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else \
            np.zeros((directions, 2 * gates_h), np.float32)
        direction = _text(attr.get("direction", "forward"))
        initial = [inputs[5 + i] if len(inputs) > 5 + i else None for i in range(cls.states)]
        states = [_state(bb, s, directions, batch, hidden, layout) for s in initial]
        width = _padded(gates_h, batch, lanes)
        tile = lanes * tile_vectors(batch, width, lanes)
        order = cls.columns(batch, hidden, width, lanes)
        # every direction's input projection from one matmul: xw [steps, batch, D * width]
        wt = np.zeros((width_in, directions * width), np.float32)
        xb = np.zeros(directions * width, np.float32)
        rts, extras = [], []
        for d in range(directions):
            w_d = np.zeros((width_in, width), np.float32)
            w_d[:, :gates_h] = w[d].T
            rt = np.zeros((hidden, width), np.float32)
            rt[:, :gates_h] = r[d].T
            xb_d, rb = cls.biases(bias[d, :gates_h], bias[d, gates_h:], hidden, width)
            extras.append(cls.extras(rb, rt, hidden))
            if order is not None:
                w_d, rt, xb_d = w_d[:, order], rt[:, order], xb_d[order]
            wt[:, d * width:(d + 1) * width] = w_d
            xb[d * width:(d + 1) * width] = xb_d
            # R^T in tiles of columns, each contiguous: [width / tile, hidden, tile]
            rts.append(rt.reshape(hidden, width // tile, tile).transpose(1, 0, 2))
        flat = bb.emit(relax.op.reshape(x, [steps * batch, width_in]))
        xw = bb.emit(relax.op.add(relax.op.matmul(flat, relax.const(wt)), relax.const(xb)))
        xw = bb.emit(relax.op.reshape(xw, [steps, batch, directions * width]))
        kernel = cls.kernel(steps, batch, hidden, width, lanes, directions,
                            direction == "reverse", attr)
        # named by the module, not by TVMScript (several layers: one symbol each)
        gv = bb.add_func(kernel.without_attr("global_symbol"), f"{cls.op.lower()}_{direction}")
        constants = [np.stack(c) for c in zip(*extras)]
        args = [xw, relax.const(np.ascontiguousarray(np.stack(rts)))] + \
            [relax.const(c) for c in constants] + states
        # Y [steps, directions, batch, hidden]; Y_h, Y_c [directions, batch, hidden]
        out_ty = [relax.TensorType((steps, directions, batch, hidden), F32)] + \
            [relax.TensorType((directions, batch, hidden), F32)] * cls.states
        out = bb.emit(relax.call_tir(gv, args, out_ty))
        y = bb.emit(relax.TupleGetItem(out, 0))
        finals = [bb.emit(relax.TupleGetItem(out, 1 + i)) for i in range(cls.states)]
        if layout:  # Y [batch, steps, directions, hidden]; states [batch, directions, hidden]
            y = bb.emit(relax.op.permute_dims(y, [2, 0, 1, 3]))
            finals = [bb.emit(relax.op.permute_dims(s, [1, 0, 2])) for s in finals]
        return relax.Tuple([y, *finals])

    @classmethod
    def biases(cls, wb, rb, hidden, width):
        """(the bias added to the input projections, the recurrent kernel's own bias or None)."""
        xb = np.zeros(width, np.float32)
        xb[:wb.size] = wb + rb
        return xb, None

    @classmethod
    def extras(cls, rb, rt, hidden) -> list[np.ndarray]:
        """One direction's constants the kernel reads after R^T (``rt``: ``[hidden, width]``,
        unpacked); stacked over the directions."""
        return []

    @classmethod
    def columns(cls, batch, hidden, width, lanes) -> np.ndarray | None:
        """The order of the gate columns in the kernel's ``xw`` and R^T (``order[new] =
        old``), None for ONNX's own."""
        return None


class _LSTM(_Recurrent):
    op, gates, states = "LSTM", 4, 2

    @classmethod
    def columns(cls, batch, hidden, width, lanes):
        chunk = _unit_chunk(batch, hidden, width, lanes)
        return None if chunk is None else split_columns(hidden, chunk)

    @classmethod
    def kernel(cls, steps, batch, hidden, width, lanes, directions, reverse, attr):
        if _unit_chunk(batch, hidden, width, lanes) is not None:
            return lstm_split_kernel(steps, batch, hidden, width, lanes, directions, reverse)
        return lstm_kernel(steps, batch, hidden, width, lanes, directions, reverse)


class _GRU(_Recurrent):
    op, gates = "GRU", 3

    @classmethod
    def biases(cls, wb, rb, hidden, width):
        xb = np.zeros(width, np.float32)
        xb[:wb.size] = wb
        xb[:2 * hidden] += rb[:2 * hidden]  # z and r: both biases outside the reset
        rbias = np.zeros(width, np.float32)
        rbias[2 * hidden:3 * hidden] = rb[2 * hidden:]  # h: the recurrent bias inside it
        return xb, rbias

    @classmethod
    def extras(cls, rb, rt, hidden):
        # the h gate's R^T on its own: without linear_before_reset it multiplies r * h
        return [rb, rt[:, 2 * hidden:3 * hidden]]

    @classmethod
    def kernel(cls, steps, batch, hidden, width, lanes, directions, reverse, attr):
        return gru_kernel(steps, batch, hidden, width, lanes, directions, reverse,
                          bool(attr.get("linear_before_reset", 0)))


class _RNN(_Recurrent):
    op, gates = "RNN", 1

    @classmethod
    def kernel(cls, steps, batch, hidden, width, lanes, directions, reverse, attr):
        activation = _text((attr.get("activations") or ("Tanh",))[0])
        return rnn_kernel(steps, batch, hidden, width, lanes, directions, reverse, activation)


def _converter(cls, lanes: int):
    """An importer converter class for ``cls`` (the importer asks it for a function by
    opset; one function serves every opset: layout is read when given)."""
    def get_converter(_cls, opset):
        return lambda bb, inputs, attr, params: cls.convert(bb, inputs, attr, lanes)
    return type(f"{cls.op}Converter", (), {"get_converter": classmethod(get_converter)})


OPS = {"LSTM": _LSTM, "GRU": _GRU, "RNN": _RNN}


@contextlib.contextmanager
def converters(lanes: int) -> Iterator[None]:
    """TVM's ONNX importer with converters for LSTM, GRU and RNN (vectors of ``lanes``), for
    the duration of the block. (The importer has no hook for extra converters; its
    ``_get_convert_map`` is looked up at every node, so it is wrapped here.)"""
    from tvm.relax.frontend.onnx import onnx_frontend
    original = onnx_frontend._get_convert_map

    def extended():
        table = original()
        table.update({op: _converter(cls, lanes) for op, cls in OPS.items()})
        return table

    onnx_frontend._get_convert_map = extended
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original
