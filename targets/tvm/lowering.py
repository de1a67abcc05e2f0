"""CPU lowering for the TVM target: Relax module (from the ONNX importer) -> scheduled module.

``lower_cpu(mod, target)`` replaces the ``zero`` pipeline + ``schedule_cpu`` pair in
``TVMCpuTarget.compile``; ``tvm.compile`` then finishes (memory planning, VM codegen).

Steps and why they are in this order: one-hot matrices multiplied by constant weights
become row lookups (:mod:`.one_hot`: Magika's byte embedding, 1.5 -> 0.15 ms at one
thread); deep 1-D convolutions over long sequences, and deep ones whose kernel spans every
input row, become im2col + matmul (:mod:`.im2col_conv`: Magika's 256 -> 512 kernel-5
layer, the model 0.75x at one thread; the iEEG detector's [96, 3] layer 4.8 -> 3.1 ms);
the shallower spanning ones become 1-D convolutions over the rows folded into channels
(:mod:`.spanning_conv`), both before the weights are packed; transposed convolutions whose
kernel equals their stride a 1x1 convolution and a depth-to-space shuffle
(:mod:`.transposed_conv`); 1x1 convolutions with shallow reductions 1-D convolutions over
the flattened pixels (:mod:`.pointwise_conv`: whole two-vector tiles); 3x3 and 5x5
stride-1 convolutions (with their bias, relu and max pool) rewritten to Winograd's
transforms and a batched matmul (:mod:`.winograd`: late fusion 0.86x, AV-MNIST 0.57x at
batch 1), then the other convolution and matmul weights packed
(:mod:`.layout`; matmul panels, odd column and row counts padded: whole models
0.90-0.98x, CLIP batch 8 0.90x), depthwise
convolutions on maps under 4 pixels wide read channels-last copies (:mod:`.depthwise`), then
each convolution grouped with the max pool after it (:mod:`.fuse_pool`, which needs the
packed layout); softmax and layer norm over the last axis become kernels with vector
partial sums (:mod:`.rows`; whole models 0.82-0.97x, MOSEI-TFN batch 8 0.82x);
:class:`~.fast_math.FastMath` rewrites sigmoid/gelu/
softmax/exp/erf/tanh to polynomial TE kernels *before* ``LegalizeOps`` so that ``FuseOps``
fuses them into the matmul that produces them; ``zero`` legalizes and fuses; then the CPU rules
(:func:`.schedules.schedule_cpu`: register-blocked matmul/conv, small kernels serial).
CLIP example, 1 thread, vs onnxruntime: 4.9x (old rules) -> 2.7x (blocked matmul/conv) ->
0.96x (+ fast math, epilogues fused per tile). Outputs within 2e-6 of onnxruntime.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir.expr import Constant

from mmcompile.targets.tvm.column_softmax import ColumnSoftmaxes
from mmcompile.targets.tvm.depthwise import ChannelsLastDepthwise
from mmcompile.targets.tvm.fast_math import FastMath
from mmcompile.targets.tvm.fuse_pool import FuseConvPool
from mmcompile.targets.tvm.im2col_conv import Im2colConvs
from mmcompile.targets.tvm.spanning_conv import SpanningConvs
from mmcompile.targets.tvm.transposed_conv import ShuffleTransposedConvs
from mmcompile.targets.tvm.int8 import QuantizedContractions, int8_instructions
from mmcompile.targets.tvm.int8_tables import FakeQuantPairs, QuantizedTables
from mmcompile.targets.tvm.layout import PackConvWeights, PackMatmulWeights
from mmcompile.targets.tvm.one_hot import OneHotMatmuls
from mmcompile.targets.tvm.pointwise_conv import FlatPointwiseConvs
from mmcompile.targets.tvm.rows import RowReductions
from mmcompile.targets.tvm.schedule_util import lanes_for
from mmcompile.targets.tvm.schedules import schedule_cpu
from mmcompile.targets.tvm.unit_reductions import SpatializeUnitReductions
from mmcompile.targets.tvm.winograd import Winograd


def lowering_options(config) -> dict[str, bool]:
    """The keyword options of :func:`fuse_cpu` / :func:`lower_cpu` from a target config:
    ``fast_math`` (False keeps libm's exp/erf/tanh, bit-closer to onnxruntime) and
    ``winograd`` (False sums 3x3 / 5x5 convolutions directly), both on by default."""
    return {name: bool(config.get(name, True)) for name in ("fast_math", "winograd")}


def fuse_cpu(mod, target, *, fast_math: bool = True, winograd: bool = True, facts=None):
    """Legalize and fuse: the kernels that get scheduled, and that ``mmcompile tune`` tunes
    (:mod:`.tuning` extracts its tasks from this function's result). ``facts`` (a dict), when
    given, receives ``int8``: how many QDQ contractions became int8 kernels, how many of them
    write their quantized output (requantized in the kernel), and with which instructions."""
    quantized = QuantizedContractions(target)
    mod = quantized(mod)  # QDQ matmul / conv -> int8 kernels; before anything takes them
    tables = QuantizedTables(target)
    mod = tables(mod)  # DQ -> elementwise -> Q: byte lookup tables
    mod = FakeQuantPairs()(mod)  # Q -> DQ left in float regions: one elementwise op
    if quantized.count and facts is not None:
        facts["int8"] = {"kernels": quantized.count, "requantized": quantized.requantized,
                         "tables": tables.count,
                         "amx": quantized.amx_count,
                         "instructions": int8_instructions(target, quantized.amx_count)}
    mod = OneHotMatmuls()(mod)  # one_hot(ids) @ W: the weight rows the ids select
    mod = Im2colConvs()(mod)  # deep 1-D convolutions over long sequences: im2col + matmul
    mod = SpanningConvs()(mod)  # kernels spanning the input height: 1-D convolutions
    mod = ShuffleTransposedConvs()(mod)  # kernel == stride: 1x1 conv + depth-to-space
    if winograd:
        mod = Winograd()(mod)  # 4-6x fewer multiply-adds; before the packing takes the convs
    mod = FlatPointwiseConvs(lanes_for(target))(mod)  # shallow 1x1: one axis of pixels
    mod = PackConvWeights()(mod)  # output channels innermost: the schedule vectorizes them
    mod = PackMatmulWeights(2 * lanes_for(target))(mod)  # a register tile's weights contiguous
    mod = ChannelsLastDepthwise()(mod)  # depthwise on narrow maps: vectors across channels
    mod = FuseConvPool()(mod)  # after packing: it groups only packed convolutions
    mod = RowReductions(fast_math, lanes_for(target))(mod)  # vector partial sums; before FastMath
    mod = ColumnSoftmaxes(fast_math)(mod)  # softmax over another axis: vectorized across it
    if fast_math:
        mod = FastMath()(mod)  # before LegalizeOps, so FuseOps sees ordinary call_tir kernels
    return legalize_and_fuse(mod, target)


def _qparams_as_tensors(op_name: str):
    """TVM's legalization of ``op_name`` (``relax.quantize`` / ``relax.dequantize``), but
    with a scalar constant scale or zero point passed to the kernel as a tensor argument,
    where TVM writes it into the code as an immediate. Every layer of a QDQ graph has its own
    scales, so with immediates no two of its fused kernels were alike: CLIP's int8 build at
    batch 8 had 97 kernels to generate code for (its float build 39), 70 with tensors, and the
    same speed (saved artifacts timed in one process: 1.01x, outputs identical)."""
    legalize = tvm.ir.Op.get(op_name).get_attr("FLegalize")

    def tensors(bb, call):
        args = [call.args[0], *(bb.emit(a) if isinstance(a, Constant) and a.ty.ndim == 0
                                else a for a in call.args[1:])]
        return legalize(bb, relax.Call(call.op, args, call.attrs))
    return tensors


def legalize_and_fuse(mod, target):
    """TVM's ``zero`` pipeline (legalize to TIR, fuse; quantize / dequantize legalized by
    :func:`_qparams_as_tensors`), then reductions over one element made elementwise
    (:mod:`.unit_reductions`: every schedule rule, ours and dlight's, would otherwise be free
    to inline an epilogue into their ``init`` and apply it twice)."""
    with target:
        mod = relax.transform.LegalizeOps({name: _qparams_as_tensors(name) for name in (
            "relax.quantize", "relax.dequantize")})(mod)
        mod = relax.get_pipeline("zero")(mod)
    return SpatializeUnitReductions()(mod)


def lower_cpu(mod, target, *, fast_math: bool = True, winograd: bool = True, tuning_db=None):
    """Legalize, fuse and schedule ``mod`` for an LLVM CPU ``target``.

    Args:
        mod: the Relax IRModule after ``DecomposeOpsForInference``.
        target: the ``tvm.target.Target`` (llvm, with ``mcpu``).
        fast_math: rewrite sigmoid/gelu/softmax/exp/erf/tanh to vectorizable polynomials.
        winograd: compute 3x3 / 5x5 stride-1 convolutions with Winograd F(4x4, r x r)
            (:mod:`.winograd`; outputs differ from the direct sums by rounding, ~1e-6
            relative).
        tuning_db: a database folder from ``mmcompile tune``: its tuned schedules replace the
            default ones where they were faster.

    Returns:
        ``(mod, facts)``: the IRModule, ready for ``tvm.compile(mod, target=target)``, and
        facts for the manifest (``{"tuning": {"hits": n, "kernels": m}}`` with a database,
        ``{"int8": {"kernels": n, "requantized": r, "instructions": ...}}`` for a QDQ
        graph).

    Raises:
        TuningDBError: ``tuning_db`` is missing, corrupt or for another CPU.
    """
    facts = {}
    mod = fuse_cpu(mod, target, fast_math=fast_math, winograd=winograd, facts=facts)
    if tuning_db:
        from tvm import tirx

        from mmcompile.targets.tvm.tuning import apply_database
        mod, hits = apply_database(mod, target, tuning_db)  # schedule_cpu skips these kernels
        kernels = sum(isinstance(f, tirx.PrimFunc) for _, f in mod.functions_items())
        facts["tuning"] = {"hits": hits, "kernels": kernels}
    return schedule_cpu(mod, target), facts
