"""Int8 contractions: QDQ ``MatMul`` / ``Gemm`` / ``Conv`` run as u8 x s8 -> i32 kernels.

TVM's ONNX importer reads a QDQ graph (``mmcompile.quantize``, onnxruntime's
``quantize_static``) as ``dequantize`` ops in front of float ``matmul`` / ``conv2d``, so
without this module the int8 model runs in float, slower than the float model. The rewrite
(:class:`QuantizedContractions`, first in :func:`~.lowering.fuse_cpu`) finds

    matmul(dequantize(xq, sx, zx), dequantize(W, sw, 0))        (Gemm: W transposed)
    conv2d(dequantize(xq, sx, zx), dequantize(W, sw, 0))        (NCHW, OIHW, groups 1)

with ``W`` a constant int8 tensor and per-tensor ``sx``/``zx``, and replaces the pair by one
kernel that sums ``xq * W`` exactly in int32 and scales once:

    y[m, n] = float(sum_k xq[m, k] W[k, n]  -  zx sum_k W[k, n]) * (sx sw[n])

(the zero-point term is a compile-time constant per column). This is how onnxruntime's
``MatMulIntegerToFloat`` computes; the float ops after it stay as they were and are fused by
``FuseOps`` as usual. Where they are a bias add, a ReLU and the next ``quantize``
(:class:`_Requantizer`), the kernel instead adds the int32 bias to the sum and scales once by
``sx sw / sy`` into the quantized output, as ``QLinearConv`` / ``QLinearMatMul`` / ``QGemm``
do: the same bytes as onnxruntime's int8 kernels, where the float steps rounded an output
near a tie the other way in 1-2 of 10^6.
int8 activations (``activations="int8"``) are shifted by 128 to uint8 (``zx + 128``).
The same rewrite moves a max pool of a dequantized tensor (``DQ [-> Relu] -> MaxPool``,
what a QDQ graph keeps between two quantized convolutions) onto the quantized tensor,
exactly (``_Rewriter._max_pool``): the convolution before it then writes uint8, not float.

Kernels: the activation is staged as uint8 (a matmul's reduction padded to a multiple of 4,
its rows to the register tile's where no divisor is near it (CLIP's 65 tokens); a
convolution's input as NHWC, padded with the zero point, channels to a multiple of the step;
a 1-channel input as rows whose neighbouring columns are summed together); weights are
packed at compile time. With AVX512-VNNI the inner ``16 x 4`` block is one ``vpdpbusd``
(weights ``[N/16, K/4, 16, 4]`` int8); with AVX2 a ``16 x 2`` block is two ``vpmaddwd``
(weights widened to int16, ``[N/16, K/2, 16, 2]``, and the activation staged as int16;
exact, where ``pmaddubsw``'s int16 pair sums would saturate); elsewhere the same loop nest
in vector int32. The schedule rule and the tensor intrinsics are in :mod:`.cpu_int8`:
register tiles of the sum in parallel, the epilogue (scale, bias, activation, requantize)
per tile.

AMX (:func:`has_amx`: Sapphire Rapids and later, where Linux grants the process tile state;
``MMCOMPILE_AMX=0`` turns it off): a matmul of 32 rows or more with a reduction of little
padding (:func:`use_amx`) runs on tiles (:func:`_amx_matmul`, scheduled by :mod:`.cpu_amx`):
its leading dims flattened by a Relax reshape (free), so that the output is a box per
32 x 32 register block and the epilogue runs per block right after the tile store. The
reshape also keeps ``FuseOps`` from fusing the elementwise ops after the kernel into it;
fused there (``transform_block_layout`` flattening the epilogue instead), CLIP's
``DQ -> QuickGELU -> Q`` cost ~90 us more per fc1 at batch 8 (1.08x the model; not
understood yet). Convolutions with enough multiply-adds and little tile padding
(:func:`use_amx_conv`) run on tiles too (:func:`_amx_conv2d`, :class:`AmxConv`): the
weights are the tiles' signed rows (``tdpbsud``) and 16 output pixels of a row the
unsigned columns, so a tile of the sum is 16 channels x 16 pixels and the epilogue writes
NCHW rows as vectors; the input is staged twice (4 channels of a pixel contiguous, then the
tile rows: one copy per kernel column, strided convolutions' pixels made consecutive).
Kernels alone, 2 threads, batch 8: 3x3 32 -> 64 on 32 x 32 1.60 -> 0.32 ms, 64 -> 128 on
16 x 16 1.43 -> 0.17 ms, 5x5 16 -> 32 on 28 x 28 0.47 -> 0.19 ms; stride 2 32 -> 64 on
48 x 48 0.61 -> 0.46 ms (through im2col rows instead: 0.62-1.9x the ``vpdpbusd``
kernels). Stems (1-3 input channels: 5-9 of a tile row's 64 bytes) stay on ``vpdpbusd``,
as :func:`_int8_stem` (16 output pixels per instruction, the weights broadcast); so does a
convolution down a one-column map until :meth:`_Rewriter._conv` reads it as one row.

Measured (``mmcompile bench``, the six suite models at batch 1 and 8, 3 rounds, AMD znver4,
2 threads, one run): time / onnxruntime's int8 kernels on the same QDQ file, geomean 0.83
(batch 1) and 0.78 (batch 8); per model 0.48-0.88 except MM-IMDb and late fusion at batch 1
(1.26, 1.17; not profiled yet).
Against mmcompile's own float build, 0.79 overall. On AVX2 without VNNI (znver3, the six
models, one run): 0.80 (batch 1) and 0.89 (batch 8) of onnxruntime's int8 time, 1.12 of
mmcompile's float time (twice a float FMA's multiply-adds per ``vpmaddwd`` pair at best, and
the float convolutions use Winograd F(4x4, 3x3); exact int8 has only F(2x2, 3x3), not yet
implemented: see the README). On an Emerald Rapids Xeon (AMX, 2 threads, one run, AMX for
the matmuls): 0.76 (batch 1) and 0.66 (batch 8) of onnxruntime's int8 time, 0.95 and 0.83
of mmcompile's float time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax import expr_functor

from mmcompile.targets.tvm.cpu_matmul import _largest_divisor, row_padding
from mmcompile.targets.tvm.rewrite import (constant_value, is_call, rewrite_functions,
                                          variable_uses)
from mmcompile.targets.tvm.schedule_util import has_features

MAX_POOLS = ("relax.nn.max_pool1d", "relax.nn.max_pool2d", "relax.nn.max_pool3d")
BLOCK = 16  # output columns per vector of int32 accumulators
STEP = 4    # reduction steps one vpdpbusd sums per lane

# Names the schedule rule (:mod:`.cpu_int8`) finds its blocks by (FuseTIR keeps block names).
STAGE_BLOCK, SUM_BLOCK = "int8_data", "int8_acc"
AMX_SUM_BLOCK = SUM_BLOCK + "_amx"  # the sum of an AMX kernel (:mod:`.cpu_amx`)
AMX_CONV_BLOCK = SUM_BLOCK + "_tconv"  # the sum of an AMX convolution (:mod:`.cpu_amx`)
# the second staging pass of the AMX and stem convolutions (their runs of pixels)
ROWS_BLOCK = STAGE_BLOCK + "_rows"
# an AMX register block: 2 x 2 tiles of 16 rows x 16 int32 columns, 64 reduction bytes a row
AMX_ROWS, AMX_COLS, AMX_DEPTH = 32, 32, 64


def has_vnni(target) -> bool:
    """Whether ``target`` (an LLVM CPU target) has AVX512-VNNI's ``vpdpbusd``."""
    return has_features(target, "avx512vnni", "avx512bw")


def has_amx(target) -> bool:
    """Whether int8 kernels for ``target`` may use AMX tiles (:mod:`.cpu_amx`): it has
    AMX-INT8 and AVX512-VNNI (the kernels too small for tiles), and this process was granted
    tile state (:func:`~.executable.enable_amx`): a model compiled here is verified here."""
    from mmcompile.targets.tvm.executable import enable_amx
    if os.environ.get("MMCOMPILE_AMX", "1") == "0":  # documented off switch (README)
        return False
    return has_vnni(target) and has_features(target, "amx-int8", "amx-tile") and enable_amx()


def has_avx2(target) -> bool:
    """Whether ``target`` has AVX2's ``vpmaddwd`` on 256-bit vectors."""
    return has_features(target, "avx2")


def int8_instructions(target, amx_kernels: int = 0) -> str:
    """What the int8 kernels run on ``target``, for manifests and progress lines."""
    if amx_kernels:
        return f"tdpbusd (AMX) in {amx_kernels}, else vpdpbusd (AVX512-VNNI)"
    if has_vnni(target):
        return "vpdpbusd (AVX512-VNNI)"
    if has_avx2(target):
        return "vpmaddwd (AVX2, weights widened to int16)"
    return "int32 multiply-add (no AVX2)"


def step_for(vnni: bool) -> int:
    """Reduction steps per instruction: 4 (vpdpbusd on bytes) or 2 (vpmaddwd on int16)."""
    return STEP if vnni else 2


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def register_tile(blocks: int, vnni: bool) -> tuple[int, int]:
    """``(row limit, column blocks)`` of the int32 sum's register tile over ``blocks``
    16-column blocks: at most 12 accumulators of 16 lanes with VNNI (4 blocks wide), 4 blocks
    with AVX2 (2 wide); the schedule takes the largest divisor of the rows up to the limit."""
    cols = _largest_divisor(blocks, 4 if vnni else 2)
    return (12 if vnni else 4) // cols, cols


# -- compile-time weights --------------------------------------------------------------------

def pack_weights(weight: np.ndarray, vnni: bool, amx: bool = False) -> np.ndarray:
    """int8 ``[K, N]`` -> zero-padded panels of 16 columns: ``[N/16, K/4, 16, 4]`` int8 for
    vpdpbusd (4 reduction steps of each column contiguous), else ``[N/16, K/2, 16, 2]``
    widened to int16 for vpmaddwd (2 steps per column). For AMX (``amx``), the vpdpbusd
    layout padded to :data:`AMX_DEPTH` steps and :data:`AMX_COLS` columns: 16 consecutive
    ``K/4`` rows of a panel are one 16 x 64-byte weight tile."""
    depth, cols = weight.shape
    step = step_for(vnni)
    kp, npad = _round_up(depth, STEP), _round_up(cols, BLOCK)
    if amx:
        kp, npad = _round_up(depth, AMX_DEPTH), _round_up(cols, AMX_COLS)
    padded = np.zeros((kp, npad), np.int8 if vnni else np.int16)
    padded[:depth, :cols] = weight
    return np.ascontiguousarray(
        padded.reshape(kp // step, step, npad // BLOCK, BLOCK).transpose(2, 0, 3, 1))


def _epilogue_constants(weight: np.ndarray, w_scale: np.ndarray, x_scale: float,
                        x_zero: int) -> tuple[np.ndarray, np.ndarray]:
    """``(zx * column sums of W as int32, sx * sw per column as float32)``."""
    cols = weight.shape[1]
    correction = (x_zero * weight.astype(np.int64).sum(axis=0)).astype(np.int32)
    scale = (np.float32(x_scale) * np.broadcast_to(w_scale.astype(np.float32), (cols,)))
    return correction, scale.astype(np.float32)


# -- TE kernels ------------------------------------------------------------------------------

def staged_dtype(vnni: bool) -> str:
    """The staged activation's type: uint8 bytes for vpdpbusd; without VNNI int16, widened
    once while staging, so that each ``vpmaddwd`` broadcasts its pair of steps straight from
    memory (widening per broadcast cost three vector instructions per pair, a third of the
    kernel's vector work: 3x3 conv 32 -> 64 on 28x28, one thread, 347 -> 271 us)."""
    return "uint8" if vnni else "int16"


def _staged(value, signed: bool, vnni: bool):
    """An activation element as the kernel multiplies it: uint8 (int8 shifted by 128),
    widened to int16 without VNNI (:func:`staged_dtype`)."""
    if signed:
        value = (value.astype("int16") + tirx.const(128, "int16")).astype("uint8")
    return value if vnni else value.astype("int16")


def _packed(packed, vnni: bool):
    """``W[k, n]`` read from the packed weights (see :func:`pack_weights`)."""
    step = step_for(vnni)
    return lambda n, kk: packed[n // BLOCK, kk // step, n % BLOCK, kk % step]


def _scaled(acc, correction, scale, requant, n, *at):
    return _finished(acc[(*at, n)], correction, scale, requant, n)


def _finished(total, correction, scale, requant, n):
    """The output element of column ``n`` from its int32 sum ``total``: ``(total -
    correction) * scale`` in float, or with ``requant`` (``(levels, dtype)``, ``levels`` the
    float32 tensor ``[zero point, low, high]``, see :class:`_Requantizer`) rounded to the
    nearest even integer, shifted by the zero point and saturated to ``[low, high]``, as
    onnxruntime's requantizing int8 kernels write it. The levels are an argument, not
    constants in the code, so that layers of one shape share their kernel."""
    value = (total - correction[n]).astype("float32") * scale[n]
    if requant is None:
        return value
    levels, dtype = requant
    return te.max(te.min(te.round(value) + levels[0], levels[2]), levels[1]).astype(dtype)


def _int8_matmul(x, packed, correction, scale, signed: bool, vnni: bool, requant=None):
    """``x [..., K]`` (uint8 / int8) times the packed weights, as float ``[..., N]``. The
    padding (reduction steps against zero weights, rows dropped from the output) may hold
    any value: zero, so that the zero point is not in the code and layers of one shape
    share their kernel."""
    lead, depth = [int(d) for d in x.shape[:-1]], int(x.shape[-1])
    padded = _round_up(depth, STEP)
    cols = int(scale.shape[0])
    fill = tirx.const(0, staged_dtype(vnni))
    # rows with no divisor near the register tile's (CLIP's 65 tokens, ViT's 197) are padded,
    # as the float matmuls are (cpu_matmul.row_padding): else the tile is one row
    rows = lead[-1]
    rows_padded = _round_up(rows, row_padding(rows, register_tile(int(packed.shape[0]), vnni)[0]))
    staged = [*lead[:-1], rows_padded]

    def stage(*i):
        value = _staged(x[i], signed, vnni)
        inside = ([i[-1] < depth] if padded != depth else []) + \
            ([i[-2] < rows] if rows_padded != rows else [])
        return te.if_then_else(tirx.all(*inside), value, fill) if inside else value
    data = te.compute((*staged, padded), stage, name=STAGE_BLOCK)
    weight = _packed(packed, vnni)
    k = te.reduce_axis((0, padded), "k")
    acc = te.compute(
        (*staged, BLOCK * int(packed.shape[0])),
        lambda *i: te.sum(data[(*i[:-1], k)].astype("int32")
                          * weight(i[-1], k).astype("int32"), axis=k),
        name=SUM_BLOCK)
    return te.compute((*lead, cols),
                      lambda *i: _scaled(acc, correction, scale, requant, i[-1], *i[:-1]),
                      name="int8_out")


def use_amx(rows: int, depth: int) -> bool:
    """Whether a contraction of ``rows`` (activation rows) over ``depth`` runs on AMX tiles
    where the CPU has them: at least two 16-row tiles, padding at most a quarter of the rows
    and the reduction. A tile multiply-add is 16 x 16 x 64; fewer rows or a short reduction
    mostly multiply padding (then vpdpbusd)."""
    rows_padded, depth_padded = _round_up(rows, AMX_ROWS), _round_up(depth, AMX_DEPTH)
    return rows >= AMX_ROWS and rows_padded <= 1.25 * rows and depth_padded <= 1.25 * depth


def _amx_sum(data, packed):
    """The int32 sum of the staged ``data [rows, K]`` (uint8; rows a multiple of
    :data:`AMX_ROWS`, ``K`` of :data:`AMX_DEPTH`) times the packed weights, as ``[rows, N/16,
    16]``: reduction steps split ``(K/4, 4)`` and columns ``(N/16, 16)`` as the weight tile
    holds them, so each 32 x 32 x 64 block is a plain box :mod:`.cpu_amx` tensorizes."""
    rows, blocks = int(data.shape[0]), int(packed.shape[0])
    kq = te.reduce_axis((0, int(packed.shape[1])), "kq")
    kr = te.reduce_axis((0, STEP), "kr")
    return te.compute(
        (rows, blocks, BLOCK),
        lambda i, jb, jl: te.sum(data[i, kq * STEP + kr].astype("int32")
                                 * packed[jb, kq, jl, kr].astype("int32"), axis=[kq, kr]),
        name=AMX_SUM_BLOCK)


def _amx_matmul(x, packed, correction, scale, signed: bool, requant=None):
    """``x [rows, K]`` (the rewrite flattens leading dims with a reshape, free in Relax)
    times the packed weights (:func:`pack_weights` with ``amx``) on AMX tiles: the
    activation staged as ``[rows padded to 32, K padded to 64]`` uint8 (padding: zero, as in
    :func:`_int8_matmul`). The output ``[rows, N]`` is a box per register block, so
    the epilogue runs per block while its sums are in cache (:mod:`.cpu_amx`)."""
    rows, depth = (int(d) for d in x.shape)
    rows_padded, depth_padded = _round_up(rows, AMX_ROWS), int(packed.shape[1]) * STEP
    fill = tirx.const(0, "uint8")

    def stage(i, k):
        value = _staged(x[i, k], signed, True)
        inside = ([i < rows] if rows_padded != rows else []) + \
            ([k < depth] if depth_padded != depth else [])
        return te.if_then_else(tirx.all(*inside), value, fill) if inside else value
    data = te.compute((rows_padded, depth_padded), stage, name=STAGE_BLOCK)
    acc = _amx_sum(data, packed)
    return te.compute(
        (rows, int(scale.shape[0])),
        lambda i, n: _finished(acc[i, n // BLOCK, n % BLOCK], correction, scale, requant, n),
        name="int8_out")


def conv_channels(channels: int, vnni: bool) -> int:
    """Input channels of the staged activation, a multiple of :func:`step_for`: each
    ``vpdpbusd`` (``vpmaddwd``) reads 4 (2) channels of one pixel."""
    return _round_up(channels, step_for(vnni))


def taps_along_width(channels: int, kernel_width: int, dilation_width: int, vnni: bool) -> int:
    """Kernel columns per row when a ``vpdpbusd`` sums 4 neighbouring columns instead of 4
    channels (a 1-channel input, a spectrogram or grayscale image, which 4 channels would pad
    4x): the width rounded up to :func:`step_for`; 0 when channels are summed."""
    if channels == 1 and dilation_width == 1 and kernel_width > 1:
        return _round_up(kernel_width, step_for(vnni))
    return 0


def conv_weight_rows(weight: np.ndarray, dilation_width: int, vnni: bool) -> np.ndarray:
    """OIHW int8 weights as ``[K, O]`` rows in the order :func:`_int8_conv2d` sums them:
    (kernel row, kernel column, channel), channels padded to :func:`conv_channels`, or
    (kernel row, kernel column padded to :func:`taps_along_width`) for a 1-channel input."""
    out_ch, channels, kh, kw = weight.shape
    wide = taps_along_width(channels, kw, dilation_width, vnni)
    if wide:
        rows = np.zeros((kh, wide, out_ch), np.int8)
        rows[:, :kw] = weight[:, 0].transpose(1, 2, 0)
    else:
        rows = np.zeros((kh, kw, conv_channels(channels, vnni), out_ch), np.int8)
        rows[:, :, :channels] = weight.transpose(2, 3, 1, 0)
    return np.ascontiguousarray(rows.reshape(-1, out_ch))


def conv_size(size: int, before: int, after: int, kernel: int, stride: int,
              dilation: int) -> int:
    """Output pixels of a convolution along one axis."""
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


class _ConvShape(NamedTuple):
    one_row: bool  # a conv1d (NCW), read as one row (NC1W)
    batch: int
    channels: int
    height: int
    width: int
    out_height: int
    out_width: int


def _conv_shape(x, kernel, strides, padding, dilation) -> _ConvShape:
    """The sizes of a convolution of ``x``: NCHW, or NCW (a conv1d, read as one row)."""
    one_row = len(x.shape) == 3
    if one_row:
        batch, channels, width = (int(d) for d in x.shape)
        height = 1
    else:
        batch, channels, height, width = (int(d) for d in x.shape)
    (top, left, bottom, right), (kh, kw) = padding, kernel
    return _ConvShape(one_row, batch, channels, height, width,
                      conv_size(height, top, bottom, kh, strides[0], dilation[0]),
                      conv_size(width, left, right, kw, strides[1], dilation[1]))


def _conv_out(shape: _ConvShape, cols: int, value):
    """A convolution's output, NCHW (NCW for a conv1d), ``value(b, n, y, z)`` each."""
    if shape.one_row:
        return te.compute((shape.batch, cols, shape.out_width),
                          lambda b, n, z: value(b, n, 0, z), name="int8_out")
    return te.compute((shape.batch, cols, shape.out_height, shape.out_width), value,
                      name="int8_out")


def _staged_rows(out_rows: int, kernel_rows: int, stride: int, dilation: int) -> int:
    """Rows of an input staged by row phase (``h = staged row * stride + phase``): what
    ``out_rows`` output rows read, for :func:`_phase_row`."""
    return out_rows - 1 + ((kernel_rows - 1) * dilation) // stride + 1


def _phase_row(y, rh, stride: int, dilation: int):
    """``(phase, staged row)`` of input row ``y * stride + rh * dilation`` (``y``: output
    row, ``rh``: kernel row): consecutive output rows read consecutive staged rows whatever
    the stride, so a register block of two rows is one box."""
    return (rh * dilation) % stride, y + (rh * dilation) // stride


def _int8_conv2d(x, packed, correction, scale, kernel, strides, padding, dilation,
                 zero: int, signed: bool, vnni: bool, requant=None):
    """Direct convolution of ``x`` (NCHW, uint8 / int8) over an NHWC staging of it, padded
    spatially with the zero point and to :func:`conv_channels` channels; the reduction runs
    over (kernel row, kernel column, channel) with 4 channels per ``vpdpbusd``."""
    shape = _conv_shape(x, kernel, strides, padding, dilation)
    one_row, batch, channels, height, width, oh, ow = shape
    kh, kw = kernel
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    cols = int(scale.shape[0])
    fill = tirx.const(zero, staged_dtype(vnni))
    wide = taps_along_width(channels, kw, dw, vnni)
    step = step_for(vnni)
    if wide:  # 1 channel: stage [B, H, W + extra columns], sum 4 kernel columns at a time
        def stage1(b, h, w):
            y, z = h - top, w - left
            inside = tirx.all(y >= 0, y < height, z >= 0, z < width)
            value = x[b, 0, z] if one_row else x[b, 0, y, z]
            return te.if_then_else(inside, _staged(value, signed, vnni), fill)
        data = te.compute((batch, height + top + bottom, width + left + right + wide - kw),
                          stage1, name=STAGE_BLOCK)
        rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, wide), "rw")
        acc = te.compute(
            (batch, oh, ow, BLOCK * int(packed.shape[0])),
            lambda b, y, z, n: te.sum(
                data[b, y * sh + rh * dh, z * sw + rw].astype("int32")
                * packed[n // BLOCK, rh * (wide // step) + rw // step, n % BLOCK,
                         rw % step].astype("int32"), axis=[rh, rw]),
            name=SUM_BLOCK)
    else:
        cp = conv_channels(channels, vnni)

        def stage(b, h, w, c):
            y, z = h - top, w - left
            inside = tirx.all(c < channels, y >= 0, y < height, z >= 0, z < width)
            value = x[b, c, z] if one_row else x[b, c, y, z]
            return te.if_then_else(inside, _staged(value, signed, vnni), fill)
        data = te.compute((batch, height + top + bottom, width + left + right, cp), stage,
                          name=STAGE_BLOCK)
        rh, rw, rc = (te.reduce_axis((0, e), n) for e, n in ((kh, "rh"), (kw, "rw"), (cp, "rc")))
        tap = rh * kw + rw

        def weight(n):
            return packed[n // BLOCK, tap * (cp // step) + rc // step, n % BLOCK, rc % step]
        acc = te.compute(
            (batch, oh, ow, BLOCK * int(packed.shape[0])),
            lambda b, y, z, n: te.sum(
                data[b, y * sh + rh * dh, z * sw + rw * dw, rc].astype("int32")
                * weight(n).astype("int32"), axis=[rh, rw, rc]),
            name=SUM_BLOCK)
    return _conv_out(shape, cols,
                     lambda b, n, y, z: _scaled(acc, correction, scale, requant, n, b, y, z))


class AmxConv(NamedTuple):
    """How an AMX convolution (:func:`_amx_conv2d`) lays out one convolution.

    The sum is ``out[n, pixel] = sum_k W[n, k] x[k, pixel]`` with the weights as the tiles'
    signed rows (``tdpbsud``: output channels down a tile, 64 reduction bytes across) and
    the activation as their unsigned columns: 16 pixels of one output row, 4 bytes each, per
    tile row. Per kernel row the reduction runs over (kernel column, 4-channel group,
    channel): the staging repeats each input row once per kernel column, shifted (and
    strided) so that a tile row, 16 output pixels x 4 channels, is 64 contiguous bytes, and
    the tile's rows (kernel column, channel group) are one stride apart. The sum is written
    ``[batch, rows, channel blocks, 16, pixels]``: a tile row is 16 pixels of one channel,
    which the epilogue writes to the NCHW output as one vector.

    Attributes:
        groups: 4-channel groups of the input.
        rows: reduction rows per kernel row (kernel columns x groups), padded to 16.
        row_tiles: output rows per register block (2 when a row is one tile wide).
        pixels: output pixels per register block and output row (32 / ``row_tiles``).
    """

    groups: int
    rows: int
    row_tiles: int
    pixels: int

    @staticmethod
    def plan(channels: int, out_channels: int, kernel: tuple[int, int], out_hw: tuple[int, int]
             ) -> "AmxConv":
        groups = -(-channels // STEP)
        rows = _round_up(kernel[1] * groups, 16)
        row_tiles = 2 if out_hw[1] <= 16 and out_hw[0] >= 2 else 1
        return AmxConv(groups, rows, row_tiles, AMX_COLS // row_tiles)

    def efficiency(self, channels: int, out_channels: int, kernel: tuple[int, int],
                   out_hw: tuple[int, int]) -> float:
        """The share of the tiles' multiply-adds that are the convolution's own (the rest
        multiplies padding: channels, kernel columns, output channels and pixels)."""
        oh, ow = out_hw
        return (channels * kernel[1] / (self.rows * STEP)
                * out_channels / _round_up(out_channels, AMX_ROWS)
                * ow / _round_up(ow, self.pixels) * oh / _round_up(oh, self.row_tiles))


# An AMX convolution's multiply-adds must be at least this share of its tiles' (AMX_EFFICIENCY)
# and it must have at least AMX_CONV_MACS of them (smaller ones stay on vpdpbusd).
AMX_EFFICIENCY = 0.5
AMX_CONV_MACS = 1 << 21


def use_amx_conv(channels: int, out_channels: int, kernel: tuple[int, int],
                 out_hw: tuple[int, int], batch: int) -> bool:
    """Whether a convolution (groups 1) runs on AMX tiles where the CPU has them: at least
    :data:`AMX_CONV_MACS` multiply-adds, at most half of its tiles' padding
    (:meth:`AmxConv.efficiency`): a 1- or 3-channel stem (5 or 9 reduction bytes a kernel
    row, against 64 a tile row) stays on ``vpdpbusd``."""
    if out_channels < AMX_ROWS // 2:
        return False
    plan = AmxConv.plan(channels, out_channels, kernel, out_hw)
    macs = batch * out_hw[0] * out_hw[1] * out_channels * channels * kernel[0] * kernel[1]
    return (macs >= AMX_CONV_MACS
            and plan.efficiency(channels, out_channels, kernel, out_hw) >= AMX_EFFICIENCY)


def amx_conv_weights(weight: np.ndarray, plan: AmxConv) -> np.ndarray:
    """OIHW int8 weights as the tiles :func:`_amx_conv2d` reads: ``[kernel rows, rows / 16,
    out channels / 16 (padded to 32), 16, 16, 4]``, element ``[kh, q, nb, nl, rr, j]`` the
    weight of output channel ``16 nb + nl``, kernel column and channel group
    ``divmod(16 q + rr, groups)``, channel ``4 g + j`` (zero past the real ones)."""
    out_ch, channels, kh, kw = weight.shape
    grouped = np.zeros((out_ch, plan.groups * STEP, kh, kw), np.int8)
    grouped[:, :channels] = weight
    # [O, G, 4, KH, KW] -> [KH, KW, G, O, 4] -> reduction rows (kw, g) -> padded
    rows = grouped.reshape(out_ch, plan.groups, STEP, kh, kw).transpose(3, 4, 1, 0, 2)
    rows = rows.reshape(kh, kw * plan.groups, out_ch, STEP)
    cols = _round_up(out_ch, AMX_ROWS)
    padded = np.zeros((kh, plan.rows, cols, STEP), np.int8)
    padded[:, :kw * plan.groups, :out_ch] = rows
    tiles = padded.reshape(kh, plan.rows // 16, 16, cols // BLOCK, BLOCK, STEP)
    return np.ascontiguousarray(tiles.transpose(0, 1, 3, 4, 2, 5))


def _amx_conv2d(x, packed, correction, scale, kernel, strides, padding, dilation,
                zero: int, signed: bool, requant=None):
    """Direct convolution of ``x`` (NCHW or NCW, uint8 / int8) on AMX tiles, laid out as
    :class:`AmxConv` says. Staged twice: the padded input ``[batch, rows, 4-channel groups,
    column phase, columns / stride, 4]`` (padding: the zero point), then the tile rows
    ``[batch, row phase, staged rows, reduction rows, pixels, 4]`` (input row ``h = staged
    row * stride + phase``, so that a register block's output rows are one stride apart
    whatever the stride). The sum ``[batch, output rows, channel blocks, 16, pixels]``, the
    output NCHW (NCW)."""
    shape = _conv_shape(x, kernel, strides, padding, dilation)
    one_row, batch, channels, height, width, oh, ow = shape
    kh, kw = kernel
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    cols = int(scale.shape[0])
    plan = AmxConv.plan(channels, cols, kernel, (oh, ow))
    ohp, owp = _round_up(oh, plan.row_tiles), _round_up(ow, plan.pixels)
    staged_rows = _staged_rows(ohp, kh, sh, dh)
    reach = ((kw - 1) * dw) // sw  # columns of a phase the tile rows read past the pixels
    fill = tirx.const(zero, "uint8")
    groups = plan.groups

    def pixel(b, h, g, phase, q, j):  # the padded input, 4 channels of a pixel contiguous
        c, y, z = g * STEP + j, h - top, q * sw + phase - left
        inside = [y >= 0, y < height, z >= 0, z < width] + \
            ([c < channels] if channels % STEP else [])
        value = x[b, c, z] if one_row else x[b, c, y, z]
        return te.if_then_else(tirx.all(*inside), _staged(value, signed, True), fill)
    # columns split by their phase modulo the stride: a tile row's 16 pixels, which a
    # strided convolution reads one stride apart, are then consecutive
    pixels = te.compute((batch, staged_rows * sh, groups, sw, owp + reach, STEP), pixel,
                        name=STAGE_BLOCK)

    def row(b, phase, hq, r, z, j):  # a tile row: 4 channels of 16 pixels, 64 bytes
        offset = te.min(r // groups, kw - 1) * dw  # (clamped: padding rows read a real one)
        value = pixels[b, hq * sh + phase, r % groups, offset % sw, z + offset // sw, j]
        return te.if_then_else(r < kw * groups, value, fill) if plan.rows != kw * groups \
            else value
    data = te.compute((batch, sh, staged_rows, plan.rows, owp, STEP), row,
                      name=ROWS_BLOCK)
    rh = te.reduce_axis((0, kh), "rh")
    rq = te.reduce_axis((0, plan.rows // 16), "rq")
    rr = te.reduce_axis((0, 16), "rr")
    rj = te.reduce_axis((0, STEP), "rj")
    acc = te.compute(
        (batch, ohp, int(packed.shape[2]), BLOCK, owp),
        lambda b, y, nb, nl, z: te.sum(
            data[(b, *_phase_row(y, rh, sh, dh), rq * 16 + rr, z, rj)].astype("int32")
            * packed[rh, rq, nb, nl, rr, rj].astype("int32"), axis=[rh, rq, rr, rj]),
        name=AMX_CONV_BLOCK)

    return _conv_out(shape, cols, lambda b, n, y, z: _finished(
        acc[b, y, n // BLOCK, n % BLOCK, z], correction, scale, requant, n))


STEM_BLOCK = SUM_BLOCK + "_pixels"  # the sum of a stem convolution (:func:`_int8_stem`)
STEM_CHANNELS = 4  # convolutions with at most this many input channels: stems


def use_stem(channels: int, out_width: int, vnni: bool) -> bool:
    """Whether a convolution (groups 1) runs as :func:`_int8_stem`: with VNNI, at most
    :data:`STEM_CHANNELS` input channels (an image's 3, a spectrogram's 1), where the
    channel-vector kernels sum 1-3 bytes per 4-byte step and write each output channel's
    pixels one by one, and output rows that fill 16-pixel vectors at least 3/4 (CLIP's
    8 x 8 patch embedding, 8 pixels a row: 0.28 ms as a stem, 0.14 on channel vectors)."""
    return vnni and channels <= STEM_CHANNELS and out_width >= 0.75 * _round_up(out_width, BLOCK)


def stem_taps(channels: int, kernel_width: int) -> int:
    """Reduction bytes per kernel row of a stem: (kernel column, channel), padded to 4."""
    return _round_up(kernel_width * channels, STEP)


def stem_weights(weight: np.ndarray) -> np.ndarray:
    """OIHW int8 weights as ``[kernel rows, taps / 4, out channels, 4]``: tap ``t`` of a
    kernel row is kernel column ``t // channels``, channel ``t % channels`` (zero past the
    real taps): the 4 bytes one ``vpdpbusd`` broadcasts for an output channel."""
    out_ch, channels, kh, kw = weight.shape
    taps = stem_taps(channels, kw)
    rows = np.zeros((kh, taps, out_ch), np.int8)
    rows[:, :kw * channels] = weight.transpose(2, 3, 1, 0).reshape(kh, kw * channels, out_ch)
    return np.ascontiguousarray(rows.reshape(kh, taps // STEP, STEP, out_ch).transpose(0, 1, 3, 2))


def _int8_stem(x, packed, correction, scale, kernel, strides, padding, dilation,
               zero: int, signed: bool, requant=None):
    """Direct convolution of a few-channel ``x`` (NCHW or NCW, uint8 / int8) with the output
    pixels as vector lanes: a ``vpdpbusd`` adds 16 pixels x 4 taps (kernel columns and
    channels, :func:`stem_taps`) of one output channel, the 4 weights broadcast, so the sum
    of a register tile is rows of NCHW pixels that the epilogue writes as vectors. Staged
    twice: the padded input, then per kernel row and 4 taps ``[pixels, 4]`` runs
    (``[batch, row phase, staged rows, taps / 4, pixels padded to 16, 4]``: input row
    ``staged row * stride + phase``, as in :func:`_amx_conv2d`)."""
    shape = _conv_shape(x, kernel, strides, padding, dilation)
    one_row, batch, channels, height, width, oh, ow = shape
    kh, kw = kernel
    (sh, sw), (dh, dw) = strides, dilation
    top, left, bottom, right = padding
    cols = int(scale.shape[0])
    owp = _round_up(ow, BLOCK)
    staged_rows = _staged_rows(oh, kh, sh, dh)
    wide = (owp - 1) * sw + (kw - 1) * dw + 1
    fill = tirx.const(zero, "uint8")
    taps = kw * channels

    def pad(b, c, h, w):
        y, z = h - top, w - left
        inside = tirx.all(y >= 0, y < height, z >= 0, z < width)
        value = x[b, c, z] if one_row else x[b, c, y, z]
        return te.if_then_else(inside, _staged(value, signed, True), fill)
    padded = te.compute((batch, channels, staged_rows * sh, wide), pad, name=STAGE_BLOCK)

    def run(b, phase, hq, tq, z, j):
        t = te.min(tq * STEP + j, taps - 1)  # (clamped: padding taps read a real one)
        value = padded[b, t % channels, hq * sh + phase, z * sw + (t // channels) * dw]
        return te.if_then_else(tq * STEP + j < taps, value, fill) if taps % STEP else value
    data = te.compute((batch, sh, staged_rows, stem_taps(channels, kw) // STEP, owp, STEP), run,
                      name=ROWS_BLOCK)
    rh = te.reduce_axis((0, kh), "rh")
    rq = te.reduce_axis((0, int(packed.shape[1])), "rq")
    rj = te.reduce_axis((0, STEP), "rj")
    acc = te.compute(
        (batch, cols, oh, owp),
        lambda b, n, y, z: te.sum(
            data[(b, *_phase_row(y, rh, sh, dh), rq, z, rj)].astype("int32")
            * packed[rh, rq, n, rj].astype("int32"), axis=[rh, rq, rj]),
        name=STEM_BLOCK)

    return _conv_out(shape, cols, lambda b, n, y, z: _finished(
        acc[b, n, y, z], correction, scale, requant, n))


# -- the Relax rewrite -----------------------------------------------------------------------

@expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod, vnni: bool, amx: bool = False):
        super().__init__(mod)
        self.vnni, self.amx = vnni, amx
        self.count = self.amx_count = 0
        self.pools = 0
        self.kernels: dict[str, _Kernel] = {}

    def _bound(self, expr):
        while isinstance(expr, relax.Var):
            value = self.lookup_binding(expr)
            if value is None:
                return expr
            expr = value
        return expr

    def _dequantize(self, expr):
        """``(quantized expr, scale array, zero-point array, axis)`` of a ``dequantize`` with
        constant scale and zero point, else None."""
        call = self._bound(expr)
        if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
                and call.op.name == "relax.dequantize"):
            return None
        scale, zero = constant_value(call.args[1]), constant_value(call.args[2])
        if scale is None or zero is None or str(call.ty.dtype) != "float32":
            return None
        return call.args[0], scale, zero, int(call.attrs.axis)

    def _activation(self, expr):
        """``(xq, scale, zero point as uint8, signed)`` of a per-tensor dequantized activation."""
        found = self._dequantize(expr)
        if found is None:
            return None
        xq, scale, zero, _ = found
        dtype = str(xq.ty.dtype)
        if dtype not in ("uint8", "int8") or scale.size != 1 or zero.size != 1:
            return None
        signed = dtype == "int8"
        return xq, float(scale.reshape(())), int(zero.reshape(())) + (128 if signed else 0), signed

    def _weight(self, expr, out_axis: int, ndim: int):
        """``(int8 weight, per-output scale)`` of a dequantized constant with zero zero-point,
        scaled per tensor or along ``out_axis``."""
        found = self._dequantize(expr)
        if found is None:
            return None
        wq, scale, zero, axis = found
        weight = constant_value(wq)
        if weight is None or weight.dtype != np.int8 or weight.ndim != ndim or np.any(zero != 0):
            return None
        if scale.size != 1 and (axis % ndim != out_axis or scale.size != weight.shape[out_axis]):
            return None
        return weight, scale.reshape(-1)

    def _matmul_weight(self, expr):
        """A matmul's right operand as ``(int8 [K, N], scale)``: ``dequantize(W [K, N])`` or
        Gemm's ``permute_dims(dequantize(W [N, K]))``."""
        call = self._bound(expr)
        if (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
                and call.op.name == "relax.permute_dims"
                and [int(a) for a in call.attrs.axes] == [1, 0]):
            found = self._weight(call.args[0], 0, 2)
            return None if found is None else (found[0].T, found[1])
        return self._weight(expr, 1, 2)

    def _emit(self, func, name, xq, weight, w_scale, x_scale, zero, signed, *attrs,
              amx: bool = False, packed: np.ndarray | None = None):
        """Call ``func`` on ``xq`` and ``weight`` (``[K, N]``; packed by
        :func:`pack_weights` unless ``packed`` is given)."""
        correction, scale = _epilogue_constants(weight, w_scale, x_scale, zero)
        if packed is None:
            packed = pack_weights(weight, self.vnni, amx)
        # a matmul's padding needs no zero point (:func:`_int8_matmul`); a convolution's does
        args = (*attrs, *(() if func in (_int8_matmul, _amx_matmul) else (zero,)), signed) \
            + ((self.vnni,) if func in (_int8_matmul, _int8_conv2d) else ())
        self.count += 1
        self.amx_count += amx
        call = self.builder_.call_te(
            func, xq, relax.const(packed), relax.const(correction), relax.const(scale), *args,
            primfunc_name_hint=name)
        # what _Requantizer needs to emit the kernel again with a requantizing epilogue
        self.kernels[call.args[0].name_hint] = _Kernel(
            func, name, args, 1 if func in (_int8_conv2d, _amx_conv2d, _int8_stem) else -1)
        return call

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or str(getattr(call.ty, "dtype", "")) != "float32":
            return call
        try:
            if call.op.name == "relax.matmul":
                return self._matmul(call)
            if call.op.name in ("relax.nn.conv2d", "relax.nn.conv1d"):
                return self._conv(call)
            if call.op.name in MAX_POOLS:
                return self._max_pool(call)
        except (TypeError, ValueError):  # symbolic shapes: leave the float op
            return call
        return call

    def _max_pool(self, call):
        """``max_pool(relu(dequantize(q)))`` (or without the ReLU) as
        ``relu(dequantize(max_pool(q)))``: the pool on the quantized tensor. Exact: a
        dequantize with positive scales and a ReLU never decrease, so they commute with a
        window maximum, and the quantized type's minimum pads a window as -inf pads the float
        one (each window holds an element of the input). The kernel before the pool then
        writes its uint8 output instead of the float one, and the pool reads a quarter of the
        bytes (onnxruntime runs such pools on uint8 too)."""
        relu = self._bound(call.args[0])
        if isinstance(relu, relax.Call) and relu.op.same_as(tvm.ir.Op.get("relax.nn.relu")):
            source = relu.args[0]
        else:
            relu, source = None, call.args[0]
        found = self._dequantize(source)
        if found is None:
            return call
        xq, scale, _, _ = found
        if str(xq.ty.dtype) not in ("uint8", "int8") or not np.all(scale > 0):
            return call
        dequantize = self._bound(source)
        pooled = self.builder_.emit(relax.Call(call.op, [xq], call.attrs))
        out = relax.Call(dequantize.op, [pooled, *dequantize.args[1:]], dequantize.attrs)
        if relu is not None:
            out = relax.Call(relu.op, [self.builder_.emit(out)], relu.attrs)
        self.pools += 1
        return out

    def _matmul(self, call):
        act, wt = self._activation(call.args[0]), self._matmul_weight(call.args[1])
        if act is None or wt is None or act[0].ty.ndim < 2:
            return call
        xq, x_scale, zero, signed = act
        weight, w_scale = wt
        shape = [int(d) for d in xq.ty.shape]  # ValueError when symbolic
        if shape[-1] != weight.shape[0]:
            return call
        rows = int(np.prod(shape[:-1]))
        if self.amx and use_amx(rows, shape[-1]):
            flat = xq if len(shape) == 2 else self.builder_.emit(
                relax.op.reshape(xq, [rows, shape[-1]]))
            out = self._emit(_amx_matmul, "int8_matmul_amx", flat, weight, w_scale, x_scale,
                             zero, signed, amx=True)
            if len(shape) == 2:
                return out
            return relax.op.reshape(self.builder_.emit(out), [*shape[:-1], weight.shape[1]])
        return self._emit(_int8_matmul, "int8_matmul", xq, weight, w_scale, x_scale, zero,
                          signed)

    def _conv(self, call):
        """conv2d (NCHW, OIHW) and conv1d (NCW, OIW, as a convolution one row high)."""
        attrs = call.attrs
        two_d = call.op.name == "relax.nn.conv2d"
        layouts = ("NCHW", "OIHW") if two_d else ("NCW", "OIW")
        if (int(attrs.groups) != 1 or (attrs.data_layout, attrs.kernel_layout) != layouts
                or attrs.out_layout != layouts[0]):
            return call
        act = self._activation(call.args[0])
        wt = self._weight(call.args[1], 0, 4 if two_d else 3)
        if act is None or wt is None:
            return call
        xq, x_scale, zero, signed = act
        [int(d) for d in xq.ty.shape]  # ValueError when symbolic
        weight, w_scale = wt
        ints = lambda values: [int(v) for v in values]
        strides, padding, dilation = (ints(attrs.strides), ints(attrs.padding),
                                      ints(attrs.dilation))
        if not two_d:  # one row: kernel 1 x kw, padding (top, left, bottom, right)
            weight = weight[:, :, None, :]
            strides, dilation = [1, *strides], [1, *dilation]
            padding = [0, padding[0], 0, padding[1]]
        batch, channels, *spatial = (int(d) for d in xq.ty.shape)
        if two_d and spatial[0] > 1 and spatial[1] == 1 and weight.shape[3] == 1 \
                and padding[1] == padding[3] == 0:
            # a 1-D convolution down the rows of a one-column map (tf2onnx writes conv1d so:
            # Magika's 256 -> 512, kernel 5): the same bytes read as one row, whose pixels
            # then fill the kernels' tiles (down the rows, each tile held one pixel)
            row = self.builder_.emit(relax.op.reshape(xq, [batch, channels, 1, spatial[0]]))
            out = self._conv_kernel(row, weight.transpose(0, 1, 3, 2), w_scale, x_scale, zero,
                                    signed, strides[::-1], [padding[i] for i in (1, 0, 3, 2)],
                                    dilation[::-1], "int8_conv2d")
            rows = conv_size(spatial[0], padding[0], padding[2], weight.shape[2], strides[0],
                             dilation[0])
            return relax.op.reshape(self.builder_.emit(out), [batch, weight.shape[0], rows, 1])
        return self._conv_kernel(xq, weight, w_scale, x_scale, zero, signed, strides, padding,
                                 dilation, "int8_conv2d" if two_d else "int8_conv1d")

    def _conv_kernel(self, xq, weight, w_scale, x_scale, zero, signed, strides, padding,
                     dilation, name):
        """The int8 kernel of a convolution of ``xq`` (NCHW, or NCW with ``weight`` one row
        high): a stem, on AMX tiles, or on channel vectors."""
        kh, kw = weight.shape[2:]
        batch, channels, *spatial = (int(d) for d in xq.ty.shape)
        height, width = spatial if len(spatial) == 2 else (1, spatial[0])
        out_hw = (conv_size(height, padding[0], padding[2], kh, strides[0], dilation[0]),
                  conv_size(width, padding[1], padding[3], kw, strides[1], dilation[1]))
        out_ch = weight.shape[0]
        if use_stem(channels, out_hw[1], self.vnni):
            return self._emit(_int8_stem, "int8_stem", xq, weight.reshape(out_ch, -1).T,
                              w_scale, x_scale, zero, signed, (kh, kw), strides, padding,
                              dilation, packed=stem_weights(weight))
        if self.amx and use_amx_conv(channels, out_ch, (kh, kw), out_hw, batch):
            plan = AmxConv.plan(channels, out_ch, (kh, kw), out_hw)
            return self._emit(_amx_conv2d, "int8_conv_amx", xq,
                              weight.reshape(out_ch, -1).T, w_scale, x_scale, zero, signed,
                              (kh, kw), strides, padding, dilation, amx=True,
                              packed=amx_conv_weights(weight, plan))
        return self._emit(_int8_conv2d, name, xq,
                          conv_weight_rows(weight, dilation[1], self.vnni), w_scale, x_scale,
                          zero, signed, (kh, kw), strides, padding, dilation)


class _Kernel(NamedTuple):
    """An int8 kernel :class:`_Rewriter` emitted: its TE function, name, the arguments after
    the constants, and its output's channel axis."""
    func: Callable
    name: str
    args: tuple
    channel_axis: int


@expr_functor.mutator
class _Requantizer(relax.PyExprMutator):
    """``quantize([relu](add(K, bias)), sy, zy)`` -> one int8 kernel writing the quantized
    tensor, for an int8 kernel ``K`` of :class:`_Rewriter` (scale ``sx * sw``) whose output,
    and the bias add's, is read only there, a bias ``dequantize(bq int32, sx * sw, 0)`` (any
    reshape of it constant along all but the channel axis; or no bias) and per-tensor
    ``sy``, ``zy``. The kernel then computes what onnxruntime's int8 kernels compute for
    that QDQ group (``QLinearConv``, ``QLinearMatMul``, ``QGemm``):

        y = saturate(round_half_even(float(acc + bq) * m) + zy),   m = float32(sx sw) / sy

    with ``m`` rounded to float32 once, as onnxruntime rounds it. Through the float ops it
    replaces (``(float(acc) * sx sw + float(bq) * sb) / sy``, each step rounded) an output
    within half a step of a tie could round the other way: 1-2 in 10^6 outputs did against
    onnxruntime's int8 kernels on 3x3 convolutions (AVX512-VNNI); none do now. It also drops
    the division by ``sy`` from the epilogue. A ReLU there is exact as a lower bound
    ``zy`` (the rounding is monotone and keeps 0)."""

    def __init__(self, mod, kernels: dict[str, _Kernel]):
        super().__init__(mod)
        self.kernels = kernels
        self.count = 0
        self.uses = variable_uses(mod)

    def _once(self, var):
        """``var``'s value when ``var`` is a variable read once, else None."""
        if not isinstance(var, relax.Var) or self.uses.get(var) != 1:
            return None
        return self.lookup_binding(var)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if is_call(call, "relax.quantize"):
            with contextlib.suppress(TypeError, ValueError):  # symbolic shapes: left as is
                fused = self._requantize(call)
                if fused is not None:
                    return fused
        return call

    def _requantize(self, call):
        sy, zy = constant_value(call.args[1]), constant_value(call.args[2])
        dtype = str(call.attrs.out_dtype)
        if sy is None or zy is None or sy.size != 1 or zy.size != 1 or \
                dtype not in ("uint8", "int8") or not float(sy.reshape(())) > 0:
            return None
        value, relu = self._once(call.args[0]), False
        if is_call(value, "relax.nn.relu"):
            value, relu = self._once(value.args[0]), True
        bias, unflat = None, None
        if is_call(value, "relax.add"):
            for kernel_var, other in (value.args, value.args[::-1]):
                kernel, unflat = self._unflattened(self._once(kernel_var))
                if self._kernel(kernel) is not None:
                    value, bias = kernel, other
                    break
            else:
                return None
        else:
            value, unflat = self._unflattened(value)
        found = self._kernel(value)
        if found is None:
            return None
        spec, (xq, packed, correction, scale) = found
        correction, scale = correction.value.numpy(), scale.value.numpy()
        shape = [int(d) for d in value.ty.shape]
        if bias is not None:
            bq = self._integer_bias(bias, shape, spec.channel_axis, scale)
            if bq is None:
                return None
            correction = correction - bq
        zero = int(zy.reshape(()))
        low, high = (0, 255) if dtype == "uint8" else (-128, 127)
        if relu:
            low = max(low, zero)
        m = (scale / np.float32(sy.reshape(()))).astype(np.float32)
        self.count += 1
        out = self.builder_.call_te(
            spec.func, xq, packed, relax.const(correction.astype(np.int32)), relax.const(m),
            *spec.args, (relax.const(np.array([zero, low, high], np.float32)), dtype),
            primfunc_name_hint=spec.name)
        return out if unflat is None else relax.op.reshape(self.builder_.emit(out), unflat)

    def _unflattened(self, value):
        """``(kernel call, shape)`` when ``value`` reshapes the output of a kernel read only
        there (an AMX matmul of flattened rows, :meth:`_Rewriter._matmul`; a convolution
        down a one-column map, run as one row), keeping the channel axis where it was; else
        ``(value, None)``."""
        if not is_call(value, "relax.reshape"):
            return value, None
        inner = self._once(value.args[0])
        found = self._kernel(inner)
        if found is None:
            return value, None
        outer, shape = [int(d) for d in value.ty.shape], [int(d) for d in inner.ty.shape]
        axis = found[0].channel_axis
        if (outer[-1:] if axis == -1 else outer[:axis + 1]) != \
                (shape[-1:] if axis == -1 else shape[:axis + 1]):
            return value, None  # the reshape moves the channels
        return inner, value.ty.shape

    def _kernel(self, value):
        """``(kernel, its call's tensor arguments)`` when ``value`` calls an int8 kernel."""
        if not (isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_tir"))
                and isinstance(value.args[0], tvm.ir.GlobalVar)):
            return None
        spec = self.kernels.get(value.args[0].name_hint)
        return None if spec is None else (spec, list(value.args[1].fields))

    def _integer_bias(self, expr, out_shape: list[int], channel_axis: int, scale: np.ndarray):
        """The int32 bias per output channel of ``expr`` (a possibly reshaped
        ``dequantize(bq int32, sb, 0)`` broadcast along the channel axis of ``out_shape``,
        with ``sb`` the kernel's ``scale``), else None."""
        shape = [int(d) for d in expr.ty.shape]
        source = expr
        while isinstance(source, relax.Var) or is_call(source, "relax.reshape") or \
                is_call(source, "relax.expand_dims"):
            source = (self.lookup_binding(source) if isinstance(source, relax.Var)
                      else source.args[0])
            if source is None:
                return None
        if not is_call(source, "relax.dequantize"):
            return None
        bq, sb, zb = (constant_value(a) for a in source.args)
        if bq is None or sb is None or zb is None or bq.dtype != np.int32 or bq.ndim > 1 \
                or np.any(zb != 0) or (sb.size != 1 and sb.size != bq.size):
            return None
        channels = out_shape[channel_axis]
        shape = [1] * (len(out_shape) - len(shape)) + shape
        axis = channel_axis % len(out_shape)
        if len(shape) != len(out_shape) or bq.size != int(np.prod(shape)) or \
                any(d != 1 for i, d in enumerate(shape) if i != axis) or \
                shape[axis] not in (1, channels):
            return None
        values = np.broadcast_to(bq.reshape(-1), (channels,))
        scales = np.broadcast_to(np.broadcast_to(sb.reshape(-1), bq.shape).reshape(-1),
                                 (channels,)).astype(np.float32)
        if not np.allclose(scales, scale[:channels], rtol=1e-6, atol=0):
            return None  # a bias scaled otherwise is not the int32 sum's
        return values.astype(np.int64)


@tvm.transform.module_pass(opt_level=0, name="mmcompile.QuantizedContractions")
class QuantizedContractions:
    """QDQ matmul / conv2d -> int8 kernels (see the module docstring), max pools of
    dequantized tensors moved onto the quantized ones (``_Rewriter._max_pool``); ``count``
    and ``pools`` say how many of each were rewritten."""

    def __init__(self, target):
        self.vnni, self.amx = has_vnni(target), has_amx(target)
        self.count = self.pools = self.requantized = self.amx_count = 0

    def transform_module(self, mod, _ctx):
        rewriter = _Rewriter(mod, self.vnni, self.amx)
        mod = rewrite_functions(mod, rewriter)
        self.count, self.pools, self.amx_count = rewriter.count, rewriter.pools, \
            rewriter.amx_count
        if self.count:
            requantizer = _Requantizer(mod, rewriter.kernels)
            mod = rewrite_functions(mod, requantizer)
            self.requantized = requantizer.count
        changed = self.count or self.pools
        return relax.transform.DeadCodeElimination()(mod) if changed else mod
