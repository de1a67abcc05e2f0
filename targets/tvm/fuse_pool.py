"""Relax rewrite: a convolution, its bias/activation and the max pool after it, one kernel.

TVM's ``FuseOps`` never puts a pool in the convolution's kernel (both are "out-elementwise
fusable" ops: a group holds one), so a conv -> relu -> max-pool block of a small CNN runs as
two kernels: the convolution writes its whole output (AV-MNIST batch 8: 6.4 MB for the 112x112
spectrogram layer, more than L2) and the pool reads it back with stride-2 loads. onnxruntime's
NCHWc pool reads a blocked layout instead; ours measured 3.6x its time on AV-MNIST (1.6 vs
0.44 ms of an 11 ms batch-8 run).

:class:`FuseConvPool` groups ``conv2d [-> add] [-> relu] -> max_pool2d`` into one primitive
function (``FuseOpsByPattern``; ``FuseTIR`` then makes it one PrimFunc), and
:class:`~.cpu_conv.BlockedConv2d` computes each pooling window in the parallel task that has
just produced its rows. Only what that schedule handles is grouped: pre-packed (HWIO)
constant weights, NCHW data, and non-overlapping windows (pool size = stride, no padding, no
dilation, floor rounding), which is how CNN encoders downsample. A block the convolution
rules cannot tile per task still runs as one kernel: the pool as a parallel pass after the
tiles (``cpu_matmul.pool_pass``).

Measured (2 threads, whole model, one process, 7 interleaved rounds, outputs within 6e-8
of onnxruntime): AV-MNIST 0.79x of the unfused kernels at batch 1 and 8 (b8 12.5 -> 9.5 ms),
late fusion 0.89x (b1) / 0.94x (b8). Vectorizing the per-task pool along its columns
(stride-2 reads) measured 1.5x slower than LLVM's scalar loop.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard
from tvm.relax.transform import FusionPattern


def _patterns():
    conv = is_op("relax.nn.conv2d")(wildcard(), is_const())
    biased = is_op("relax.add")(conv, wildcard())
    chains = [is_op("relax.nn.relu")(biased), biased, is_op("relax.nn.relu")(conv), conv]
    return [FusionPattern("mmcompile.conv_pool", is_op("relax.nn.max_pool2d")(chain),
                          check=_fusable)
            for chain in chains]  # the longest chain first: FuseOpsByPattern takes the first match


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _fusable(context) -> bool:
    calls = {c.op.name: c for c in context.matched_bindings.values()
             if isinstance(c, relax.Call) and isinstance(c.op, tvm.ir.Op)}
    conv, pool = calls["relax.nn.conv2d"], calls["relax.nn.max_pool2d"]
    c, p = conv.attrs, pool.attrs
    return (c.kernel_layout == "HWIO" and c.data_layout == "NCHW" and c.out_layout == "NCHW"
            and int(c.groups) == 1 and whole_windows(p))


def whole_windows(pool_attrs) -> bool:
    """Whether a ``max_pool2d``'s windows tile its NCHW input: pool size = stride, no padding,
    no dilation, floor rounding (how CNN encoders downsample)."""
    p = pool_attrs
    return (p.layout == "NCHW" and p.out_layout == "NCHW" and not bool(p.ceil_mode)
            and _ints(p.pool_size) == _ints(p.strides) and not any(_ints(p.padding))
            and all(d == 1 for d in _ints(p.dilation)))


def FuseConvPool():  # noqa: N802 - a pass constructor, named like TVM's
    """Group each convolution with the max pool that follows it (see the module docstring);
    run after :class:`~.layout.PackConvWeights`, before ``LegalizeOps``."""
    return relax.transform.FuseOpsByPattern(_patterns(), bind_constants=False,
                                            annotate_codegen=False)
