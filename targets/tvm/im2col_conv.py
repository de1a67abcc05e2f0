"""Relax rewrite: a deep 1-D convolution over a long sequence becomes im2col + one matmul.

A convolution along one axis only (``conv1d``, or ``conv2d`` over a ``[N, C, L, 1]`` or
``[N, C, 1, L]`` input with the kernel 1 wide along the unit axis, or over ``[N, C, H, L]``
with the kernel spanning all ``H`` rows, which fold into the channels), with a deep
reduction, many output channels and a long output, is a GEMM ``[N * Lo, C * k] x [C * k,
F]`` in disguise. Magika (the corpus's file-type classifier, tf2onnx) has one: 256 -> 512 channels,
kernel 5, over 512 positions, 666 MFLOP, 80% of the model's time. The convolution rules
(:mod:`.cpu_conv`, the register-blocked ``conv1d`` schedule) ran it at 13.8-15.4 ms on one
AVX2 core, against onnxruntime's 9.2-9.6 ms (MLAS: NCHWc convolution); our matmul rule
(:class:`~.cpu_matmul.BlockedMatmul`) runs the same GEMM at 9.1-10 ms.

Rewritten as:

- the input viewed as ``[N, C, L]`` (a free reshape), padded along ``L``, transposed to
  ``[N, L, C]`` (where the model produced it channels-last, as Magika does, the two
  transposes fuse away);
- the patch tensor ``[N, Lo, k, C]`` (one TE kernel: element ``[n, i, t, c]`` is
  ``rows[n, i * stride + t * dilation, c]``), viewed as the matrix ``[N, Lo, k * C]``,
  columns ordered (tap, channel). ``k`` strided slices concatenated along the channels
  computed the same matrix, but the concatenation selects its input per element, and
  FuseOps put Magika's layer norm (the convolution's producer) into that kernel once per
  tap: 0.96 ms there, 0.25 ms as one index expression (one thread); whole Magika 1.06x,
  iEEG 1.02-1.04x faster (same-process A/B of saved artifacts, 2 threads);
- ``matmul`` with the weights as a constant ``[k * C, F]`` (which the matmul weight packing
  then lays out for the register tile);
- transposed back to ``[N, F, Lo]`` and reshaped to the convolution's output shape (the
  transpose fuses into whatever elementwise op follows: bias, activation).

Measured (one thread, znver3): the Magika-shaped convolution 14.7 -> 11.2 ms (im2col
0.16 ms, matmul 10.1, the transpose back 0.9 when nothing follows to fuse with). The iEEG
seizure detector's first layer (``[96, 3]`` over ``[20, 96, 59]``: 5760 deep, 200 channels,
59 positions; before, :mod:`.spanning_conv`'s ``conv1d``): 4.8 ms -> 2.65 (matmul) +
0.41 (im2col, a transposing gather), whole model 8.5 -> 6.2 ms.

Taken: float32, constant weights, groups 1, static shapes, a reduction ``C * k`` of at least
``MIN_DEPTH``, at least ``MIN_CHANNELS`` output channels and ``MIN_LENGTH`` output positions
(shallower or shorter convolutions stay with the convolution rules, which win there: no
patch matrix to write); a spanning kernel only without row padding. Spanning
convolutions below these bounds are :mod:`.spanning_conv`'s (it runs after this rewrite).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax import expr_functor

from mmcompile.targets.tvm.rewrite import rewrite_functions, static_shape

MIN_DEPTH = 512  # C * k: the patch matrix (Lo x C * k) must buy a large enough GEMM
MIN_CHANNELS = 128
MIN_LENGTH = 32  # output positions: the iEEG layer's 59 (Magika: 512)


def _conv_axes(call):
    """``(data, weight [F, C, k] as numpy, stride, dilation, (pad_before, pad_after),
    (N, C, L), output shape)`` of a 1-D convolution in disguise, else None."""
    if not isinstance(call.op, tvm.ir.Op) or call.op.name not in ("relax.nn.conv1d",
                                                                  "relax.nn.conv2d"):
        return None
    data, weight = call.args
    attrs = call.attrs
    shape, out_shape = static_shape(data), static_shape(call)
    if (not isinstance(weight, tvm.ir.expr.Constant) or int(attrs.groups) != 1
            or shape is None or out_shape is None or getattr(data.ty, "dtype", "") != "float32"
            or getattr(call.ty, "dtype", "") != "float32"):
        return None
    w = weight.value.numpy()
    if call.op.name == "relax.nn.conv1d":
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCW", "OIW", "NCW"):
            return None
        return (data, w, int(attrs.strides[0]), int(attrs.dilation[0]),
                tuple(int(p) for p in attrs.padding), tuple(shape), out_shape)
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None
    n, c, h, wd = shape
    top, left, bottom, right = (int(p) for p in attrs.padding)
    if wd == 1 and w.shape[3] == 1 and left == right == 0:  # along H
        return (data, w[:, :, :, 0], int(attrs.strides[0]), int(attrs.dilation[0]),
                (top, bottom), (n, c, h), out_shape)
    if h == 1 and w.shape[2] == 1 and top == bottom == 0:  # along W
        return (data, w[:, :, 0, :], int(attrs.strides[1]), int(attrs.dilation[1]),
                (left, right), (n, c, wd), out_shape)
    if w.shape[2] == h and top == bottom == 0 and int(attrs.dilation[0]) == 1:
        # along W, the kernel spanning every row: the rows fold into the channels
        return (data, w.reshape(w.shape[0], c * h, w.shape[3]), int(attrs.strides[1]),
                int(attrs.dilation[1]), (left, right), (n, c * h, wd), out_shape)
    return None


def _patches(rows, length: int, taps: int, stride: int, dilation: int):
    """The patch matrix ``[N, Lo, k, C]`` of channels-last ``rows [N, L, C]``: one index
    expression per element, the channels innermost and contiguous (a concatenation of ``k``
    slices instead selects its input per element, and with the channels folded into one
    axis divides every index by ``C``)."""
    from tvm import te
    n, _, c = rows.shape
    return te.compute((n, length, taps, c),
                      lambda b, i, t, j: rows[b, i * stride + t * dilation, j], name="im2col")


@expr_functor.mutator
class _Im2col(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        found = _conv_axes(call)
        if found is None:
            return call
        data, weight, stride, dilation, (before, after), (n, c, length), out_shape = found
        f, _, k = weight.shape
        lo = (length + before + after - dilation * (k - 1) - 1) // stride + 1
        if c * k < MIN_DEPTH or f < MIN_CHANNELS or lo < MIN_LENGTH:
            return call
        emit = self.builder_.emit
        rows = emit(relax.op.reshape(data, [n, c, length]))
        if before or after:
            rows = emit(relax.op.nn.pad(rows, [0, 0, 0, 0, before, after]))
        rows = emit(relax.op.permute_dims(rows, [0, 2, 1]))  # [N, L, C]
        patches = self.builder_.call_te(_patches, rows, lo, k, stride, dilation,
                                        primfunc_name_hint="im2col")
        patches = emit(relax.op.reshape(patches, [n, lo, k * c]))  # [N, Lo, k*C]
        matrix = np.ascontiguousarray(weight.transpose(2, 1, 0).reshape(k * c, f))
        product = emit(relax.op.matmul(patches, relax.const(matrix)))  # [N, Lo, F]
        out = emit(relax.op.permute_dims(product, [0, 2, 1]))
        return relax.op.reshape(out, out_shape)


@tvm.transform.module_pass(opt_level=0, name="mmcompile.Im2colConvs")
class Im2colConvs:
    """Deep 1-D convolutions over long sequences (``conv1d``, or ``conv2d`` along one axis of
    a unit-height or unit-width input, or with a kernel spanning every row) -> im2col +
    ``matmul`` (see the module docstring)."""

    def transform_module(self, mod, _ctx):
        return rewrite_functions(mod, _Im2col(mod))
