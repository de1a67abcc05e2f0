"""Relax rewrite: a shallow 1x1 convolution over NCHW maps becomes a 1-D convolution over the
flattened pixels (``[N, C, H, W] -> [N, C, H * W]``, a free reshape, and back).

A 1x1 convolution with a reduction shorter than
:data:`~.cpu_matmul.WEIGHT_VECTOR_MIN_DEPTH` keeps its output width as the vector axis
(:func:`~.cpu_matmul._vector_axis`: along the channels, each tile would be written back to
NCHW with strided stores that so few multiply-adds do not pay for). Its register tile is
then as wide as one row allows: a 40-pixel row is 5 AVX2 vectors, an odd count, so tiles
are one vector wide and each vector load feeds a weight broadcast per FMA (9 loads per 8
FMAs), and a 20-pixel row splits into 5-lane vectors. For a 1x1 convolution without padding
or stride the pixels of one channel are contiguous, so the rows can be one axis of
``H * W`` pixels: whole tiles two vectors wide (2 loads and 6 broadcasts per 12 FMAs on
AVX2). MobileNetV3's expansion convolutions (16 -> 72 channels on 40x40 maps, 24 -> 96 on
20x20) are of this kind. The elementwise ops after the convolution (bias, activation, a
squeeze-excitation gate) are computed on the flattened output and the reshape back moved
after them (:data:`SINKS`), so that they stay in the convolution's kernel.

Measured in mobilenet_text at batch 8, 1 thread, AVX2 (znver3), kernel times: 16 -> 72 on
40x40 with its ReLU 1037 -> 410 us (onnxruntime's 461), 24 -> 96 on 20x20 with HardSwish
336 -> 221 us, 24 -> 88 350 -> 195 us; the whole model 0.95x (1 thread), 0.97x (2 threads),
same-process A/B.

Taken: ``conv2d`` with NCHW data and OIHW constant weights, groups 1, a 1x1 kernel, stride 1,
no padding, static shapes, more than one row, ``H * W`` a multiple of the vector, and either a
reduction shallower than ``WEIGHT_VECTOR_MIN_DEPTH`` with ``W`` not a multiple of two vectors
(whose tiles are already two vectors wide), or a deeper one whose output channels are no whole
vectors and ``W`` no whole vectors. The deep ones would vectorize the output rows padded to
whole vectors, with the input copied padded first: mobilenet_text's 88 -> 24 and 72 -> 24 on
20x20 (AVX-512) padded each row of 20 to 32 and ran 41 / 33 us on 1 or 2 threads alike; over
the 400 pixels 22 / 18 us on one thread, 13 / 6 on two. Whole model (same-process A/B, 2
threads, outputs identical): batch 1 0.979x, batch 8 0.951x; yolo-audio 0.999x.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax import expr_functor

from mmcompile.targets.tvm.cpu_matmul import WEIGHT_VECTOR_MIN_DEPTH
from mmcompile.targets.tvm.rewrite import constant_nchw_call, rewrite_functions, static_shape


def flattens(shape: list[int], depth: int, lanes: int, out_channels: int = 0) -> bool:
    """Whether a 1x1 convolution over NCHW ``shape`` with a reduction of ``depth`` (into
    ``out_channels``) is taken: a shallow one, or a deep one whose output channels fill no
    vector (so the vectors run along the rows, padded to whole vectors: mobilenet_text's
    88 -> 24 on 20x20 padded each row of 20 to 32, and copied its input to do so)."""
    _, _, height, width = shape
    if height <= 1 or (height * width) % lanes:
        return False
    if depth < WEIGHT_VECTOR_MIN_DEPTH:
        return width % (2 * lanes) != 0
    return out_channels % lanes != 0 and width % lanes != 0


# Elementwise ops that the reshape back to NCHW sinks through (their operands: flattened
# outputs of one shape, constants constant along H and W, attributes), so that the bias and
# activation fuse into the 1-D convolution's kernel: FuseOps fuses only elementwise and
# broadcast ops into a convolution, not a reshape, and a separate reshape + bias +
# activation pass over the whole output cost a third of the convolution (16 -> 72 on 40x40,
# batch 8, 1 thread, AVX2: 435 + 218 us).
SINKS = frozenset(f"relax.{name}" for name in (
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "clip", "nn.relu",
    "nn.relu6", "nn.silu", "nn.gelu", "sigmoid", "tanh"))


@expr_functor.mutator
class _Flatten(relax.PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.flattened = set()  # the [N, C, H * W] tensors this rewrite made

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name in SINKS:
            sunk = self._sunk(call)
            return call if sunk is None else sunk
        matched = constant_nchw_call(call, "relax.nn.conv2d", "OIHW")
        if matched is None:
            return call
        data, weight, attrs = matched
        shape, out_shape = static_shape(data), static_shape(call)
        if shape is None or out_shape is None:
            return call
        out_c, per_group, kh, kw = (int(d) for d in weight.value.shape)
        groups = int(attrs.groups)
        if groups == 1 and (kh, kw) == (1, 1) and all(int(s) == 1 for s in attrs.strides) \
                and not any(int(p) for p in attrs.padding) and flattens(shape, per_group,
                                                                        self.lanes, out_c):
            batch, _, height, width = shape
            pixels = self.builder_.emit(relax.op.reshape(data, [batch, per_group,
                                                               height * width]))
            kernel = relax.const(weight.value.numpy().reshape(out_c, per_group, 1))
            conv = self.builder_.emit(relax.op.nn.conv1d(
                pixels, kernel, data_layout="NCW", kernel_layout="OIW", out_layout="NCW",
                out_dtype=attrs.out_dtype))
            self.flattened.add(conv)
            return relax.op.reshape(conv, out_shape)
        return call

    def _flat(self, arg):
        """The flattened ``[N, C, H * W]`` tensor (made here) that ``arg`` is a reshape back
        to NCHW of, else None."""
        value = self.builder_.lookup_binding(arg) if isinstance(arg, relax.Var) else None
        while isinstance(value, relax.Var):
            arg, value = value, self.builder_.lookup_binding(value)
        if (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
                and value.op.name == "relax.reshape" and value.args[0] in self.flattened):
            return value.args[0]
        return None

    def _sunk(self, call):
        """``call`` (elementwise) computed on the flattened tensors and reshaped back after
        it, or None when an operand is neither flattened (all to one shape) nor constant
        along H and W (a bias, a squeeze-excitation gate, a scalar)."""
        tensors = [isinstance(getattr(a, "ty", None), relax.TensorType) for a in call.args]
        flats = [self._flat(a) if t else None for a, t in zip(call.args, tensors)]
        found = [(f, static_shape(a)) for f, a in zip(flats, call.args) if f is not None]
        if not found or any(static_shape(f) != static_shape(found[0][0]) for f, _ in found):
            return None
        flat, shape = found[0]
        args = []
        for arg, is_tensor, inner in zip(call.args, tensors, flats):
            dims = static_shape(arg) if is_tensor and inner is None else None
            if inner is not None:
                args.append(inner)
            elif not is_tensor or dims == []:  # a PrimValue (clip's bounds), a scalar
                args.append(arg)
            elif dims is None or len(dims) > 4:
                return None
            else:
                dims = [1] * (4 - len(dims)) + dims
                if dims[2:] != [1, 1]:
                    return None  # varies along H or W
                args.append(self.builder_.emit(relax.op.reshape(arg, dims[:2] + [1])))
        inner = self.builder_.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
        if static_shape(inner) != static_shape(flat):  # broadcast grew it: not elementwise
            return None
        self.flattened.add(inner)
        return relax.op.reshape(inner, shape)


@tvm.transform.module_pass(opt_level=0, name="mmcompile.FlatPointwiseConvs")
class FlatPointwiseConvs:
    """Shallow 1x1 convolutions over NCHW maps (see the module docstring) -> ``conv1d`` over
    the flattened pixels, for vectors of ``lanes`` float32, with the elementwise ops after them
    computed before the reshape back (:data:`SINKS`)."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod, _ctx):
        mod = rewrite_functions(mod, _Flatten(mod, self.lanes))
        return relax.transform.DeadCodeElimination()(mod)  # the reshapes sunk past
