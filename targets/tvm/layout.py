"""Relax rewrite: convolution weights pre-packed with the output channel innermost.

ONNX convolutions keep their weights as ``OIHW`` (``OIW``). With that layout a kernel can only
vectorize along the output width, which loses twice on small multimodal CNNs: a stride-2
convolution reads its input with stride 2 along that axis (gathers), and widths such as 28 or
24 are not a multiple of the vector length (predicated tails). Packing constant weights as
``HWIO`` (``WIO``) at compile time makes the output channels contiguous, so the register-blocked
schedule (:mod:`.cpu_matmul`) can vectorize along them instead and broadcast input pixels,
the layout MLAS and oneDNN use for the same reason. Data and outputs stay ``NCHW``: nothing
else in the graph changes and no layout transform runs at inference time.

Measured (2 threads, batch 1, kernel times): AV-MNIST's 32->64 3x3 convolution on 28x28
1.25 -> 0.22 ms; MM-IMDb's stride-2 32->64 3x3 on 48x48 2.41 -> 0.30 ms; whole models
AV-MNIST 2.21 -> 1.18 ms, MM-IMDb 3.38 -> 1.03 ms, late fusion 1.13 -> 0.87 ms.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax import expr_functor

from mmcompile.targets.tvm.cpu_matmul import ROW_PAD_WASTE, row_limit, row_padding
from mmcompile.targets.tvm.rewrite import rewrite_functions, static_shape

# op -> (layout it packs, packed layout, numpy transpose from the first to the second)
_PACK = {
    "relax.nn.conv2d": ("OIHW", "HWIO", (2, 3, 1, 0)),
    "relax.nn.conv1d": ("OIW", "WIO", (2, 1, 0)),
}
_ATTRS = ("strides", "padding", "dilation", "groups", "data_layout", "out_layout", "out_dtype")


@expr_functor.mutator
class _Packer(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name not in _PACK:
            return call
        source, packed, perm = _PACK[call.op.name]
        weight = call.args[1]
        attrs = call.attrs
        if (not isinstance(weight, tvm.ir.expr.Constant) or attrs.kernel_layout != source
                or int(attrs.groups) != 1 or attrs.data_layout[1] != "C"):
            return call
        data = weight.value.numpy().transpose(perm).copy()
        make = relax.op.nn.conv2d if call.op.name == "relax.nn.conv2d" else relax.op.nn.conv1d
        kwargs = {a: getattr(attrs, a) for a in _ATTRS}
        return make(call.args[0], relax.const(data), kernel_layout=packed, **kwargs)


@tvm.transform.module_pass(opt_level=0, name="mmcompile.PackConvWeights")
class PackConvWeights:
    """Constant OIHW/OIW convolution weights -> HWIO/WIO (groups == 1, channels-first data)."""

    def transform_module(self, mod, _ctx):
        return rewrite_functions(mod, _Packer(mod))


def _packed_matmul(data, panels, columns: int, rows: int):
    """``data [..., M, K] x weights [K, N]``, the weights read as ``[N / P, K, P]`` panels.
    Where the panels end in zero columns (``columns < N``) or ``rows`` is above ``M`` (rows
    padded to whole register tiles, :func:`~.cpu_matmul.row_padding`; 0: none), the product is
    computed padded and the last block keeps its ``[..., M, columns]`` corner: an epilogue
    that the schedule computes in the register tiles' write-back, as for ``pad_einsum``."""
    from tvm import te
    *lead, depth = data.shape
    count, _, width = (int(d) for d in panels.shape)
    pad_rows = bool(rows) and rows > int(lead[-1])
    if pad_rows:
        source = data
        data = te.compute(
            (*lead[:-1], rows, depth),
            lambda *i: tirx.if_then_else(i[-2] < source.shape[-2], source[i],
                                         tirx.const(0, source.dtype)),
            name="matmul_rows")
    k = te.reduce_axis((0, depth), "k")
    product = te.compute(
        (*data.shape[:-1], count * width),
        lambda *i: te.sum(data[(*i[:-1], k)] * panels[i[-1] // width, k, i[-1] % width],
                          axis=k),
        name="matmul")
    if columns == count * width and not pad_rows:
        return product
    return te.compute((*lead, columns), lambda *i: product[i], name="matmul_corner")


@expr_functor.mutator
class _MatmulPacker(relax.PyExprMutator):
    def __init__(self, mod, width: int):
        super().__init__(mod)
        self.width = width

    def _rows(self, data) -> int:
        """The rows of ``data`` padded to whole register tiles (:func:`~.cpu_matmul.
        row_padding`; the panels' indexing keeps ``pad_einsum`` from doing it in the
        schedule); 0 (no padding) where the shape is symbolic or has no rows."""
        shape = static_shape(data)
        if shape is None or len(shape) < 2:
            return 0
        lanes = self.width // 2
        step = row_padding(shape[-2], row_limit(self.width, lanes))
        return -(-shape[-2] // step) * step

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul":
            return call
        data, weight = call.args
        if not isinstance(weight, tvm.ir.expr.Constant) or len(weight.value.shape) != 2:
            return call
        depth, columns = (int(d) for d in weight.value.shape)
        dtype = str(weight.value.dtype)
        padded = -(-columns // self.width) * self.width
        rows = self._rows(data)
        if padded - columns > ROW_PAD_WASTE * columns or str(data.ty.dtype) != dtype \
                or str(call.ty.dtype) != dtype or data.ty.ndim < 1:
            return call
        matrix = np.pad(weight.value.numpy(), [(0, 0), (0, padded - columns)])
        panels = matrix.reshape(depth, padded // self.width, self.width)
        packed = relax.const(np.ascontiguousarray(panels.transpose(1, 0, 2)))
        return self.builder_.call_te(_packed_matmul, data, packed, columns, rows,
                                     primfunc_name_hint="matmul")


@tvm.transform.module_pass(opt_level=0, name="mmcompile.PackMatmulWeights")
class PackMatmulWeights:
    """Constant ``[K, N]`` matmul weights -> ``[N / P, K, P]`` panels of ``P`` columns (the
    register tile's width: 2 vectors), read by a TE matmul that indexes the panels.

    A register tile of :class:`~.cpu_matmul.BlockedMatmul` reads ``P`` columns of every
    weight row: in ``[K, N]`` order each row is ``4 N`` bytes after the last (2 KB at 512
    columns, so a tile's rows fall into 2 of L1's 64 sets), in panel order the tile's
    weights are one contiguous stream, as MLAS packs them. Measured (one kernel, 2 threads,
    AVX2, time packed / unpacked): [50, 512] x [512, 128] 0.64, [400, 128] x [128, 512] 0.80,
    [65, 256] x [256, 1024] 0.60, [8, 9537] x [9537, 128] 0.55, [50, 128] x [128, 512] 0.96.

    Columns that are not a whole number of panels are padded with zero columns at compile
    time where that adds at most ``ROW_PAD_WASTE`` of the work (200 -> 208 at ``P = 16``),
    and rows that :func:`~.cpu_matmul.row_padding` pads to whole register tiles are padded
    inside the kernel (the panels' indexing keeps the schedule's ``pad_einsum`` from doing
    it); the product's ``[..., M, N]`` corner is the kernel's last block. Before, 200
    columns on AVX2 took register tiles five vectors wide and two rows high, whose weight
    panel (40 columns x the whole reduction) leaves L2 on deep reductions, and prime row
    counts stayed unpacked. One-op MatMul models, one thread, znver3, mmcompile /
    onnxruntime before -> after: [59, 5760] x [5760, 200] 2.10 -> 1.28, [60, 1280] x
    [1280, 200] 1.72 -> 1.14, [120, 640] x [640, 200] 2.0 -> 1.18, [64, 2560] x [2560, 120]
    1.58 -> 1.36, [59, 5760] x [5760, 256] 1.50 -> 1.14, [197, 768] x [768, 768] 1.20 -> 1.11.
    """

    def __init__(self, width: int):
        self.width = width

    def transform_module(self, mod, _ctx):
        return rewrite_functions(mod, _MatmulPacker(mod, self.width))
