"""Relax rewrite: depthwise convolutions on narrow maps, vectorized across channels.

A depthwise convolution (``groups == channels``, one filter per channel) in NCHW can only be
vectorized along the output width, with every weight broadcast. MobileNet-style backbones
end in maps too narrow for that: CenterFace's last stages are 2x2 and 1x1 maps of 384-960
channels, where the register-blocked rule declines (a width under 4) and dlight's generic
reduction rule ran them unvectorized: ~100 us of CPU for the 138 K multiply-adds of a
384-channel 2x2 layer, 4 % of the model's time for 0.3 % of its work.

Here such a convolution reads a channels-last copy of its zero-padded input (``[N, H, W, C]``,
made inside the same kernel, where the padding was made anyway) and weights packed as
``[KH, KW, C]`` at compile time, so every operand is contiguous along the channels and the
register-blocked rule (:mod:`.cpu_matmul`) vectorizes them; the output stays NCHW (its
write-back stores each channel vector with a stride), so nothing else in the graph changes.

Taken: ``conv2d`` with NCHW data and output, OIHW constant float32 weights of one input
channel per group and as many groups as channels, static shapes, channels a multiple of 8,
and an output width under 4. Wider maps keep the NCHW form: the channels-last copy of the
input costs a transposing pass over it, which made 8x8 maps (stride 1) and a stride-2 16x16
one slower (CenterFace, per-kernel samples with ``perf``: 1.5 -> 2.4 % and 3.7 -> 8.3 %),
while 2x2 and 1x1 maps gained (4.9 -> 2.0 %, 2.7 -> 0.6 %).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.relax import expr_functor

from mmcompile.targets.tvm.rewrite import constant_nchw_call, rewrite_functions, static_shape

# Channels must fill whole vectors of at least this many lanes (AVX2's 8 floats).
MIN_LANES = 8
# Output widths below this take the channels-last form (the blocked rule's NCHW schedule
# declines them: :func:`.cpu_matmul.BlockedMatmul`, ``width < 4``).
NARROW = 4


def _depthwise_channels_last(data, weights, strides, padding, dilation):
    """``data [N, C, H, W]`` (NCHW) with ``weights [KH, KW, C]``: an NCHW output computed
    from a padded ``[N, H', W', C]`` copy of the data."""
    batch, channels, height, width = (int(d) for d in data.shape)
    kh_, kw_, _ = (int(d) for d in weights.shape)
    top, left, bottom, right = padding
    (sh, sw), (dh, dw) = strides, dilation
    padded_h, padded_w = height + top + bottom, width + left + right
    zero = tirx.const(0, data.dtype)

    def padded(n, h, w, c):
        inside = tirx.all(h >= top, h < top + height, w >= left, w < left + width)
        return tirx.if_then_else(inside, data[n, c, h - top, w - left], zero)

    pad = te.compute((batch, padded_h, padded_w, channels), padded, name="pad_channels_last")
    out_h = (padded_h - dh * (kh_ - 1) - 1) // sh + 1
    out_w = (padded_w - dw * (kw_ - 1) - 1) // sw + 1
    kh = te.reduce_axis((0, kh_), "kh")
    kw = te.reduce_axis((0, kw_), "kw")
    return te.compute(
        (batch, channels, out_h, out_w),
        lambda n, c, h, w: te.sum(pad[n, h * sh + kh * dh, w * sw + kw * dw, c]
                                  * weights[kh, kw, c], axis=[kh, kw]),
        name="depthwise_conv2d")


@expr_functor.mutator
class _ChannelsLast(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        matched = constant_nchw_call(call, "relax.nn.conv2d", "OIHW")
        if matched is None:
            return call
        data, weight, attrs = matched
        shape = static_shape(data)
        out = static_shape(call)
        if (shape is None or out is None or str(weight.value.dtype) != "float32"
                or str(data.ty.dtype) != "float32" or str(call.ty.dtype) != "float32"):
            return call
        channels = shape[1]
        filters, per_group, kh, kw = (int(d) for d in weight.value.shape)
        strides = tuple(int(s) for s in attrs.strides)
        if (int(attrs.groups) != channels or filters != channels or per_group != 1
                or channels % MIN_LANES):
            return call
        if out[3] >= NARROW:
            return call
        packed = np.ascontiguousarray(weight.value.numpy().reshape(channels, kh, kw)
                                      .transpose(1, 2, 0))
        return self.builder_.call_te(
            _depthwise_channels_last, data, relax.const(packed), strides=strides,
            padding=tuple(int(p) for p in attrs.padding),
            dilation=tuple(int(d) for d in attrs.dilation),
            primfunc_name_hint="depthwise_conv2d")


@tvm.transform.module_pass(opt_level=0, name="mmcompile.ChannelsLastDepthwise")
class ChannelsLastDepthwise:
    """Depthwise NCHW convolutions on narrow maps read channels-last copies of their inputs
    and ``[KH, KW, C]`` weights (see the module docstring)."""

    def transform_module(self, mod, _ctx):
        return rewrite_functions(mod, _ChannelsLast(mod))
