"""Relax rewrite: a transposed convolution whose kernel equals its stride (the 2x2, stride-2
upsampling of segmentation and detection heads) becomes a 1x1 convolution and a
depth-to-space shuffle.

With kernel == stride and no padding, every output pixel receives exactly one input pixel
through one kernel tap: ``out[n, o, y*s + i, x*s + j] = sum_c in[n, c, y, x] W[c, o, i, j]``.
That is a 1x1 convolution to ``O * s * s`` channels (``W`` reordered at compile time) whose
channels are then moved into the spatial grid, an injective reshuffle that ``FuseOps`` fuses
with the bias and activation after it. No schedule rule covers ``conv2d_transpose``: the
generic fallback ran the PaddleOCR detector's two upsampling layers (24 -> 24 and 24 -> 1
channels, 2x2 stride 2, 20.6 M and 3.4 M multiply-adds) in ~40 of its 111 ms; the 1x1
convolution is register-blocked like any other (:mod:`.cpu_conv`).

Taken: ``conv2d_transpose`` with NCHW data and IOHW constant weights, groups 1, dilation 1,
kernel equal to the stride, no padding or output padding, static shapes.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax import expr_functor

from mmcompile.targets.tvm.rewrite import constant_nchw_call, rewrite_functions, static_shape


@expr_functor.mutator
class _Shuffle(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        matched = constant_nchw_call(call, "relax.nn.conv2d_transpose", "IOHW")
        if matched is None:
            return call
        data, weight, attrs = matched
        if (int(attrs.groups) != 1 or any(int(d) != 1 for d in attrs.dilation)
                or any(int(p) for p in attrs.padding)
                or any(int(p) for p in attrs.output_padding)):
            return call
        shape = static_shape(data)
        if shape is None:
            return call
        channels, out_c, kh, kw = (int(d) for d in weight.value.shape)
        sh, sw = (int(s) for s in attrs.strides)
        if (kh, kw) != (sh, sw):
            return call
        batch, _, height, width = shape
        # W'[o * kh * kw + i * kw + j, c] = W[c, o, i, j]
        folded = weight.value.numpy().transpose(1, 2, 3, 0).reshape(out_c * kh * kw, channels,
                                                                    1, 1)
        taps = self.builder_.emit(relax.op.nn.conv2d(
            data, relax.const(np.ascontiguousarray(folded)), out_dtype=attrs.out_dtype))
        grid = self.builder_.emit(relax.op.reshape(taps, [batch, out_c, kh, kw, height, width]))
        moved = self.builder_.emit(relax.op.permute_dims(grid, [0, 1, 4, 2, 5, 3]))
        return relax.op.reshape(moved, [batch, out_c, height * kh, width * kw])


@tvm.transform.module_pass(opt_level=0, name="mmcompile.ShuffleTransposedConvs")
class ShuffleTransposedConvs:
    """``conv2d_transpose`` with kernel == stride and no padding -> 1x1 ``conv2d`` +
    depth-to-space."""

    def transform_module(self, mod, _ctx):
        return rewrite_functions(mod, _Shuffle(mod))
