"""The quantized layers the accelerator runs, and their int8 reference semantics.

A layer is what the importer (an ONNX QDQ ``DequantizeLinear -> Conv/MatMul/Gemm ->
[Relu/Clip] -> QuantizeLinear`` pattern) hands the tiler: an int8 or uint8 input with a
per-tensor scale and zero point, int8 weights quantized symmetrically per output channel
(zero point 0), an int32 bias whose scale is ``sx * sw[n]``, and the output's scale and
zero point. :func:`reference` is the semantics every stream must reproduce bit for bit:

    acc[m, n] = sum_k (xq[m, k] - zx) * wq[k, n] + bias[n]                    (exact, int32)
    q[m, n]   = clamp(rint(float32(acc[m, n]) * M[n]) + zy, lo, hi)
    M[n]      = float32(float32(sx * sw[n]) / sy)                             (float32 math)

``rint`` rounds half to even; ``lo``/``hi`` are the output type's range, narrowed by a ReLU
(``lo >= zy``, the quantized zero) or a Clip (``Q(min)``, ``Q(max)``: quantization is
monotonic, so clamping before or after it gives the same integer).

This is what onnxruntime's int8 kernels compute (``QLinearConv``, ``QGemm`` and
``QLinearMatMul`` requantize through MLAS's ``MlasRequantizeOutput``: the int32 sum with the
bias added, times one float32 multiplier per channel, rounded to nearest even) and what
onnxruntime produces for a QDQ graph when its optimizer fuses the pattern into those kernels.
Where it does not fuse (different input and output types, a float Relu left between the
contraction and the QuantizeLinear, int8 Conv on x86), onnxruntime evaluates the QDQ graph in
float: a float32 convolution of dequantized values, then ``QuantizeLinear``. That sum is not
exact, and an element whose exact value lies within float32 rounding of a half step can
land on the other integer (about one element in a few thousand, never by more than one).

:class:`QPool` (a max pool, or a ReLU between two quantizations) sums nothing: its window
maximum and rescale reproduce the float QDQ evaluation exactly (its docstring says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmcompile.errors import MMCompileError

ACTIVATION_TYPES = ("uint8", "int8")


class LayerError(MMCompileError):
    """A quantized layer description is inconsistent (shapes, types, quantization)."""


@dataclass(frozen=True)
class QParams:
    """Per-tensor quantization of an activation: ``real = (q - zero_point) * scale``."""

    scale: float
    zero_point: int
    dtype: str  # "uint8" | "int8"

    def check(self, what: str, layer: str) -> None:
        if self.dtype not in ACTIVATION_TYPES:
            raise LayerError(f"layer '{layer}': {what} type must be uint8 or int8, "
                             f"got {self.dtype!r}")
        info = np.iinfo(self.dtype)
        if not info.min <= int(self.zero_point) <= info.max:
            raise LayerError(f"layer '{layer}': {what} zero point {self.zero_point} is outside "
                             f"{self.dtype}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise LayerError(f"layer '{layer}': {what} scale must be positive, got {self.scale}")

    def quantize(self, value: float) -> int:
        """``QuantizeLinear`` of one float (float32 division, round half to even, saturate)."""
        info = np.iinfo(self.dtype)
        q = np.rint(np.float32(value) / np.float32(self.scale)) + self.zero_point
        return int(np.clip(q, info.min, info.max))


def clamp_range(y: QParams, activation: str | None,
                clip: tuple[float | None, float | None] = (None, None)) -> tuple[int, int]:
    """The output type's range, narrowed by a ReLU (``lo >= zy``) or a Clip (its bounds
    quantized)."""
    info = np.iinfo(y.dtype)
    lo, hi = int(info.min), int(info.max)
    if activation == "relu":
        lo = max(lo, int(y.zero_point))
    elif activation == "clip":
        low, high = clip
        if low is not None:
            lo = max(lo, y.quantize(low))
        if high is not None:
            hi = min(hi, y.quantize(high))
    return lo, hi


@dataclass(frozen=True, eq=False)
class _Quantized:
    """What every quantized contraction has: weights, bias, scales and the epilogue."""

    name: str
    weight: np.ndarray          # int8; [K, N] for a GEMM, [F, C, kh, kw] for a convolution
    w_scale: np.ndarray         # float32 [N] (a scalar is broadcast)
    x: QParams
    y: QParams
    bias: np.ndarray | None = None          # int32 [N], scale sx * sw[n]
    activation: str | None = None           # None | "relu" | "clip"
    clip: tuple[float | None, float | None] = (None, None)  # Clip's min/max (float domain)

    @property
    def channels(self) -> int:
        raise NotImplementedError

    def output_range(self) -> tuple[int, int]:
        """The clamp of the requantization: the output type's range, narrowed by the
        activation."""
        return clamp_range(self.y, self.activation, self.clip)

    def multiplier(self) -> np.ndarray:
        """float32 ``(sx * sw[n]) / sy`` per output channel, as onnxruntime computes it."""
        sw = np.broadcast_to(np.asarray(self.w_scale, np.float32), (self.channels,))
        return ((np.float32(self.x.scale) * sw).astype(np.float32)
                / np.float32(self.y.scale)).astype(np.float32)

    @property
    def label(self) -> str:
        """The layer's shape for reports: ``GEMM MxKxN``."""
        return "GEMM " + "x".join(map(str, self.gemm_shape))

    def bias_or_zeros(self) -> np.ndarray:
        if self.bias is None:
            return np.zeros(self.channels, np.int32)
        return np.asarray(self.bias, np.int32).reshape(self.channels)

    def _check_common(self) -> None:
        self.x.check("input", self.name)
        self.y.check("output", self.name)
        if self.weight.dtype != np.int8:
            raise LayerError(f"layer '{self.name}': weights must be int8, got {self.weight.dtype}")
        sw = np.asarray(self.w_scale, np.float32)
        if sw.ndim > 1 or (sw.ndim == 1 and sw.shape[0] not in (1, self.channels)):
            raise LayerError(f"layer '{self.name}': weight scale has shape {sw.shape}, "
                             f"expected one per output channel ({self.channels})")
        if not (np.all(np.isfinite(sw)) and np.all(sw > 0)):
            raise LayerError(f"layer '{self.name}': weight scales must be positive")
        if self.bias is not None:
            b = np.asarray(self.bias)
            if b.dtype != np.int32 or b.size != self.channels:
                raise LayerError(f"layer '{self.name}': bias must be int32 [{self.channels}], "
                                 f"got {b.dtype} {list(b.shape)}")
        if self.activation not in (None, "relu", "clip"):
            raise LayerError(f"layer '{self.name}': unknown activation {self.activation!r}")


@dataclass(frozen=True, eq=False)
class QGemm(_Quantized):
    """``y = requantize(x @ W + bias)`` on the last axis: ONNX MatMul (any leading dims) and
    Gemm (2-D; give ``W`` as [K, N], i.e. transposed when ``transB=1``).

    Attributes:
        input_shape: the input's shape, ``(..., K)``; the leading dims are the GEMM's M.
        weight: int8 [K, N].
    """

    input_shape: tuple[int, ...] = field(default=())
    op_type: str = "MatMul"  # or "Gemm": what the spec's ops must list

    def __post_init__(self) -> None:
        if self.op_type not in ("MatMul", "Gemm"):
            raise LayerError(f"layer '{self.name}': a GEMM layer is a MatMul or a Gemm, not "
                             f"{self.op_type!r}")
        if self.weight.ndim != 2:
            raise LayerError(f"layer '{self.name}': GEMM weights must be [K, N], got "
                             f"{list(self.weight.shape)}")
        if len(self.input_shape) < 1 or self.input_shape[-1] != self.weight.shape[0] \
                or any(int(d) <= 0 for d in self.input_shape):
            raise LayerError(f"layer '{self.name}': input shape {list(self.input_shape)} does "
                             f"not end in K={self.weight.shape[0]}")
        self._check_common()

    kind = "gemm"

    @property
    def channels(self) -> int:
        return int(self.weight.shape[1])

    @property
    def gemm_shape(self) -> tuple[int, int, int]:
        """``(M, K, N)`` of the GEMM the layer is."""
        return (int(np.prod(self.input_shape[:-1], dtype=np.int64)), *map(int, self.weight.shape))

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (*self.input_shape[:-1], self.channels)

    def weight_matrix(self) -> np.ndarray:
        return np.ascontiguousarray(self.weight)


@dataclass(frozen=True, eq=False)
class QConv2d(_Quantized):
    """A 2-D convolution, NCHW input, OIHW int8 weights, lowered as a GEMM over im2col rows.

    Attributes:
        input_shape: ``(N, C, H, W)``.
        strides, dilations: ``(h, w)``.
        pads: ONNX order ``(top, left, bottom, right)``.
        groups: 1 for a dense convolution (others are described so that ``supports`` can
            refuse them by name).
    """

    input_shape: tuple[int, int, int, int] = field(default=(1, 1, 1, 1))
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    groups: int = 1

    kind = "conv2d"
    op_type = "Conv"

    def __post_init__(self) -> None:
        if self.weight.ndim != 4 or len(self.input_shape) != 4:
            raise LayerError(f"layer '{self.name}': a 2-D convolution needs an NCHW input and "
                             f"OIHW weights, got {list(self.input_shape)} and "
                             f"{list(self.weight.shape)}")
        _, c, h, w = self.input_shape
        if self.groups < 1 or c % self.groups or self.weight.shape[1] * self.groups != c:
            raise LayerError(f"layer '{self.name}': {c} input channels do not match weights "
                             f"{list(self.weight.shape)} with groups={self.groups}")
        if min(*self.strides, *self.dilations) < 1 or min(self.pads) < 0:
            raise LayerError(f"layer '{self.name}': strides and dilations must be >= 1 and "
                             f"pads >= 0")
        oh, ow = self.output_hw
        if oh <= 0 or ow <= 0:
            raise LayerError(f"layer '{self.name}': the kernel does not fit the padded input "
                             f"{h}x{w}")
        self._check_common()

    @property
    def channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def kernel(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    @property
    def output_hw(self) -> tuple[int, int]:
        _, _, h, w = self.input_shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        top, left, bottom, right = self.pads
        return ((h + top + bottom - dh * (kh - 1) - 1) // sh + 1,
                (w + left + right - dw * (kw - 1) - 1) // sw + 1)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.input_shape[0], self.channels, *self.output_hw)

    @property
    def gemm_shape(self) -> tuple[int, int, int]:
        """``(M, K, N)`` of the im2col GEMM: output pixels, C/groups*kh*kw, filters."""
        oh, ow = self.output_hw
        return (self.input_shape[0] * oh * ow, int(np.prod(self.weight.shape[1:])),
                self.channels)

    def weight_matrix(self) -> np.ndarray:
        """[K, N] with K ordered (c, kh, kw), the order :func:`im2col` lays columns in."""
        return np.ascontiguousarray(self.weight.reshape(self.channels, -1).T)


@dataclass(frozen=True, eq=False)
class QPool:
    """Max pooling of a quantized tensor: ONNX's ``DequantizeLinear -> [Relu] -> MaxPool ->
    [Relu] -> QuantizeLinear`` (1-D pools as 2-D ones with a height of 1); with ``op_type``
    ``Relu`` and a 1x1 window, a ReLU between two quantizations (``DequantizeLinear -> Relu
    -> QuantizeLinear``, any shape, viewed as ``[1, size, 1, 1]``). Its semantics::

        m[n, c, i, j] = max over the window of xq           (padding never wins: dtype min)
        q[n, c, i, j] = clamp(rint(float32(float32(m - zx) * sx) / sy) + zy, lo, hi)

    Exactly the float QDQ evaluation: dequantizing, ReLU and the quantization are each
    non-decreasing, so they commute with the max, and the rescale is the graph's own
    ``DequantizeLinear`` (``(q - zx) * sx`` in float32) followed by its ``QuantizeLinear``
    (float32 division, round half to even, saturate); a ReLU narrows ``lo`` to ``zy``.

    Attributes:
        input_shape: ``(N, C, H, W)``.
        kernel, strides, dilations: ``(h, w)``.
        pads: ONNX order ``(top, left, bottom, right)``, each below the kernel's extent.
    """

    name: str
    x: QParams
    y: QParams
    input_shape: tuple[int, int, int, int]
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    activation: str | None = None  # None | "relu"
    op_type: str = "MaxPool"  # or "Relu" (a 1x1 window)

    groups = 1  # each channel pooled on its own: the pattern :func:`im2col` gathers

    def __post_init__(self) -> None:
        self.x.check("input", self.name)
        self.y.check("output", self.name)
        if len(self.input_shape) != 4 or any(int(d) <= 0 for d in self.input_shape):
            raise LayerError(f"layer '{self.name}': a pool needs an NCHW input, got "
                             f"{list(self.input_shape)}")
        if min(*self.kernel, *self.strides, *self.dilations) < 1 or min(self.pads) < 0:
            raise LayerError(f"layer '{self.name}': kernel, strides and dilations must be "
                             f">= 1 and pads >= 0")
        extent = [d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilations)]
        if any(p >= e for p, e in zip(self.pads, extent * 2)):
            raise LayerError(f"layer '{self.name}': pads {list(self.pads)} must be smaller "
                             f"than the window {extent} (a window of padding alone has no "
                             f"maximum)")
        oh, ow = self.output_hw
        if oh <= 0 or ow <= 0:
            raise LayerError(f"layer '{self.name}': the window does not fit the padded input")
        if self.activation not in (None, "relu"):
            raise LayerError(f"layer '{self.name}': unknown activation {self.activation!r}")
        if self.op_type not in ("MaxPool", "Relu") or self.op_type == "Relu" and (
                self.window != 1 or self.activation != "relu"):
            raise LayerError(f"layer '{self.name}': a pool layer is a MaxPool or a ReLU (a 1x1 "
                             f"window with activation 'relu'), not {self.op_type!r}")

    @property
    def kind(self) -> str:
        return "maxpool" if self.op_type == "MaxPool" else "relu"

    @property
    def channels(self) -> int:
        return int(self.input_shape[1])

    @property
    def window(self) -> int:
        return int(self.kernel[0] * self.kernel[1])

    output_hw = QConv2d.output_hw

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.input_shape[0], self.channels, *self.output_hw)

    @property
    def pool_shape(self) -> tuple[int, int, int]:
        """``(M, window, C)``: output pixels, window elements, channels."""
        oh, ow = self.output_hw
        return self.input_shape[0] * oh * ow, self.window, self.channels

    @property
    def label(self) -> str:
        """The layer's shape for reports: ``pool MxWxC`` (output pixels, window, channels),
        or ``relu N`` (elements)."""
        if self.op_type == "Relu":
            return f"relu {int(np.prod(self.input_shape))}"
        return "pool " + "x".join(map(str, self.pool_shape))

    def pad_value(self) -> int:
        """What padding reads: the input type's minimum, which no window's maximum is."""
        return int(np.iinfo(self.x.dtype).min)

    def output_range(self) -> tuple[int, int]:
        return clamp_range(self.y, self.activation)

    def rescale(self, m: np.ndarray) -> np.ndarray:
        """Window maxima (int) -> the output type, by the rule in the class docstring."""
        lo, hi = self.output_range()
        real = (m.astype(np.int32) - np.int32(self.x.zero_point)).astype(np.float32) \
            * np.float32(self.x.scale)
        q = np.rint(real.astype(np.float32) / np.float32(self.y.scale))
        q = np.clip(q, lo - self.y.zero_point, hi - self.y.zero_point)
        return (q.astype(np.int32) + self.y.zero_point).astype(self.y.dtype)


Layer = QGemm | QConv2d | QPool


def im2col(x: np.ndarray, layer: QConv2d | QPool, pad_value: int) -> np.ndarray:
    """``x`` [N, C, H, W] as the [N*Ho*Wo, C*kh*kw] patch matrix (rows (n, oh, ow), columns
    (c, kh, kw)), padded with ``pad_value`` (the input's zero point, so padding adds
    nothing to the sum once the zero point is taken off)."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
    top, left, bottom, right = layer.pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)),
                    constant_values=np.asarray(pad_value, x.dtype))
    windows = np.lib.stride_tricks.sliding_window_view(
        padded, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    oh, ow = layer.output_hw
    windows = windows[:, :, :oh * sh:sh, :ow * sw:sw, ::dh, ::dw]  # [N, C, Ho, Wo, kh, kw]
    return np.ascontiguousarray(windows.transpose(0, 2, 3, 1, 4, 5)).reshape(
        x.shape[0] * oh * ow, -1)


def pool(layer: QPool, xq: np.ndarray) -> np.ndarray:
    """The window maxima as an [M, C] matrix (rows (n, oh, ow))."""
    patches = im2col(xq, layer, layer.pad_value())
    return patches.reshape(patches.shape[0], layer.channels, layer.window).max(axis=2)


def accumulate(layer: Layer, xq: np.ndarray) -> np.ndarray:
    """The exact int64 sums ``sum (xq - zx) * w + bias`` as an [M, N] matrix."""
    if isinstance(layer, QConv2d) and layer.groups != 1:
        raise LayerError(f"layer '{layer.name}': the reference covers dense convolutions "
                         f"(groups=1), not groups={layer.groups}")
    zx = int(layer.x.zero_point)
    rows = (im2col(xq, layer, zx) if isinstance(layer, QConv2d)
            else xq.reshape(-1, layer.weight.shape[0]))
    # float64 BLAS is exact here: |(x - zx) * w| < 2^16 and K < 2^37 keeps every partial sum
    # an integer below 2^53.
    acc = (rows.astype(np.float64) - zx) @ layer.weight_matrix().astype(np.float64)
    return acc.astype(np.int64) + layer.bias_or_zeros().astype(np.int64)


def requantize(acc: np.ndarray, layer: Layer) -> np.ndarray:
    """int32 sums [M, N] -> the output type, by the rule in the module docstring."""
    lo, hi = layer.output_range()
    value = np.rint(acc.astype(np.int32).astype(np.float32) * layer.multiplier())
    return np.clip(value + np.float32(layer.y.zero_point), lo, hi).astype(layer.y.dtype)


def reference(layer: Layer, xq: np.ndarray) -> np.ndarray:
    """The layer's int8 output for quantized input ``xq``, in the layer's own layout
    (NCHW for a convolution): the semantics the simulator must match exactly.

    Raises:
        LayerError: ``xq`` has the wrong shape or type.
    """
    check_input(layer, xq)
    if isinstance(layer, QPool):
        out = layer.rescale(pool(layer, xq))
    else:
        out = requantize(accumulate(layer, xq), layer)
    if isinstance(layer, (QConv2d, QPool)):
        n, f, oh, ow = layer.output_shape
        return np.ascontiguousarray(out.reshape(n, oh, ow, f).transpose(0, 3, 1, 2))
    return out.reshape(layer.output_shape)


def check_input(layer: Layer, xq: np.ndarray) -> None:
    """Raises LayerError unless ``xq`` is the layer's quantized input (shape and type)."""
    if tuple(xq.shape) != tuple(layer.input_shape) or xq.dtype != np.dtype(layer.x.dtype):
        raise LayerError(f"layer '{layer.name}': input must be {layer.x.dtype} "
                         f"{list(layer.input_shape)}, got {xq.dtype} {list(xq.shape)}")
