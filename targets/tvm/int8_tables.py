"""Elementwise ops between two quantized tensors as 256-entry lookup tables, and the
quantize -> dequantize pairs left in float regions as one elementwise op (:class:`FakeQuantPairs`).

A QDQ graph keeps the activations between int8 layers in float:

    y = quantize(f(dequantize(x, s1, z1)), s2, z2)       (x uint8 / int8, per-tensor s, z)

with ``f`` elementwise (CLIP's QuickGELU ``v * sigmoid(1.702 v)``, GELU, SiLU, tanh, ...). ``y``
depends on the byte ``x`` alone, so it is one of 256 values: :class:`QuantizedTables` evaluates
``f`` once per possible ``x`` at compile time (numpy, float32 in the op's own formula) and
replaces the chain by a lookup, ``table[x]`` (:func:`lookup_kernel`: bytes in, bytes out, in
one pass; 64 at a time with AVX512-VBMI's ``vpermi2b``). onnxruntime does the same for the ops
it fuses with their QDQ pairs (``QLinearSigmoid``, ``QLinearLeakyRelu``). The table's bytes are
what the float chain computes, up to float32 rounding at a tie between two quantization steps
(the float chain itself rounds through ``sigmoid`` / ``erf`` differently on each runtime).

Taken when every op of ``f`` is in :data:`UNARY` / :data:`BINARY` and one is not in
:data:`CHEAP` (``DequantizeLinear -> Relu -> QuantizeLinear`` stays arithmetic, fused into
the pool or kernel before it), its other operands are scalar constants, its intermediate
values are read only inside ``f``, and every table entry is finite. Measured (Emerald Rapids,
2 threads, same build with and without the tables, compiled and timed in one process): CLIP
int8 0.90x at batch 1 and 0.95x at batch 8 (its QuickGELU), Whisper int8 at batch 8 0.93x
(GELU); outputs identical to the float chain's. The lookup was TVM's ``take`` of int32 indices
cast in a pass of their own until the kernel replaced it: CLIP int8 0.89x at batch 8 and 0.975x
at batch 1, Whisper 0.94x at batch 8 (saved artifacts timed in one process, outputs identical).
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.script import tirx as T
from tvm.relax import expr_functor

from mmcompile.targets.tvm.rewrite import (constant_value, is_call, rewrite_functions,
                                          variable_uses)
from mmcompile.targets.tvm.schedule_util import has_features

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(v):
    return np.float32(1) / (np.float32(1) + np.exp(-v))


UNARY = {
    "relax.sigmoid": _sigmoid,
    "relax.tanh": np.tanh,
    "relax.exp": np.exp,
    "relax.erf": lambda v: _erf(v).astype(np.float32),
    "relax.sqrt": np.sqrt,
    "relax.negative": np.negative,
    "relax.abs": np.abs,
    "relax.nn.relu": lambda v: np.maximum(v, np.float32(0)),
    "relax.nn.silu": lambda v: v * _sigmoid(v),
    "relax.nn.gelu": lambda v: (np.float32(0.5) * v * (np.float32(1) + _erf(
        v / np.float32(math.sqrt(2))).astype(np.float32))),
    "relax.nn.gelu_tanh": lambda v: np.float32(0.5) * v * (np.float32(1) + np.tanh(
        np.float32(math.sqrt(2 / math.pi)) * (v + np.float32(0.044715) * v * v * v))),
}
BINARY = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.maximum": np.maximum, "relax.minimum": np.minimum,
    "relax.power": np.power,
}

# A chain of only these stays float arithmetic: FuseOps fuses ``dequantize -> relu ->
# quantize`` into the kernel before it (a max pool), where it vectorizes; a table is a kernel
# of its own, one more pass over the bytes. AV-MNIST int8 at batch 8, its 112 x 112 pool
# (measured with TVM's ``take`` as the lookup): with the chain 0.15 ms; pool + int32 indices
# 0.34 ms and the lookup pass 0.12 ms.
CHEAP = frozenset({"relax.nn.relu", "relax.add", "relax.subtract", "relax.multiply",
                   "relax.maximum", "relax.minimum", "relax.negative", "relax.abs"})


VECTOR = 64  # bytes one ``vpermi2b`` pair looks up
TASK = 16384  # bytes per parallel task; a tensor of one task runs serially
OPAQUE = 8  # FuseOps pattern: the kernel runs alone


@functools.lru_cache(maxsize=64)  # TVMScript parses the kernel's source: ~0.1 s a build
def lookup_kernel(size: int, in_dtype: str, out_dtype: str, vbmi: bool):
    """``y[i] = table[byte of x[i]]`` over ``size`` bytes, the table 256 bytes.

    With AVX512-VBMI 64 bytes per step: two ``vpermi2b`` each look the low 7 bits up in one
    half of the table (two 64-byte registers), and the byte's high bit picks the half. Else
    one byte at a time, the loop unrolled (vectorized, LLVM gathers bytes element by element:
    2.5x slower). Measured alone (CLIP's QuickGELU, 266 KB, 2 threads, Emerald Rapids): TVM's
    ``take`` of int32 indices 125 us (and the pass casting them 57 us), bytes unrolled 47 us,
    ``vpermi2b`` 6.6 us."""
    vectors, tail = divmod(size, VECTOR)
    per_task = TASK // VECTOR
    tasks = -(-vectors // per_task)
    outer = T.parallel if tasks > 1 else T.serial
    lanes_out = f"{out_dtype}x{VECTOR}"
    permute = "llvm.x86.avx512.vpermi2var.qi.512"

    def half(table, start, index):
        return T.call_llvm_pure_intrin("uint8x64", permute, table[T.ramp(start, 1, VECTOR)],
                                       index, table[T.ramp(start + VECTOR, 1, VECTOR)])

    def byte(x, table, i):
        return T.reinterpret(out_dtype, table[T.Cast("int32", T.reinterpret("uint8", x[i]))])

    def index(x, at):
        return T.reinterpret("uint8x64", x[T.ramp(at, 1, VECTOR)])

    @T.prim_func(s_tir=True)
    def lookup(x: T.Buffer((size,), in_dtype), table: T.Buffer((256,), "uint8"),
               y: T.Buffer((size,), out_dtype)):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        for task in outer(tasks):
            for v in range(per_task):
                if task * per_task + v < vectors:
                    at = T.bind((task * per_task + v) * VECTOR)
                    if vbmi:  # a Python bool: the parser keeps one branch
                        y[T.ramp(at, 1, VECTOR)] = T.reinterpret(lanes_out, T.Select(
                            index(x, at) >= T.Broadcast(T.uint8(128), VECTOR),
                            half(table, 128, index(x, at)), half(table, 0, index(x, at))))
                    else:
                        for i in T.unroll(VECTOR):
                            y[at + i] = byte(x, table, at + i)
        for i in range(tail):
            y[vectors * VECTOR + i] = byte(x, table, vectors * VECTOR + i)

    return lookup.without_attr("global_symbol")


class _NotATable(Exception):
    pass


@expr_functor.mutator
class _Tables(relax.PyExprMutator):
    def __init__(self, mod, vbmi: bool):
        super().__init__(mod)
        self.count = 0
        self.vbmi = vbmi
        self.uses = variable_uses(mod)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if is_call(call, "relax.quantize"):
            with contextlib.suppress(_NotATable, TypeError, ValueError):
                return self._table(call)
        return call

    def _table(self, quantize):
        sy, zy = constant_value(quantize.args[1]), constant_value(quantize.args[2])
        dtype = str(quantize.attrs.out_dtype)
        if sy is None or zy is None or sy.size != 1 or zy.size != 1 or \
                dtype not in ("uint8", "int8"):
            raise _NotATable
        chain = _Chain(self)
        values = chain.evaluate(quantize.args[0])
        if chain.source is None or not chain.costly or not chain.closed():
            raise _NotATable
        scaled = values.astype(np.float32) / np.float32(sy.reshape(()))
        if not np.all(np.isfinite(scaled)):
            raise _NotATable
        info = np.iinfo(dtype)
        table = np.clip(np.rint(scaled) + int(zy.reshape(())), info.min, info.max).astype(dtype)
        self.count += 1
        source, signed = chain.source, str(chain.source.ty.dtype) == "int8"
        shape = source.ty.shape
        if not all(isinstance(d, tirx.IntImm) for d in shape):  # symbolic: TVM's gather
            index = relax.op.astype(source, "int32")
            if signed:
                index = relax.op.add(self.builder_.emit(index), relax.const(128, "int32"))
            return relax.op.take(relax.const(table), self.builder_.emit(index), axis=0)
        size = int(np.prod([int(d) for d in shape]))
        kernel = lookup_kernel(size, str(source.ty.dtype), dtype, self.vbmi)
        # indexed by the code's byte: int8 -128 is byte 0x80, at 0 in the table
        data = (np.roll(table, -128) if signed else table).view(np.uint8)
        flat = self.builder_.emit(relax.op.reshape(source, [size]))
        out = self.builder_.emit(relax.call_tir(
            self.builder_.add_func(kernel, "int8_table"), [flat, relax.const(data)],
            relax.TensorType([size], dtype)))
        return relax.op.reshape(out, shape)


class _Chain:
    """The elementwise DAG between one ``dequantize`` and a ``quantize``, evaluated on the 256
    values of the dequantized byte."""

    def __init__(self, mutator):
        self.mutator = mutator
        self.source = None      # the quantized tensor x
        self.dequantized = None
        self.ops = 0
        self.costly = False     # an op a vector unit computes in more than a few instructions
        self.reads: dict = {}   # variable -> reads inside the chain
        self.memo: dict = {}

    def closed(self) -> bool:
        """Whether no value computed inside the chain is read outside it."""
        return all(self.mutator.uses.get(var) == n for var, n in self.reads.items()
                   if var is not self.dequantized)

    def evaluate(self, expr) -> np.ndarray:
        if isinstance(expr, relax.Var):
            self.reads[expr] = self.reads.get(expr, 0) + 1
            if expr in self.memo:
                return self.memo[expr]
            value = self.mutator.lookup_binding(expr)
            if value is None:
                raise _NotATable
            result = self._call(value, expr)
            self.memo[expr] = result
            return result
        constant = constant_value(expr)
        if constant is not None and constant.size == 1 and constant.dtype == np.float32:
            return constant.reshape(())
        if isinstance(expr, relax.Call):
            return self._call(expr, None)
        raise _NotATable

    def _call(self, call, var):
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
            raise _NotATable
        name = call.op.name
        if name == "relax.dequantize":
            return self._dequantize(call, var)
        if str(call.ty.dtype) != "float32":
            raise _NotATable
        self.ops += 1
        self.costly |= name not in CHEAP
        with np.errstate(all="ignore"):
            if name in UNARY and len(call.args) == 1:
                return np.asarray(UNARY[name](self.evaluate(call.args[0])), np.float32)
            if name in BINARY and len(call.args) == 2:
                a, b = (self.evaluate(arg) for arg in call.args)
                return np.asarray(BINARY[name](a, b), np.float32)
        raise _NotATable

    def _dequantize(self, call, var):
        x, scale, zero = call.args[0], constant_value(call.args[1]), constant_value(call.args[2])
        dtype = str(x.ty.dtype)
        if scale is None or zero is None or scale.size != 1 or zero.size != 1 or \
                dtype not in ("uint8", "int8") or str(call.ty.dtype) != "float32":
            raise _NotATable
        if self.source is not None and not (x.same_as(self.source) and var is not None
                                            and var.same_as(self.dequantized)):
            raise _NotATable  # a second quantized input: not a function of one byte
        self.source, self.dequantized = x, var
        info = np.iinfo(dtype)
        codes = np.arange(info.min, info.max + 1, dtype=np.int32)
        return ((codes - int(zero.reshape(()))).astype(np.float32)
                * np.float32(scale.reshape(())))


@tvm.transform.module_pass(opt_level=0, name="mmcompile.QuantizedTables")
class QuantizedTables:
    """``quantize(f(dequantize(x)))`` with elementwise ``f`` -> ``table[x]`` (see the module
    docstring) for an LLVM CPU ``target``; ``count`` says how many were replaced."""

    def __init__(self, target):
        self.count = 0
        self.vbmi = has_features(target, "avx512vbmi", "avx512bw")

    def transform_module(self, mod, _ctx):
        tables = _Tables(mod, self.vbmi)
        mod = rewrite_functions(mod, tables)
        self.count = tables.count
        return relax.transform.DeadCodeElimination()(mod) if self.count else mod


# -- fake quantization in float regions -----------------------------------------------------------

def fake_quant(x, scale, zero, qmin: int, qmax: int):
    """``dequantize(quantize(x, s, z), s, z)`` in float32: ``clamp(round(x / s), qmin - z,
    qmax - z) * s``. The same numbers as TVM's two legalized ops (``round(x / s) + z`` clamped,
    cast to the integer type, back to int32, ``- z``, to float, ``* s``): every value between
    the two casts is an integer a float32 holds exactly, so the four casts are an identity."""
    from tvm import te
    z = tirx.Cast("float32", zero[()])
    lo = tirx.const(float(qmin), "float32") - z
    hi = tirx.const(float(qmax), "float32") - z
    return te.compute(x.shape, lambda *i: tirx.max(tirx.min(tirx.round(x[i] / scale[()]), hi),
                                                   lo) * scale[()], name="fake_quant")


@expr_functor.mutator
class _FakeQuant(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not is_call(call, "relax.dequantize"):
            return call
        inner = call.args[0]
        quantize = self.lookup_binding(inner) if isinstance(inner, relax.Var) else inner
        if quantize is None or not is_call(quantize, "relax.quantize"):
            return call
        dtype = str(quantize.attrs.out_dtype)
        x = quantize.args[0]
        scales = [constant_value(a) for a in (quantize.args[1], call.args[1])]
        zeros = [constant_value(a) for a in (quantize.args[2], call.args[2])]
        if (dtype not in ("uint8", "int8") or str(call.attrs.out_dtype) != "float32"
                or str(getattr(x.ty, "dtype", "")) != "float32"
                or any(v is None or v.size != 1 for v in scales + zeros)
                or scales[0].reshape(()) != scales[1].reshape(())
                or zeros[0].reshape(()) != zeros[1].reshape(())
                or not float(scales[0].reshape(())) > 0):
            return call
        self.count += 1
        info = np.iinfo(dtype)
        # scale and zero point as tensor arguments, as _qparams_as_tensors passes them: one
        # kernel for every layer's pair instead of one per constant
        s = self.builder_.emit(relax.const(scales[0].reshape(()).astype(np.float32)))
        z = self.builder_.emit(relax.const(zeros[0].reshape(()).astype(dtype)))
        return self.builder_.call_te(fake_quant, x, s, z, int(info.min), int(info.max),
                                     primfunc_name_hint="fake_quant")


@tvm.transform.module_pass(opt_level=0, name="mmcompile.FakeQuantPairs")
class FakeQuantPairs:
    """``dequantize(quantize(x, s, z), s, z)`` left in a float region (a QDQ graph's softmax,
    or a matmul of two activations, both run in float) -> one elementwise op,
    :func:`fake_quant`; ``count`` says how many. After :class:`QuantizedContractions` and
    :class:`QuantizedTables`, which read those pairs as int8 inputs. Outputs bit-identical.
    Measured (Zen 5, 2 threads, kernels alone): MOSEI-TFN int8 batch 8's attention kernels
    with the pair fused after them (softmax, QK^T, PV products) 10-25% faster beyond the
    run-to-run drift; whole models within the noise of the A/B (0.97-1.03x)."""

    def __init__(self):
        self.count = 0

    def transform_module(self, mod, _ctx):
        pairs = _FakeQuant(mod)
        mod = rewrite_functions(mod, pairs)
        self.count = pairs.count
        return relax.transform.DeadCodeElimination()(mod) if self.count else mod
