"""Relax rewrite: a convolution whose kernel spans the whole input height becomes a 1-D
convolution over the rows folded into channels, its width padded to whole vectors.

Audio and sensor models often start with a 2-D convolution whose kernel covers every
frequency bin or electrode row of a spectrogram (``[96, 3]`` over ``[20, 96, 59]`` in the
iEEG seizure detector of the corpus), so the output has one row: it is a 1-D convolution
with a deep reduction (20 x 96 x 3 = 5760) over few output pixels (59). The 2-D rules
(:mod:`.cpu_conv`, :class:`~.cpu_matmul.BlockedMatmul`) tile output rows and vectorize
output channels or columns; with one row, 200 output channels (not a multiple of the vector)
and 59 columns (prime), no tile fit and the kernel took 5.7 ms against onnxruntime's 1.3
(im2col + MLAS GEMM). As ``conv1d`` over ``[N, C * KH, W]`` (a free reshape) with the
output width padded to a multiple of 16, the register-blocked schedule vectorizes the
columns and blocks 8 output channels per tile, with no im2col copy; the padding columns
are cut off by the elementwise kernel that adds the bias.

Where the reduction is deep enough for a GEMM (the iEEG layer itself: 5760 deep, 200
channels), :mod:`.im2col_conv` runs first and takes it: on AVX2 the matmul is 1.8x faster
than this ``conv1d`` (4.8 -> 2.65 ms, one thread); this rewrite keeps the shallower ones.

Taken: ``conv2d`` with NCHW data and OIHW constant weights, groups 1, row dilation 1,
static shapes, one output row at least 8 wide (narrower ones would be mostly padding:
the 1 x 1 convolutions of squeeze-excitation blocks stay), a reduction of at least
``MIN_DEPTH``.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import expr_functor

from mmcompile.targets.tvm.rewrite import constant_nchw_call, rewrite_functions, static_shape

# Shallower reductions stay 2-D convolutions: the conv rules handle them.
MIN_DEPTH = 256
# The output width is padded to a multiple of this (AVX-512's 16 lanes; two AVX2 vectors).
WIDTH_STEP = 16


@expr_functor.mutator
class _Spanning(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        matched = constant_nchw_call(call, "relax.nn.conv2d", "OIHW")
        if matched is None:
            return call
        data, weight, attrs = matched
        if int(attrs.groups) != 1 or int(attrs.dilation[0]) != 1:
            return call
        shape, out_shape = static_shape(data), static_shape(call)
        if shape is None or out_shape is None:
            return call
        batch, channels, height, width = shape
        out_c, _, kh, kw = (int(d) for d in weight.value.shape)
        oh, ow = out_shape[2], out_shape[3]
        top, left, bottom, right = (int(p) for p in attrs.padding)
        stride, dilation = int(attrs.strides[1]), int(attrs.dilation[1])
        if (oh != 1 or ow < WIDTH_STEP // 2 or kh != height + top + bottom
                or channels * kh * kw < MIN_DEPTH):
            return call
        wide = -(-ow // WIDTH_STEP) * WIDTH_STEP
        extra = (wide - 1) * stride + dilation * (kw - 1) + 1 - (width + left + right)
        data = self.builder_.emit(relax.op.nn.pad(
            data, [0, 0, 0, 0, top, bottom, left, right + max(extra, 0)]))
        rows = self.builder_.emit(relax.op.reshape(
            data, [batch, channels * kh, width + left + right + max(extra, 0)]))
        folded = relax.const(weight.value.numpy().reshape(out_c, channels * kh, kw))
        conv = self.builder_.emit(relax.op.nn.conv1d(
            rows, folded, strides=[stride], dilation=[dilation], data_layout="NCW",
            kernel_layout="OIW", out_layout="NCW", out_dtype=attrs.out_dtype))
        if wide != ow:
            conv = self.builder_.emit(relax.op.strided_slice(conv, axes=[2], begin=[0],
                                                             end=[ow]))
        return relax.op.reshape(conv, out_shape)


@tvm.transform.module_pass(opt_level=0, name="mmcompile.SpanningConvs")
class SpanningConvs:
    """Convolutions whose kernel spans the (padded) input height, one output row, with a
    reduction of at least ``MIN_DEPTH`` -> ``conv1d`` over rows folded into channels."""

    def transform_module(self, mod, _ctx):
        return rewrite_functions(mod, _Spanning(mod))
