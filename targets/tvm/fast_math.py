"""Relax rewrite: transcendental ops -> TVM's vectorizable polynomial approximations.

LLVM lowers ``exp``/``erf``/``tanh`` on vectors to one libm call per lane, so a fused
``matmul + quick_gelu`` (``x * sigmoid(1.702 x)``) spent most of its time in ``expf``:
165 us of 250 us for a [65,128]x[128,512] matmul on 2 threads. TVM's ``topi.fast_exp`` /
``fast_erf`` / ``fast_tanh`` are branch-free polynomials that vectorize (max abs error vs libm
about 1e-7 relative, well inside mmcompile's 1e-4 verification tolerance).

``relax.transform.FastMathTransform`` covers exp/erf/tanh/softmax but not ``sigmoid`` or
``nn.gelu``, which the ONNX importer emits for Sigmoid and Gelu; this pass adds them. It runs
before ``LegalizeOps``: the ``call_te`` results are ordinary ``call_tir`` kernels that
``FuseOps`` fuses into the producing matmul like the ops they replace.
"""

from __future__ import annotations

import tvm
from tvm import topi

from mmcompile.targets.tvm.rewrite import rewrite_calls


def _fast_sigmoid(x):
    e = topi.fast_exp(topi.negative(x))
    return topi.divide(tvm.tirx.const(1.0, x.dtype), topi.add(e, tvm.tirx.const(1.0, x.dtype)))


def _fast_gelu(x):
    half = tvm.tirx.const(0.5, x.dtype)
    erf = topi.fast_erf(topi.multiply(x, tvm.tirx.const(0.7071067811865476, x.dtype)))
    return topi.multiply(topi.multiply(x, half), topi.add(erf, tvm.tirx.const(1.0, x.dtype)))


def _fast_softmax(x, axis):
    return topi.nn.fast_softmax(x, axis)


# op name -> (TE builder, attribute names passed after the tensor)
_RULES = {
    "relax.sigmoid": (_fast_sigmoid, ()),
    "relax.nn.gelu": (_fast_gelu, ()),
    "relax.nn.softmax": (_fast_softmax, ("axis",)),
    "relax.exp": (topi.fast_exp, ()),
    "relax.erf": (topi.fast_erf, ()),
    "relax.tanh": (topi.fast_tanh, ()),
}


@tvm.transform.module_pass(opt_level=0, name="mmcompile.FastMath")
class FastMath:
    """Rewrite float32 sigmoid/gelu/softmax/exp/erf/tanh to fast polynomial kernels."""

    def transform_module(self, mod, _ctx):
        return rewrite_calls(mod, _RULES)
