"""Relax rewrite: a matmul of a one-hot matrix with constant weights becomes a row lookup.

Exporters write an embedding lookup as ``one_hot(ids) @ W`` when the framework's own graph
did (tf2onnx, Keras' ``one_hot`` + ``Dense``): ``Equal(ids[..., None], range(K))``, ``Cast``
to float, ``MatMul`` with the ``[K, N]`` weights. Magika (the corpus's file-type classifier)
embeds its 2048 input bytes so: the one-hot matrix ``[2048, 257]`` (526 K floats written and
read again) and a GEMM of 34 MFLOP whose every product but one per sum is zero; 0.59 +
0.93 ms of its 12 ms on one AVX2 core (znver3).

Rewritten as ``where(0 <= ids < K, take(W, clip(ids, 0, K - 1)), 0)``: each output row is
the weight row its id selects, or zeros for an id outside the range (an all-zero one-hot
row). Exact, not an approximation: the matmul adds one ``1 * w`` to zeros (``0 * w`` is
``+-0``, and ``w + -0 == w``); weights that are not all finite (``0 * inf`` is NaN) are left
to the matmul.

Taken: ``matmul(astype(equal(a, b), float32), W)`` with ``W`` a constant ``[K, N]`` float32,
one of ``a``, ``b`` an integer tensor whose last dimension is 1 and the other an integer
constant ``0, 1, ..., K - 1`` along its last dimension (every other dimension 1).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax import expr_functor

from mmcompile.targets.tvm.rewrite import is_call, rewrite_functions, static_shape


def _ids(equal) -> tuple | None:
    """``(ids, K)`` when ``equal`` compares integer ``ids [..., 1]`` with ``0 .. K - 1``."""
    for ids, table in (equal.args, equal.args[::-1]):
        if not isinstance(table, tvm.ir.expr.Constant):
            continue
        values = table.value.numpy()
        shape = static_shape(ids)
        if (values.ndim == 0 or values.dtype.kind not in "iu" or not shape or shape[-1] != 1
                or np.dtype(str(ids.ty.dtype)).kind not in "iu"
                or any(d != 1 for d in values.shape[:-1]) or values.ndim > len(shape)):
            continue
        row = values.reshape(-1)
        if np.array_equal(row, np.arange(row.size)):
            return ids, row.size
    return None


@expr_functor.mutator
class _OneHot(relax.PyExprMutator):
    def _bound(self, expr):
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not is_call(call, "relax.matmul"):
            return call
        hot, weight = call.args
        cast = self._bound(hot)
        if (not isinstance(weight, tvm.ir.expr.Constant) or not is_call(cast, "relax.astype")
                or str(cast.attrs.dtype) != "float32" or str(call.ty.dtype) != "float32"):
            return call
        equal = self._bound(cast.args[0])
        w = weight.value.numpy()
        if not is_call(equal, "relax.equal") or w.ndim != 2 or not np.isfinite(w).all():
            return call
        found = _ids(equal)
        if found is None or found[1] != w.shape[0]:
            return call
        ids, depth = found
        shape = static_shape(ids)
        out_shape = static_shape(call)
        if out_shape is None or out_shape[:-1] != shape[:-1]:
            return call  # a one-hot matrix broadcast against batched weights: not this form
        emit = self.builder_.emit
        dtype = str(ids.ty.dtype)
        limits = np.iinfo(dtype)
        flat = emit(relax.op.reshape(ids, shape[:-1]))
        index = emit(relax.op.clip(flat, 0, min(depth - 1, int(limits.max))))
        rows = emit(relax.op.take(weight, index, axis=0))  # [..., N]
        checks = []  # only those the id type can fail: a uint8 id is always below 257
        if limits.min < 0:
            checks.append(relax.op.greater_equal(ids, relax.const(0, dtype)))
        if limits.max >= depth:
            checks.append(relax.op.less(ids, relax.const(depth, dtype)))
        if not checks:
            return rows
        inside = checks[0] if len(checks) == 1 else relax.op.logical_and(*checks)
        return relax.op.where(emit(inside), rows, relax.const(0.0, "float32"))


@tvm.transform.module_pass(opt_level=0, name="mmcompile.OneHotMatmuls")
class OneHotMatmuls:
    """``one_hot(ids) @ W`` (``Equal`` with a range, ``Cast``, ``MatMul`` with constant
    weights) -> the weight rows the ids select (see the module docstring)."""

    def transform_module(self, mod, _ctx):
        return rewrite_functions(mod, _OneHot(mod))
