"""CPU target schedules: the blocked rule really applies, and epilogues it cannot cover decline."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import mmcompile


def _assert_compiled_matches_torch(module, inputs, **tolerance):
    """``module`` compiled for the CPU gives torch's outputs on ``inputs``, within
    ``tolerance`` (``np.testing.assert_allclose``'s ``rtol`` / ``atol``)."""
    compiled = mmcompile.compile(module, inputs, verify=False)
    with torch.no_grad():
        expected = module(*inputs).numpy()
    np.testing.assert_allclose(compiled(*(x.numpy() for x in inputs)), expected, **tolerance)


def _matmul_relu_func(m: int, n: int, k: int):
    from tvm import te
    a = te.placeholder((m, k), name="A")
    b = te.placeholder((k, n), name="B")
    r = te.reduce_axis((0, k), "r")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r] * b[r, j], axis=r), name="C")
    d = te.compute((m, n), lambda i, j: te.max(c[i, j], 0.0), name="D")
    return te.create_prim_func([a, b, d])


def test_blocked_matmul_rule_schedules_a_matmul_with_epilogue():
    # The rules swallow exceptions as "does not apply": a bug inside one silently sends every
    # matmul to the generic fallback (10x+ slower), so check the rule applies on its own.
    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    sch = BlockedMatmul._schedule(_matmul_relu_func(64, 128, 96), lanes=16)
    assert sch is not None
    assert any(inst.kind.name == "Parallel" for inst in sch.trace.insts)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "float32"])
def test_blocked_matmul_leaves_max_pools_of_bytes_to_the_plain_rules(dtype):
    """A max pool of a quantized tensor (int8 graphs pool before dequantizing) as a few
    byte lanes per vector gathered one by one: 10x the float pool's time (late fusion's
    audio pools, 50 vs 5 us). BlockedMatmul declines 8- and 16-bit integer reductions."""
    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    from tvm import te
    x = te.placeholder((1, 64, 100), dtype, "x")
    k = te.reduce_axis((0, 2), "k")
    y = te.compute((1, 64, 50), lambda b, c, w: te.max(x[b, c, w * 2 + k], axis=k),
                   name="pool_max")
    taken = BlockedMatmul._schedule(te.create_prim_func([x, y]), lanes=8) is not None
    assert taken == (dtype == "float32")


@pytest.mark.parametrize("dtype, size, window, stride", [
    ("uint8", 112, 2, 2), ("uint8", 30, 3, 2), ("float32", 20, 3, 1), ("int8", 56, 2, 2)])
def test_pools_run_rows_in_parallel_with_the_window_unrolled_and_match_numpy(
        dtype, size, window, stride):
    """WindowReduction: rows of the pool in parallel, the output columns a loop with the window
    unrolled inside it (LLVM vectorizes it; AV-MNIST int8's 112 x 112 pool 1.04 -> 0.15 ms),
    the epilogue after each row; outputs equal to numpy's."""
    import tvm
    from tvm import relax

    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import legalize_and_fuse
    from mmcompile.targets.tvm.schedules import WindowReduction
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8, size, size), dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            pooled = bb.emit(relax.op.nn.max_pool2d(x, window, stride))
            out = bb.emit_output(relax.op.astype(pooled, "float32"))
        bb.emit_func_output(out)
    target = llvm_target(threads=2)
    mod = legalize_and_fuse(bb.get(), target)
    (name,) = [gv for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    sch = WindowReduction._schedule(mod[name], target)
    assert sch is not None
    text = sch.mod["main"].script()
    assert text.count("T.parallel(") == 1 and text.count("T.unroll(") == 2, text
    out_size = (size - window) // stride + 1
    info = np.iinfo(dtype) if dtype != "float32" else None
    rng = np.random.default_rng(0)
    data = (rng.integers(info.min, info.max + 1, (2, 8, size, size)) if info
            else rng.standard_normal((2, 8, size, size))).astype(dtype)
    expected = np.full((2, 8, out_size, out_size), -np.inf)
    for i in range(window):
        for j in range(window):
            expected = np.maximum(expected, data[:, :, i:i + stride * out_size:stride,
                                                 j:j + stride * out_size:stride])
    lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), target=target)
    args = [tvm.runtime.tensor(data), tvm.runtime.empty(expected.shape, "float32")]
    lib["main"](*args)
    assert np.array_equal(args[1].numpy(), expected.astype(np.float32))


def test_window_reduction_takes_pools_only():
    from tvm import te

    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.schedules import WindowReduction
    x = te.placeholder((4, 64, 100), "float32", "x")
    k = te.reduce_axis((0, 2), "k")
    y = te.compute((4, 64, 50), lambda b, c, w: te.sum(x[b, c, w * 2 + k], axis=k), name="s")
    assert WindowReduction._schedule(te.create_prim_func([x, y]), llvm_target()) is None


def test_small_kernels_run_serially_and_large_ones_in_parallel():
    # Waking the thread pool costs more than a small kernel saves. The work count read
    # dlight's extents as IntImm only; TVM 0.27 gives ints, so no kernel ever ran serially.
    import tvm

    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    from mmcompile.targets.tvm.schedules import SERIAL_BELOW, SerialIfSmall, _work
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})
    rule = SerialIfSmall(BlockedMatmul())
    small, large = _matmul_relu_func(8, 16, 8), _matmul_relu_func(64, 128, 96)
    assert _work(small) == 8 * 16 * 8 + 8 * 16 < SERIAL_BELOW < _work(large)
    for func, parallel in ((small, False), (large, True)):
        sch = rule.apply(func, target, False)
        assert any(i.kind.name == "Parallel" for i in sch.trace.insts) is parallel


def test_a_rule_for_reductions_is_not_tried_on_an_elementwise_kernel():
    """Most kernels are elementwise: they went through every reduction rule (each analysing
    and scheduling a copy of the function) before the fallback took them."""
    import tvm
    from tvm import te

    from mmcompile.targets.tvm.schedules import (Fallback, SerialIfSmall, cpu_rules,
                                                 has_reduction)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver3", "num-cores": 2})
    x = te.placeholder((64, 256), "float32", name="x")
    elementwise = te.create_prim_func([x, te.compute(x.shape, lambda i, j: x[i, j] * 2.0)])
    reduction = _matmul_relu_func(64, 128, 96)
    assert not has_reduction(elementwise) and has_reduction(reduction)

    class Tried:
        calls = 0

        def apply(self, func, target, tunable):
            Tried.calls += 1
            return None
    rule = SerialIfSmall(Tried(), reduces=True)
    assert rule.apply(elementwise, target, False) is None and Tried.calls == 0
    assert rule.apply(reduction, target, False) is None and Tried.calls == 1
    rules = cpu_rules()
    assert [type(r.rule) for r in rules if not r.reduces][-1] is Fallback
    assert all(r.reduces for r in rules if type(r.rule).__name__ in (
        "BlockedMatmul", "BlockedConv2d", "Int8Contraction", "RowReduction", "Reduction"))


@pytest.mark.parametrize("mcpu, lanes", [("znver3", 8), ("haswell", 8), ("skylake-avx512", 16),
                                         ("sapphirerapids", 16), ("x86-64", 4)])
def test_vector_lanes_follow_the_cpu_features(mcpu, lanes):
    # LLVM's reported vector width is 512 bits for every x86 CPU in this wheel: tiles sized
    # from it spill the accumulators on AVX2 machines.
    import tvm

    from mmcompile.targets.tvm.schedule_util import lanes_for
    assert lanes_for(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})) == lanes


def _side_operand_funcs():
    """Fused kernels whose epilogues also read a chain over another input: the expanded
    LayerNorm (``mean(x) - y * y``) and a residual join (``relu(a @ b) + relu(y + c)``, as
    in CenterFace's neck)."""
    from tvm import te
    x = te.placeholder((24, 5), name="x")
    y = te.placeholder((24, 1), name="y")
    r = te.reduce_axis((0, 5), "r")
    total = te.compute((24, 1), lambda i, j: te.sum(x[i, r], axis=r), name="total")
    mean = te.compute((24, 1), lambda i, j: total[i, j] / 5.0, name="mean")
    square = te.compute((24, 1), lambda i, j: y[i, j] * y[i, j], name="square")
    var = te.compute((24, 1), lambda i, j: mean[i, j] - square[i, j], name="var")
    eps = te.compute((24, 1), lambda i, j: var[i, j] + 1e-5, name="eps")
    std = te.compute((24, 1), lambda i, j: te.sqrt(eps[i, j]), name="std")
    layernorm = te.create_prim_func([x, y, std])
    a = te.placeholder((40, 24), name="a")
    b = te.placeholder((24, 32), name="b")
    other = te.placeholder((40, 32), name="other")
    k = te.reduce_axis((0, 24), "k")
    prod = te.compute((40, 32), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="prod")
    left = te.compute((40, 32), lambda i, j: te.max(prod[i, j], 0.0), name="left")
    shifted = te.compute((40, 32), lambda i, j: other[i, j] + 0.5, name="square")
    right = te.compute((40, 32), lambda i, j: te.max(shifted[i, j], 0.0), name="right")
    joined = te.compute((40, 32), lambda i, j: left[i, j] + right[i, j], name="joined")
    return {"layernorm": layernorm, "residual": te.create_prim_func([a, b, other, joined])}


@pytest.mark.parametrize("case", ["layernorm", "residual"])
def test_blocked_rule_inlines_epilogue_operands_that_do_not_read_the_reduction(case):
    # Computed per row tile, y * y covered every row inside each tile and the subtract read
    # rows other tiles had not written (NaN): the rule declined, and dlight's generic
    # reduction rule then computed one output element per task (CenterFace's residual 1x1
    # convolutions). Inlined into their reader, such chains are recomputed per element.
    import re

    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    func = _side_operand_funcs()[case]
    sch = BlockedMatmul._schedule(func, lanes=8)
    assert sch is not None
    scheduled = sch.mod["main"]
    assert "square" not in re.findall(r'T\.sblock\("(\w+)"\)', scheduled.script())
    rng = np.random.default_rng(0)
    arrays = [rng.uniform(1.0, 2.0, [int(d) for d in p.shape]).astype("float32")
              for p in func.params]
    if case == "layernorm":  # mean(x) - y * y stays positive: sqrt of a real number
        arrays[1] *= 0.5
    expected = _run_prim_func(func, arrays)
    assert np.isfinite(expected).all() and np.abs(expected).max() > 0.5
    np.testing.assert_allclose(_run_prim_func(scheduled, arrays), expected, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("batch, size, channel_tiles_outermost", [
    (1, 5, True), (8, 5, False), (1, 32, False)])
def test_channel_vector_tasks_on_small_nchw_planes_split_the_channels(
        batch, size, channel_tiles_outermost):
    # A 1x1 convolution vectorized along the channels writes its NCHW output one element
    # apart; with the rows outermost in the parallel loop, both threads wrote every 100-byte
    # 5x5 plane (mobilenet_text's 96 -> 576: 48.5 us on 2 threads, 25.7 on one). Batches,
    # and planes of a few KB, already keep the threads' lines apart: the order stays.
    import re

    from tvm import te

    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    x = te.placeholder((batch, 96, size, size), name="x")
    w = te.placeholder((1, 1, 96, 576), name="w")
    c = te.reduce_axis((0, 96), "c")
    y = te.compute((batch, 576, size, size),
                   lambda n, o, h, q: te.sum(x[n, c, h, q] * w[0, 0, c, o], axis=c),
                   name="conv2d_nchw")
    z = te.compute(y.shape, lambda *i: te.max(y[i], 0.0), name="relu")
    func = te.create_prim_func([x, w, z])
    sch = BlockedMatmul._schedule(func, lanes=16)
    assert sch is not None
    script = sch.mod["main"].script()
    fused = re.search(r"for (\w+) in T\.parallel", script).group(1)
    channel = re.search(rf"spatial\(576, {fused} (//|%) ", script).group(1)
    assert (channel == "//") == channel_tiles_outermost, script
    if batch == 1 and size == 5:
        rng = np.random.default_rng(0)
        arrays = [rng.standard_normal([int(d) for d in p.shape]).astype("float32")
                  for p in func.params]
        expected = np.maximum(np.einsum("nchw,co->nohw", arrays[0], arrays[1][0, 0]), 0)
        np.testing.assert_allclose(_run_prim_func(sch.mod["main"], arrays), expected,
                                   rtol=1e-4, atol=1e-4)


def test_pad_after_linear_is_not_left_uninitialised():
    class LinearPad(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 32)

        def forward(self, x):
            return nn.functional.pad(self.linear(x), (0, 1), value=1.0)

    torch.manual_seed(0)
    module, x = LinearPad().eval(), torch.randn(8, 64)
    _assert_compiled_matches_torch(module, (x,), atol=1e-5)


def _gate_times_feature_map():
    # a squeeze-excitation expand step as FuseOps hands it over: the gate (1, 96) of a
    # 24 -> 96 product, HardSigmoid, multiplied into a (96, 100) feature map
    from tvm import te
    x, w = te.placeholder((1, 24), name="x"), te.placeholder((24, 96), name="w")
    feat = te.placeholder((96, 100), name="feat")
    k = te.reduce_axis((0, 24), name="k")
    mm = te.compute((1, 96), lambda i, j: te.sum(x[i, k] * w[k, j], axis=k), name="mm")
    gate = te.compute((1, 96), lambda i, j: te.max(te.min(mm[i, j] * 0.2 + 0.5, 1.0), 0.0),
                      name="gate")
    out = te.compute((96, 100), lambda c, p: feat[c, p] * gate[0, c], name="scaled")
    return te.create_prim_func([x, w, feat, out])


def test_blocked_rule_runs_an_epilogue_that_grows_the_product_after_its_tiles():
    # Under the tiles the (96, 100) product would be written only where the (1, 96) tiles
    # reach: the rule declined and dlight's generic Reduction rule took every MobileNetV3
    # squeeze-excitation expand kernel. Now the growing block runs after the tiles.
    import re

    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    func = _gate_times_feature_map()
    sch = BlockedMatmul._schedule(func, lanes=16)
    assert sch is not None
    assert "Vectorize" in {inst.kind.name for inst in sch.trace.insts}
    scheduled = sch.mod["main"]
    assert "scaled" in re.findall(r'T\.sblock\("(\w+)"\)', scheduled.script())
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal([int(d) for d in p.shape]).astype("float32")
              for p in func.params]
    expected = _run_prim_func(func, arrays)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(_run_prim_func(scheduled, arrays), expected, rtol=1e-5,
                               atol=1e-5)


def test_blocked_matmul_rule_schedules_a_matrix_vector_product():
    # Batch-1 linear layers: normalization drops the unit row loop; without this the big
    # tensor-fusion layer of the MOSEI model fell to a column-strided GEMV (1.0 -> 0.08 ms).
    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    sch = BlockedMatmul._schedule(_matmul_relu_func(1, 128, 600), lanes=16)
    assert sch is not None
    kinds = {inst.kind.name for inst in sch.trace.insts}
    assert {"Parallel", "Vectorize"} <= kinds


def _conv_func(layout: str, stride: int, cin: int = 8, cout: int = 32, size: int = 14,
               batch: int = 1):
    from tvm import te, topi
    data = te.placeholder((batch, cin, size, size), name="x")
    shape = (3, 3, cin, cout) if layout == "HWIO" else (cout, cin, 3, 3)
    weight = te.placeholder(shape, name="w")
    out = topi.nn.conv(data, weight, stride, 1, 1, 1, "NCHW", layout)
    return te.create_prim_func([data, weight, topi.nn.relu(out)])


def _conv_vector_extent(func, lanes: int) -> int:
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    from mmcompile.targets.tvm.cpu_matmul import _vector_axis
    sch = s_tir.Schedule(func)
    main = next(b for b in normalize_prim_func(sch) if not b.is_injective())
    spatial = [i for i, k in enumerate(main.dom_kind()) if k == "S"]
    return int(sch.get(main.block_rv).iter_vars[_vector_axis(sch, main.block_rv, spatial,
                                                                lanes)].dom.extent)


def test_packed_conv_vectorizes_output_channels_when_width_does_not_fit():
    # Width 14 (not a multiple of 16 lanes) or stride 2 (strided input reads): with HWIO
    # weights the output channels are the contiguous axis and get vectorized.
    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    for stride in (1, 2):
        func = _conv_func("HWIO", stride)
        assert _conv_vector_extent(func, 16) == 32  # output channels
        assert BlockedMatmul._schedule(func, lanes=16) is not None


def test_deep_packed_conv_vectorizes_output_channels_even_when_width_fits():
    # Width 16 fits 8 lanes, but along the width every reduction step broadcasts one weight
    # per output channel (load-bound); along the packed channels it broadcasts input pixels.
    # 32 input channels x 3 x 3 = 288 deep: channels. 3 x 3 x 3 = 27 deep (a first layer):
    # the width, whose write-back to NCHW is contiguous.
    assert _conv_vector_extent(_conv_func("HWIO", 1, cin=32, cout=64, size=16), 8) == 64
    assert _conv_vector_extent(_conv_func("HWIO", 1, cin=3, cout=64, size=16), 8) == 16


def _run_prim_func(func, arrays):
    import tvm
    lib = tvm.compile(func.with_attr("global_symbol", "main"),
                      target=tvm.target.Target({"kind": "llvm"})).jit()
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*args)
    return args[-1].numpy()


# 14 wide: channel vectors; one input channel: no channel loop left after normalization
@pytest.mark.parametrize("batch, size, cin, stride",
                         [(1, 16, 32, 1), (2, 16, 32, 1), (1, 14, 32, 1), (1, 16, 1, 1),
                          (2, 32, 32, 2), (1, 32, 3, 2)])
def test_blocked_conv2d_rule_pads_per_task_and_matches_the_plain_loops(batch, size, cin, stride):
    from tvm import te, tirx, topi

    from mmcompile.targets.tvm.cpu_conv import BlockedConv2d
    data = te.placeholder((batch, cin, size, size), name="x")
    channels = 24 if size % 8 == 0 else 32  # channel vectors need a multiple of 8
    weight = te.placeholder((3, 3, cin, channels), name="w")  # HWIO, as PackConvWeights leaves it
    bias = te.placeholder((1, channels, 1, 1), name="b")
    conv = topi.nn.conv(data, weight, stride, 1, 1, 1, "NCHW", "HWIO")
    func = te.create_prim_func([data, weight, bias, topi.nn.relu(conv + bias)])
    sch = BlockedConv2d._schedule(func, lanes=8)
    assert sch is not None
    kinds = [inst.kind.name for inst in sch.trace.insts]
    assert {"Parallel", "Vectorize", "ComputeAt"} <= set(kinds)
    # the zero padding is computed inside the parallel task loop, not as a pass of its own
    pad = next(b for b in sch.get_child_blocks(sch.get_sblock("root"))
               if "pad" in sch.get(b).name_hint)
    assert sch.get(sch.get_loops(pad)[0]).kind == tirx.ForKind.PARALLEL
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal([int(d) for d in t.shape]).astype("float32")
              for t in (data, weight, bias)]
    arrays.append(np.zeros((batch, channels, size // stride, size // stride), "float32"))
    expected = _run_prim_func(func, arrays)
    # 288-term float32 sums in another order, outputs up to ~30: 1e-4 absolute
    np.testing.assert_allclose(_run_prim_func(sch.mod["main"], arrays), expected,
                               rtol=1e-5, atol=1e-4)
    assert np.abs(expected).max() > 1  # not all zeros


def test_blocked_conv2d_tasks_split_the_channels_only_when_rows_and_batch_are_too_few():
    from tvm import tirx

    from mmcompile.targets.tvm.cpu_conv import MIN_TASKS, BlockedConv2d

    def tasks(batch, cout, size):
        func = _conv_func("HWIO", 1, cin=32, cout=cout, size=size, batch=batch)
        sch = BlockedConv2d._schedule(func, lanes=8)
        loop = sch.get(sch.get_loops(sch.get_sblock("pad_temp"))[0])
        assert loop.kind == tirx.ForKind.PARALLEL
        return int(loop.extent)
    # batch 8 x 4 row blocks: every task computes all 128 channels from rows it padded once
    # (before, each of the 8 channel groups padded the same input rows again)
    assert tasks(8, 128, 16) == 8 * 4
    # batch 1, 16 rows: 4 row blocks, so the channel groups are split in 2 for MIN_TASKS
    assert tasks(1, 128, 16) == MIN_TASKS
    # batch 1, 4 rows: one row block, as many tasks as there are channel groups (128 / 16)
    assert tasks(1, 128, 4) == 8


def test_blocked_conv2d_rule_picks_its_vector_axis_and_declines_what_it_cannot_tile():
    from tvm import te, topi

    from mmcompile.targets.tvm.cpu_conv import BlockedConv2d
    # several input channels vectorize the output channels (the accumulator's layout puts
    # them last), whatever the width or stride, first layers (3 x 3 x 3) included; a single
    # input channel with a small window vectorizes the columns when the width is a multiple of
    # 8 lanes, else it is left to BlockedMatmul
    def kinds(sch):
        return {inst.kind.name for inst in sch.trace.insts}
    for size, cin, stride in ((14, 32, 1), (16, 32, 1), (16, 3, 1), (14, 3, 1), (32, 32, 2),
                              (32, 3, 2)):
        vectors_channels = BlockedConv2d._schedule(
            _conv_func("HWIO", stride, cin=cin, size=size), lanes=8)
        assert "TransformLayout" in kinds(vectors_channels), (size, cin, stride)
    single = BlockedConv2d._schedule(_conv_func("HWIO", 1, cin=1, size=16), lanes=8)
    assert "TransformLayout" not in kinds(single)
    assert BlockedConv2d._schedule(_conv_func("HWIO", 1, cin=1, size=14), lanes=8) is None
    # OIHW weights (not packed): no contiguous output-channel broadcast
    assert BlockedConv2d._schedule(_conv_func("OIHW", 1, cin=32, size=16), lanes=8) is None
    # depthwise: the data is indexed by the output channel
    data = te.placeholder((1, 16, 16, 16), name="x")
    weight = te.placeholder((16, 1, 3, 3), name="w")
    depthwise = topi.nn.depthwise_conv2d_nchw(data, weight, 1, 1, 1)
    assert BlockedConv2d._schedule(te.create_prim_func([data, weight, depthwise]), 8) is None
    # a matmul is not a convolution
    assert BlockedConv2d._schedule(_matmul_relu_func(64, 128, 96), lanes=8) is None


def test_cnn_with_blocked_convolutions_matches_torch():
    # the cache-blocked rule, batched: column vectors for the shallow first layer (3 x 3 x 3),
    # channel vectors for the deep 5x5; 18 output channels (a multiple of neither 8 lanes nor
    # the 4-channel column tile) go to BlockedMatmul
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 16, 3, padding=1)
            self.c2 = nn.Conv2d(16, 32, 5, padding=2)
            self.c3 = nn.Conv2d(32, 18, 3, stride=2, padding=1)

        def forward(self, image):
            return torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(image))))))

    torch.manual_seed(0)
    module = Net().eval()
    _assert_compiled_matches_torch(module, (torch.randn(2, 3, 32, 32),), rtol=1e-4, atol=1e-4)


def test_pack_conv_weights_rewrites_constant_weights_only():
    import tvm
    from tvm import relax
    from tvm.script import relax as R

    from mmcompile.targets.tvm.layout import PackConvWeights
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype("float32")

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((1, 3, 8, 8), "float32"), wv: R.Tensor((4, 3, 3, 3), "float32")):
            with R.dataflow():
                a = R.nn.conv2d(x, wv)
                R.output(a)
            return a

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w)))
            z = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=1))
            out = bb.emit_output(relax.op.add(y, z))
        bb.emit_func_output(out)
    packed = PackConvWeights()(bb.get())
    text = packed.script()
    assert text.count('kernel_layout="HWIO"') == 2
    assert "OIHW" not in text.replace('data_layout="NCHW"', "")
    untouched = PackConvWeights()(Mod).script()  # weight is an input, not a constant
    assert 'kernel_layout="HWIO"' not in untouched


def test_small_cnn_with_packed_weights_matches_torch():
    # Stride 2, widths 28/14 (not multiples of 16), a 1-D conv: the packed-weight paths.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 16, 3, padding=1)
            self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.c3 = nn.Conv1d(8, 32, 3, padding=1)

        def forward(self, image, audio):
            a = torch.relu(self.c2(torch.relu(self.c1(image)))).mean((2, 3))
            return a + torch.relu(self.c3(audio)).mean(2)

    torch.manual_seed(0)
    module = Net().eval()
    _assert_compiled_matches_torch(module, (torch.randn(2, 3, 28, 28), torch.randn(2, 8, 20)),
                                   atol=1e-4)


def _conv_pool_module(pool: int = 2, stride: int = 2, padding: int = 0, packed: bool = True):
    from tvm import relax
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 3)).astype("float32")
    b = rng.standard_normal((1, 16, 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 16, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            weight, layout = (w.transpose(2, 3, 1, 0).copy(), "HWIO") if packed else (w, "OIHW")
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=1,
                                           kernel_layout=layout))
            y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(b))))
            out = bb.emit_output(relax.op.nn.max_pool2d(y, pool, stride, padding))
        bb.emit_func_output(out)
    return bb.get()


def test_fuse_conv_pool_groups_packed_convolutions_with_non_overlapping_pools_only():
    from mmcompile.targets.tvm.fuse_pool import FuseConvPool

    def grouped(mod):
        return [gv.name_hint for gv, f in FuseConvPool()(mod).functions_items()
                if gv.name_hint != "main" and f.attrs and "Composite" in f.attrs]

    assert len(grouped(_conv_pool_module())) == 1
    assert grouped(_conv_pool_module(pool=3, stride=2)) == []  # overlapping windows
    assert grouped(_conv_pool_module(padding=1)) == []  # padded windows
    assert grouped(_conv_pool_module(packed=False)) == []  # OIHW: the rule cannot tile it


def _conv_pool_func(batch: int, cin: int, size: int, channels: int):
    from tvm import te, topi
    data = te.placeholder((batch, cin, size, size), name="x")
    weight = te.placeholder((3, 3, cin, channels), name="w")  # HWIO, as PackConvWeights leaves it
    bias = te.placeholder((1, channels, 1, 1), name="b")
    conv = topi.nn.relu(topi.nn.conv(data, weight, 1, 1, 1, 1, "NCHW", "HWIO") + bias)
    pooled = topi.nn.pool2d(conv, (2, 2), (2, 2), (1, 1), (0, 0, 0, 0), "max")
    return te.create_prim_func([data, weight, bias, pooled]), [data, weight, bias], pooled


# 16 rows: each parallel task pools its own rows; 7 rows (one-row tasks), or one task of all 7
# rows (an odd number: not whole windows): a pass after the tasks; 14 wide with one input
# channel: BlockedMatmul's tiles, then the pass
@pytest.mark.parametrize("rule, batch, cin, size, channels, per_task, task_rows", [
    ("BlockedConv2d", 2, 16, 16, 16, True, 4), ("BlockedConv2d", 1, 32, 14, 32, True, 4),
    ("BlockedConv2d", 1, 32, 7, 32, False, 4), ("BlockedConv2d", 2, 32, 7, 32, False, 8),
    ("BlockedMatmul", 2, 1, 14, 16, False, 4)])
def test_conv_rules_schedule_a_trailing_max_pool_and_match_the_plain_loops(
        monkeypatch, rule, batch, cin, size, channels, per_task, task_rows):
    from tvm import tirx

    from mmcompile.targets.tvm import cpu_conv
    from mmcompile.targets.tvm.cpu_conv import BlockedConv2d
    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    monkeypatch.setattr(cpu_conv, "TASK_ROWS", task_rows)
    func, inputs, pooled = _conv_pool_func(batch, cin, size, channels)
    if rule == "BlockedMatmul":  # too shallow for the blocked conv rule
        assert BlockedConv2d._schedule(func, lanes=8) is None
    sch = {"BlockedConv2d": BlockedConv2d, "BlockedMatmul": BlockedMatmul}[rule]._schedule(
        func, lanes=8)
    assert sch is not None
    pool = sch.get_sblock("pool_max")
    outer = sch.get(sch.get_loops(pool)[0])
    # per task: under the convolution's parallel loop, which the pool shares
    assert outer.kind == tirx.ForKind.PARALLEL
    # the block the pool reads: the bias + relu written back from the convolution's tiles
    names = re.findall(r'T\.sblock\("(\w+)"\)', sch.mod["main"].script())
    source = sch.get(pool).reads[0].source
    writer = next(b for b in map(sch.get_sblock, names)
                  if any(w.source.same_as(source) for w in sch.get(b).writes))
    shares = sch.get(sch.get_loops(writer)[0]).same_as(outer)
    assert shares == per_task
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal([int(d) for d in t.shape]).astype("float32") for t in inputs]
    arrays.append(np.zeros([int(d) for d in pooled.shape], "float32"))
    expected = _run_prim_func(func, arrays)
    np.testing.assert_allclose(_run_prim_func(sch.mod["main"], arrays), expected,
                               rtol=1e-5, atol=1e-4)  # sums of <= 288 terms in another order
    assert np.abs(expected).max() > 1


def test_cnn_with_conv_pool_blocks_matches_torch():
    # conv -> relu -> max-pool blocks, one kernel each: 28 (channel vectors), 14, 7 (odd: the
    # pool after the tasks); one input channel; a 3x3 stride-2 pool (overlapping: unfused)
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 16, 5, padding=2)
            self.c2 = nn.Conv2d(16, 32, 3, padding=1)
            self.c3 = nn.Conv2d(32, 64, 3, padding=1)
            self.c4 = nn.Conv2d(64, 64, 3, padding=1)

        def forward(self, image):
            x = nn.functional.max_pool2d(torch.relu(self.c1(image)), 2)
            x = nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
            x = nn.functional.max_pool2d(torch.relu(self.c3(x)), 2)
            return nn.functional.max_pool2d(torch.relu(self.c4(x)), 3, 2, 1).flatten(1)

    torch.manual_seed(0)
    module = Net().eval()
    _assert_compiled_matches_torch(module, (torch.randn(2, 1, 56, 56),), rtol=1e-4, atol=1e-4)


def test_pack_matmul_weights_reads_constant_weights_as_column_panels():
    import tvm
    from tvm import relax

    from mmcompile.targets.tvm.layout import PackMatmulWeights
    rng = np.random.default_rng(0)

    def module(columns: int, constant: bool = True):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((2, 5, 24), "float32"))
        w = relax.Var("w", relax.TensorType((24, columns), "float32"))
        weight = relax.const(rng.standard_normal((24, columns)).astype("float32"))
        with bb.function("main", [x] if constant else [x, w]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.matmul(x, weight if constant else w))
            bb.emit_func_output(out)
        return bb.get()

    original = module(32)
    packed = PackMatmulWeights(16)(original)
    kernels = [f for _, f in packed.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1 and "R.matmul" not in packed["main"].script()
    text = re.sub(r"T\.int64\((\d+)\)", r"\1", kernels[0].script())
    assert "B: T.Buffer((2, 24, 16)" in text  # 2 panels of 16 columns
    assert "call_tir" not in PackMatmulWeights(16)(module(24)).script()  # 24 % 16: unpacked
    assert "call_tir" not in PackMatmulWeights(16)(module(32, constant=False)).script()
    # the packed kernel computes the same product
    target = tvm.target.Target({"kind": "llvm"})
    data = rng.standard_normal((2, 5, 24)).astype("float32")
    results = []
    for mod in (original, packed):
        vm = relax.VirtualMachine(tvm.compile(relax.get_pipeline("zero")(mod), target=target),
                                  tvm.cpu())
        results.append(vm["main"](tvm.runtime.tensor(data)).numpy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)  # 24-term sums


def _one_op_module(shape, op):
    """A Relax module whose ``main`` applies ``op`` to one float32 input of ``shape``."""
    from tvm import relax
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(op(x))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("shape", [(3, 50), (2, 4, 16), (5, 13), (4, 65)])
@pytest.mark.parametrize("kind", ["softmax", "layer_norm"])
def test_row_reductions_vectorize_their_partial_sums_and_match_numpy(shape, kind):
    import tvm
    from tvm import te

    from mmcompile.targets.tvm.rows import RowReduction, row_layer_norm, row_softmax
    rng = np.random.default_rng(0)
    x = te.placeholder(shape, name="x")
    gamma, beta = te.placeholder(shape[-1:], name="g"), te.placeholder(shape[-1:], name="b")
    data = (rng.standard_normal(shape) * 3 + 1).astype("float32")
    if kind == "softmax":
        tensors, arrays = [x, row_softmax(x)], [data]
        e = np.exp(data - data.max(-1, keepdims=True))
        expected = e / e.sum(-1, keepdims=True)
    else:
        tensors = [x, gamma, beta, row_layer_norm(x, gamma, beta, [-1], 1e-5)]
        g, b = (rng.standard_normal(shape[-1:]).astype("float32") for _ in range(2))
        arrays = [data, g, b]
        expected = (data - data.mean(-1, keepdims=True)) / np.sqrt(data.var(-1, keepdims=True)
                                                                    + 1e-5) * g + b
    sch = RowReduction._schedule(te.create_prim_func(tensors), lanes=8)
    assert sch is not None
    # each partial reduction's lane loop is innermost and vectorized
    for block in ("lane_max", "lane_sum", "lane_sumsq"):
        try:
            lane = sch.get_loops(sch.get_sblock(block + "_update"))[-1]
        except Exception:  # noqa: BLE001 - not a block of this function
            continue
        assert sch.get(lane).kind == tvm.tirx.ForKind.VECTORIZED and sch.get(lane).extent == 8
    lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"),
                      target=tvm.target.Target({"kind": "llvm"}))
    out = tvm.runtime.tensor(np.zeros(shape, "float32"))
    lib["main"](*(tvm.runtime.tensor(a) for a in arrays), out)
    # float32 sums of up to 65 terms in another order; the fast exp (~1e-7 relative)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_row_reductions_rewrite_softmax_and_layer_norm_over_the_last_axis_only():
    from tvm import relax

    from mmcompile.targets.tvm.rows import RowReductions

    module = _one_op_module

    def layer_norm(axes):
        def op(x):
            ones = relax.const(np.ones([int(x.ty.shape[a]) for a in axes], "float32"))
            return relax.op.nn.layer_norm(x, ones, ones, axes)
        return op

    def rewritten(mod):
        text = RowReductions(lanes=8)(mod).script()
        return "call_tir" in text and "R.nn." not in text
    assert rewritten(module((2, 5, 50), lambda x: relax.op.nn.softmax(x, -1)))
    assert rewritten(module((2, 5, 50), layer_norm([-1])))
    assert rewritten(module((2, 5, 50), layer_norm([2])))
    assert not rewritten(module((2, 50, 5), lambda x: relax.op.nn.softmax(x, 1)))
    assert not rewritten(module((2, 5, 50), layer_norm([1, 2])))
    assert not rewritten(module((2, 5, 4), lambda x: relax.op.nn.softmax(x, -1)))  # < 8 lanes


@pytest.mark.parametrize("shape, axes, keepdims", [((1, 240, 10, 10), (2, 3), True),
                                                   ((8, 120, 5, 5), (2, 3), True),
                                                   ((2, 16, 40, 40), (-2, -1), False),
                                                   ((3, 8, 50), (2,), True)])
def test_row_mean_reads_each_rows_contiguous_elements_in_vectors(shape, axes, keepdims):
    # A global average pool over NCHW maps: TVM's kernel vectorized the channels, each
    # vector a gather of 16 elements a plane apart, serially (MobileNetV3's SE pools).
    import tvm
    from tvm import relax

    from mmcompile.targets.tvm.rows import RowReduction, RowReductions
    mod = RowReductions(lanes=16)(_one_op_module(
        shape, lambda x: relax.op.mean(x, list(axes), keepdims)))
    func = next(f for gv, f in mod.functions_items() if gv.name_hint.startswith("row_mean"))
    sch = RowReduction._schedule(func, lanes=16)
    assert sch is not None
    lane = sch.get(sch.get_loops(sch.get_sblock("lane_sum_update"))[-1])
    assert lane.kind == tvm.tirx.ForKind.VECTORIZED and int(lane.extent) == 16
    rows = sch.get(sch.get_loops(sch.get_sblock("row_mean"))[0])
    assert rows.kind == tvm.tirx.ForKind.PARALLEL
    data = np.random.default_rng(1).standard_normal(shape).astype("float32")
    expected = data.mean(axis=axes, keepdims=keepdims)
    got = _run_prim_func(sch.mod["main"], [data, np.full(expected.shape, np.nan, "float32")])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)  # 25-1600 terms


def test_row_reductions_take_a_mean_over_trailing_axes_only():
    from tvm import relax

    from mmcompile.targets.tvm.rows import RowReductions

    def rewritten(shape, axes):
        mod = _one_op_module(shape, lambda x: relax.op.mean(x, list(axes), True))
        text = RowReductions(lanes=16)(mod).script()
        return "R.mean" not in text
    assert rewritten((1, 240, 10, 10), (2, 3))
    assert rewritten((1, 16, 128), (2,))
    assert not rewritten((1, 16, 128), (1,))  # a pooled sequence: rows are not contiguous
    assert not rewritten((1, 16, 10, 10), (1, 3))
    assert not rewritten((4, 10), (0, 1))  # everything: no row to run in parallel
    assert not rewritten((1, 64, 3, 3), (2, 3))  # 9 elements: fewer than the lanes


@pytest.mark.parametrize("rows, padded", [(59, True), (197, True), (64, False), (65, False),
                                          (9, False)])
def test_blocked_matmul_pads_rows_without_a_register_tile_divisor(rows, padded):
    # 59 rows (a prime) got one-row register tiles: one accumulator streaming the whole
    # weight panel per row ([59, 5760] x [5760, 200] 3.2 ms, padded to 64 rows 1.1-1.4 ms).
    # Padding is taken only where it adds at most ROW_PAD_WASTE of the work (9 rows: tiles
    # of 3 instead of 16 padded rows).
    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    func = _matmul_relu_func(rows, 48, 40)
    sch = BlockedMatmul._schedule(func, lanes=16)
    assert sch is not None
    assert any(inst.kind.name == "PadEinsum" for inst in sch.trace.insts) == padded
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, 40)).astype("float32")
    b = rng.standard_normal((40, 48)).astype("float32")
    out = _run_prim_func(sch.mod["main"], [a, b, np.zeros((rows, 48), "float32")])
    np.testing.assert_allclose(out, np.maximum(a @ b, 0), rtol=1e-5, atol=1e-5)  # 40-term sums


@pytest.mark.parametrize("lead, rows, columns, epilogue", [
    ((), 59, 120, True),      # both padded: 59 -> 60 rows (AVX2 6-row tiles), 120 -> 128 columns
    ((2,), 59, 32, False),    # rows only, batched
    ((), 64, 200, True),      # columns only: 200 -> 208 (the iEEG layer's 5-vector width)
    ((), 3, 200, False),      # fewer rows than a tile: no row padding
])
def test_pack_matmul_weights_pads_rows_and_columns_to_whole_tiles(lead, rows, columns,
                                                                   epilogue):
    # Prime row counts and column counts of an odd number of vectors once left the matmul
    # unpacked or on five-vector tiles of two rows ([59, 5760] x [5760, 200]: 4.6 -> 2.7 ms,
    # one AVX2 core); the panels are now padded at compile time, the rows inside the kernel.
    import tvm
    from tvm import relax

    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.layout import PackMatmulWeights
    from mmcompile.targets.tvm.lowering import lower_cpu
    rng = np.random.default_rng(0)
    depth = 48
    weights = rng.standard_normal((depth, columns)).astype("float32")
    bias = rng.standard_normal(columns).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((*lead, rows, depth), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(weights)))
            if epilogue:
                y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(bias))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    packed = PackMatmulWeights(16)(mod)
    kernel = next(f for _, f in packed.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    text = re.sub(r"T\.int64\((\d+)\)", r"\1", kernel.script())
    padded = -(-columns // 16) * 16
    assert f"T.Buffer(({padded // 16}, {depth}, 16)" in text  # zero columns at compile time
    assert ('"matmul_rows"' in text) == (rows == 59)   # 59 rows: 6-row tiles need 60
    assert ('"matmul_corner"' in text) == (rows == 59 or padded != columns)
    data = rng.standard_normal((*lead, rows, depth)).astype("float32")
    expected = data @ weights
    if epilogue:
        expected = np.maximum(expected + bias, 0)
    np.testing.assert_allclose(_run_relax(packed, data), expected, rtol=1e-4, atol=1e-4)
    target = llvm_target()  # and through our schedules, on this host's vector width
    lowered, _ = lower_cpu(mod, target)
    vm = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(data)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # 48-term sums
    # padding that would add more than an eighth of the columns leaves the matmul unpacked
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, depth), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(np.ones((depth, 40), "float32"))))
        bb.emit_func_output(out)
    assert "call_tir" not in PackMatmulWeights(16)(bb.get()).script()  # 40 -> 48: 20 %


def _run_relax(mod, data: np.ndarray) -> np.ndarray:
    """``mod``'s ``main`` on ``data``, through TVM's ``zero`` pipeline (no mmcompile rules)."""
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(tvm.compile(relax.get_pipeline("zero")(mod),
                                          target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(data)).numpy()


@pytest.mark.parametrize("batch, width, pads, stride, dilation", [
    (1, 59, (0, 1, 0, 1), 1, 1),    # the iEEG detector's [96, 3] layer
    (2, 40, (1, 2, 1, 0), 2, 1),    # kernel spanning the height only with its row padding
    (1, 33, (0, 0, 0, 0), 1, 2),
])
def test_spanning_convolutions_become_1d_convolutions_and_match_torch(batch, width, pads,
                                                                      stride, dilation):
    from tvm import relax

    from mmcompile.targets.tvm.spanning_conv import SpanningConvs
    top, left, bottom, right = pads
    conv = nn.Conv2d(12, 20, (24 + top + bottom, 3), stride=(1, stride),
                     dilation=(1, dilation), bias=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            x = nn.functional.pad(x, (left, right, top, bottom))
            return torch.relu(self.conv(x))

    torch.manual_seed(0)
    module = Net().eval()
    _assert_compiled_matches_torch(module, (torch.randn(batch, 12, 24, width),),
                                   rtol=1e-4, atol=1e-4)  # 12 x 24..27 x 3-term sums
    # the rewrite itself: a 2-D conv with the same attributes becomes conv1d
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, 12, 24, width), "float32"))
    weight = relax.const(conv.weight.detach().numpy())
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, weight, strides=[1, stride],
                                                    padding=[top, left, bottom, right],
                                                    dilation=[1, dilation]))
        bb.emit_func_output(out)
    mod = bb.get()
    rewritten = SpanningConvs()(mod)
    assert "conv1d" in rewritten.script() and "conv2d" not in rewritten.script()
    data = np.random.default_rng(1).standard_normal((batch, 12, 24, width)).astype("float32")
    np.testing.assert_allclose(_run_relax(rewritten, data), _run_relax(mod, data),
                               rtol=1e-4, atol=1e-4)
    shallow = nn.Conv2d(2, 4, (3, 3)).weight.detach().numpy()  # 18-deep: stays 2-D
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 2, 3, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, relax.const(shallow)))
        bb.emit_func_output(out)
    assert "conv1d" not in SpanningConvs()(bb.get()).script()


@pytest.mark.parametrize("rows, limit, padded_to", [
    (59, 2, 2),     # AVX2, five vectors wide: a prime row count padded to whole 2-row tiles
    (197, 3, 3),    # three vectors wide: ViT's 197 tokens
    (59, 8, 8),     # [59, 5760] x [5760, 200] on AVX-512: 59 -> 64 rows
    (64, 8, 1),     # divisible: no padding
    (65, 6, 1),     # 5 rows divide 65: a tile of 5 is near enough the limit
    (7, 8, 1),      # fewer rows than a tile: the tile is the rows
    (9, 8, 1),      # padding to 16 would waste 7 of 16 rows: a 3-row tile instead
])
def test_row_padding_keeps_register_tiles_whole(rows, limit, padded_to):
    from mmcompile.targets.tvm.cpu_matmul import row_padding
    assert row_padding(rows, limit) == padded_to


@pytest.mark.parametrize("form, batch, pads, stride, dilation", [
    ("height", 1, (0, 0), 1, 1),   # Magika's layer: [N, C, L, 1], kernel 5 x 1
    ("width", 2, (2, 1), 2, 1),    # [N, C, 1, L], padded, strided
    ("1d", 1, (1, 1), 1, 2),       # conv1d, dilated
    ("spanning", 1, (1, 1), 1, 1),  # the iEEG detector's [96, 3] layer: 59 positions
])
def test_deep_1d_convolutions_become_im2col_matmuls_and_match_torch(form, batch, pads, stride,
                                                                    dilation):
    from tvm import relax

    from mmcompile.targets.tvm.im2col_conv import Im2colConvs
    before, after = pads
    torch.manual_seed(0)
    if form == "1d":
        conv = nn.Conv1d(128, 160, 5, stride=stride, dilation=dilation, bias=True)
        shape, pad = (batch, 128, 90), (before, after)
    elif form == "height":
        conv = nn.Conv2d(128, 160, (5, 1), stride=(stride, 1), dilation=(dilation, 1))
        shape, pad = (batch, 128, 90, 1), (0, 0, before, after)
    elif form == "spanning":  # the kernel spans all 12 rows: 16 x 12 x 3 = 576 deep
        conv = nn.Conv2d(16, 160, (12, 3), stride=(1, stride), dilation=(1, dilation))
        shape, pad = (batch, 16, 12, 59), (before, after, 0, 0)
    else:
        conv = nn.Conv2d(128, 160, (1, 5), stride=(1, stride), dilation=(1, dilation))
        shape, pad = (batch, 128, 1, 150), (before, after, 0, 0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return torch.relu(self.conv(nn.functional.pad(x, pad)))

    # 576- to 640-term sums of products of standard normals and weights ~U(+-0.04)
    _assert_compiled_matches_torch(Net().eval(), (torch.randn(*shape),), rtol=1e-4, atol=1e-4)
    # the rewrite itself: im2col (one TE kernel) and a matmul instead of the convolution
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    weight = relax.const(conv.weight.detach().numpy())
    with bb.function("main", [x]):
        with bb.dataflow():
            if form == "1d":
                call = relax.op.nn.conv1d(x, weight, strides=[stride], padding=[before, after],
                                          dilation=[dilation])
            elif form == "spanning":
                call = relax.op.nn.conv2d(x, weight, strides=[1, stride],
                                          padding=[0, before, 0, after], dilation=[1, dilation])
            elif form == "height":
                call = relax.op.nn.conv2d(x, weight, strides=[stride, 1],
                                          padding=[before, 0, after, 0], dilation=[dilation, 1])
            else:
                call = relax.op.nn.conv2d(x, weight, strides=[1, stride],
                                          padding=[0, before, 0, after], dilation=[1, dilation])
            out = bb.emit_output(call)
        bb.emit_func_output(out)
    mod = bb.get()
    rewritten = Im2colConvs()(mod)
    script = rewritten.script()
    assert "R.matmul" in script and "cls.im2col" in script and "R.nn.conv" not in script
    data = np.random.default_rng(1).standard_normal(shape).astype("float32")
    np.testing.assert_allclose(_run_relax(rewritten, data), _run_relax(mod, data),
                               rtol=1e-4, atol=1e-4)
    # shallow (16 x 3 = 48 deep), short (26 positions), 2-D, or spanning only part of the
    # rows: convolutions stay convolutions
    for x_shape, w_shape in (((1, 16, 200), (160, 16, 3)), ((1, 256, 30), (160, 256, 5)),
                             ((1, 256, 30, 30), (160, 256, 3, 3)),
                             ((1, 16, 12, 59), (160, 16, 11, 3))):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType(x_shape, "float32"))
        w = relax.const(np.zeros(w_shape, "float32"))
        op = relax.op.nn.conv1d if len(x_shape) == 3 else relax.op.nn.conv2d
        with bb.function("main", [x]):
            with bb.dataflow():
                out = bb.emit_output(op(x, w))
            bb.emit_func_output(out)
        assert "R.matmul" not in Im2colConvs()(bb.get()).script()


@pytest.mark.parametrize("width, end", [(16, 1), (2, 1), (16, 8), (64, 40), (16, None)])
def test_blocked_matmul_keeps_a_slice_of_its_product_out_of_the_write_back(width, end):
    # A slice inlined into the accumulator write-back of a conv1d wrote every column of the
    # tile into the one it kept ([..., :1] off by the whole range of the output).
    import tvm
    from tvm import relax

    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import lower_cpu
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((120, 48, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 48, width), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv1d(x, relax.const(weights)))
            if end is not None:
                y = bb.emit(relax.op.strided_slice(y, axes=[2], begin=[0], end=[end]))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    target = llvm_target()  # this host's vector width
    lowered = lower_cpu(bb.get(), target)
    lowered = lowered[0] if isinstance(lowered, tuple) else lowered
    vm = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cpu())
    data = rng.standard_normal((1, 48, width)).astype("float32")
    got = vm["main"](tvm.runtime.tensor(data)).numpy()
    expected = np.maximum(np.einsum("oc,ncw->now", weights[:, :, 0], data), 0)[:, :, :end]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # 48-term sums


@pytest.mark.parametrize("cin, k, end", [(32, 1, 1), (16, 3, 1), (6, 3, 1), (16, 3, 9),
                                         (32, 1, None)])
def test_convolutions_whose_epilogue_keeps_one_column_compute_it_after_their_tiles(cin, k, end):
    # Found by the fuzz test once it drew slices: conv + bias + ReLU6 (a chain too long to
    # inline) + a slice to the first column. Computed per tile, each tile wrote the kept
    # column from a buffer only the first column's tile fills (1x1 conv: off by 1.9 of a
    # range of 6); BlockedConv2d inlined the slice into its write-back.
    class SlicedConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(cin, 40, k, padding=k // 2)

        def forward(self, x):
            return torch.clamp(self.conv(x), 0, 6)[..., :end]
    _assert_compiled_matches_torch(SlicedConv().eval(), (torch.randn(2, cin, 15, 19),),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch, cin, cout, k", [(1, 24, 24, 2), (2, 8, 1, 2), (1, 6, 5, 3)])
def test_transposed_convolutions_with_kernel_equal_to_stride_become_shuffled_1x1_convs(
        batch, cin, cout, k):
    # The PaddleOCR detector's 2x2 stride-2 upsampling fell to the generic schedule (~40 of
    # its 111 ms); as a 1x1 conv + depth-to-space it is register-blocked.
    from tvm import relax

    from mmcompile.targets.tvm.transposed_conv import ShuffleTransposedConvs

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(cin, cout, k, stride=k)

        def forward(self, x):
            return torch.sigmoid(self.up(x))

    torch.manual_seed(0)
    module = Net().eval()
    _assert_compiled_matches_torch(module, (torch.randn(batch, cin, 7, 10),),
                                   rtol=1e-5, atol=1e-5)  # cin-term sums
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, cin, 7, 10), "float32"))
    weight = relax.const(module.up.weight.detach().numpy())
    with bb.function("main", [x]):
        with bb.dataflow():
            taken = bb.emit(relax.op.nn.conv2d_transpose(x, weight, strides=k))
            kept = bb.emit(relax.op.nn.conv2d_transpose(x, weight, strides=k, padding=1))
            out = bb.emit_output(relax.Tuple([taken, kept]))
        bb.emit_func_output(out)
    text = ShuffleTransposedConvs()(bb.get()).script()
    assert text.count("conv2d_transpose") == 1 and "R.nn.conv2d(" in text  # padded one stays


@pytest.mark.parametrize("shape, axis", [((1, 16, 4, 2100), 1), ((2, 16, 60), 1),
                                         ((3, 10, 7, 24), 2), ((5, 12, 8), 0)])
def test_column_softmax_reduces_down_the_columns_in_parallel_tasks_and_matches_numpy(shape,
                                                                                      axis):
    # YOLOv8's box head: softmax over the 16 bins of [1, 16, 4, anchors]; TVM's kernel
    # recomputed every column set in each of the 16 x 4 output rows' tasks
    import tvm
    from tvm import te

    from mmcompile.targets.tvm.column_softmax import ColumnSoftmax, column_softmax
    x = te.placeholder(shape, name="x")
    sch = ColumnSoftmax._schedule(te.create_prim_func([x, column_softmax(x, axis)]), lanes=8)
    assert sch is not None
    task = sch.get_loops(sch.get_sblock("softmax"))[0]
    columns = int(np.prod(shape)) // shape[axis]
    assert sch.get(task).kind == tvm.tirx.ForKind.PARALLEL
    chunk = columns // int(sch.get(task).extent)  # every task: a chunk of whole columns
    assert chunk >= 4 and shape[-1] % chunk == 0
    for block in ("column_max_update", "column_sum_update"):  # the axis outside, chunk inside
        inner = sch.get_loops(sch.get_sblock(block))[-1]
        assert sch.get(inner).kind == tvm.tirx.ForKind.VECTORIZED
    data = (np.random.default_rng(0).standard_normal(shape) * 3).astype("float32")
    e = np.exp(data - data.max(axis, keepdims=True))
    expected = e / e.sum(axis, keepdims=True)
    lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"),
                      target=tvm.target.Target({"kind": "llvm"}))
    out = tvm.runtime.tensor(np.zeros(shape, "float32"))
    lib["main"](tvm.runtime.tensor(data), out)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)  # fast exp


def test_column_softmax_takes_softmax_over_other_axes_only_and_matches_torch():
    from tvm import relax

    from mmcompile.targets.tvm.column_softmax import ColumnSoftmaxes

    def rewritten(shape, axis):
        module = _one_op_module(shape, lambda x: relax.op.nn.softmax(x, axis))
        return "column_max" in ColumnSoftmaxes()(module).script()
    assert rewritten((1, 16, 4, 2100), 1)
    assert not rewritten((1, 16, 4, 2100), -1)  # the last axis: RowReductions' case
    assert not rewritten((2, 16, 4), 1)  # columns too short to vectorize

    class DistributionFocal(nn.Module):  # YOLOv8's DFL: softmax over 16 bins, then expectation
        def __init__(self):
            super().__init__()
            self.project = nn.Conv2d(16, 1, 1, bias=False)
            self.project.weight.data[:] = torch.arange(16.0).view(1, 16, 1, 1)

        def forward(self, x):
            b, _, a = x.shape
            return self.project(x.view(b, 4, 16, a).transpose(2, 1).softmax(1)).view(b, 4, a)
    _assert_compiled_matches_torch(DistributionFocal().eval(), (torch.randn(1, 64, 420) * 3,),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, kernel, width", [(2, 5, 96), (7, 3, 14), (9, 5, 33)])
def test_padded_depthwise_convolutions_pad_with_a_fill_and_a_plain_copy(size, kernel, width):
    # PaddleOCR's MobileNetV3 (depthwise 5x5 + HardSwish on 2 x 96 maps): the padding loop
    # was one fused loop with a bounds test per element, scalarized with a division per
    # index (~70% of the model's time); now a fill of the border and a vectorizable copy
    from tvm import s_tir, te, topi

    from mmcompile.targets.tvm.schedule_util import parallel_pass
    x = te.placeholder((1, 24, size, width), name="x")
    padded = topi.nn.pad(x, [0, 0, kernel // 2, kernel // 2], name="pad_temp")
    sch = s_tir.Schedule(te.create_prim_func([x, padded]))
    parallel_pass(sch, sch.get_sblock("pad_temp"), 16)
    text = sch.mod["main"].script()
    assert "pad_temp_pad_const" in text
    copy = sch.get(sch.get_sblock("pad_temp"))
    assert "if_then_else" not in str(copy.body)  # the copy has no bounds test left
    data = np.random.default_rng(0).standard_normal((1, 24, size, width)).astype("float32")
    got = _run_prim_func(sch.mod["main"], [data, np.full(
        [int(d) for d in padded.shape], np.nan, "float32")])
    pad = kernel // 2
    np.testing.assert_array_equal(got, np.pad(data, [(0, 0), (0, 0), (pad, pad), (pad, pad)]))
    module = nn.Sequential(nn.Conv2d(24, 24, kernel, padding=pad, groups=24), nn.Hardswish())
    _assert_compiled_matches_torch(module.eval(), (torch.randn(1, 24, size, width),),
                                   rtol=1e-4, atol=1e-5)


def _depthwise_module(channels: int, size: int, groups: int | None = None):
    from tvm import relax
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, channels, size, size), "float32"))
    per_group = channels // (groups or channels)
    weight = relax.const(np.ones((channels, per_group, 3, 3), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, weight, padding=1,
                                                    groups=groups or channels))
        bb.emit_func_output(out)
    return bb.get()


def test_channels_last_depthwise_takes_narrow_depthwise_convolutions_only():
    from mmcompile.targets.tvm.depthwise import ChannelsLastDepthwise

    def rewritten(mod) -> bool:
        return "pad_channels_last" in ChannelsLastDepthwise()(mod).script()

    assert rewritten(_depthwise_module(32, 2))
    assert rewritten(_depthwise_module(16, 1))
    assert not rewritten(_depthwise_module(32, 8))  # wide enough for the NCHW schedule
    assert not rewritten(_depthwise_module(12, 2))  # channels fill no whole vector
    assert not rewritten(_depthwise_module(32, 2, groups=8))  # grouped, not depthwise


# CenterFace's last stages: 2x2 and 1x1 maps of 384-960 channels, which the NCHW rule declined
# (dlight's reduction rule ran them unvectorized); stride 2, dilation and 40 channels (whole
# vectors only on AVX2) take the same path.
@pytest.mark.parametrize("size, stride, dilation, channels", [
    (2, 1, 1, 48), (4, 2, 1, 40), (1, 1, 1, 64), (3, 1, 2, 32), (6, 2, 1, 16)])
def test_depthwise_convolutions_on_narrow_maps_match_torch(size, stride, dilation, channels):
    module = nn.Sequential(nn.Conv2d(channels, channels, 3, stride, padding=dilation,
                                     dilation=dilation, groups=channels), nn.ReLU6())
    _assert_compiled_matches_torch(module.eval(), (torch.randn(3, channels, size, size),),
                                   rtol=1e-5, atol=1e-5)  # 9-term sums


@pytest.mark.parametrize("sizes, limit, rows", [
    ([10, 2, 2], 8, 8), ([10, 3, 3], 8, 3), ([5, 2, 2], 8, 4), ([3, 4], 6, 4), ([7], 8, 7),
    ([2, 1], 8, 2)])
def test_fused_row_tiles_are_boxes_of_the_unfused_axes(sizes, limit, rows):
    # A tile of 6 rows of a fused [10, 3, 3] loop spans a ragged region; TVM over-approximates
    # it, and the write-back would store accumulators another tile computes.
    from mmcompile.targets.tvm.cpu_matmul import _box_rows
    assert _box_rows(sizes, limit) == rows


@pytest.mark.parametrize("batch, size, kernel", [(10, 2, 1), (5, 2, 1), (3, 2, 3), (4, 1, 1)])
def test_blocked_matmul_tiles_the_pixels_of_narrow_maps_together(batch, size, kernel):
    # A 1x1 convolution on 2x2 maps (CenterFace, batch 10) got register tiles of 2 rows (the
    # width): 2 weight-vector loads per 4 FMAs. Batch, height and width are now one row loop
    # (96 -> 576 channels: 30 -> 22 us on 2 threads, AVX-512).
    from tvm import te

    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    pad = kernel // 2
    x = te.placeholder((batch, 32, size + 2 * pad, size + 2 * pad), name="x")
    w = te.placeholder((kernel, kernel, 32, 64), name="w")
    c = te.reduce_axis((0, 32), "c")
    kh = te.reduce_axis((0, kernel), "kh")
    kw = te.reduce_axis((0, kernel), "kw")
    out = te.compute((batch, 64, size, size), lambda n, o, h, v: te.sum(
        x[n, c, h + kh, v + kw] * w[kh, kw, c, o], axis=[c, kh, kw]), name="conv")
    sch = BlockedMatmul._schedule(te.create_prim_func([x, w, out]), lanes=16)
    assert sch is not None
    fused = [len(i.inputs) for i in sch.trace.insts if i.kind.name == "Fuse"]
    assert (3 in fused) == (size > 1)  # [n, h, w] as one loop; 1x1 maps have the batch alone
    rng = np.random.default_rng(0)
    data = rng.standard_normal([int(d) for d in x.shape]).astype("float32")
    weights = rng.standard_normal([int(d) for d in w.shape]).astype("float32")
    got = _run_prim_func(sch.mod["main"], [data, weights,
                                           np.full((batch, 64, size, size), np.nan, "float32")])
    windows = np.lib.stride_tricks.sliding_window_view(data, (kernel, kernel), axis=(2, 3))
    expected = np.einsum("nchwij,ijco->nohw", windows, weights)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # 288-term sums


@pytest.mark.parametrize("depth, tasks", [(1280, 8), (128, 16)])
def test_blocked_matmul_sweeps_rows_under_each_panel_of_weights_larger_than_l2(depth, tasks):
    # magika's [5, 1] convolution (2.6 MB of weights, rows in tiles of 4) streamed every
    # column panel once per row tile from L3: panels now go outermost, 4 vectors wide
    # (2.7 -> 2.1-2.3 ms, AVX-512). Small weights keep 2-vector tiles, rows outermost.
    import re
    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    sch = BlockedMatmul._schedule(_matmul_relu_func(4, 512, depth), lanes=16)
    assert sch is not None
    text = sch.mod["main"].script()
    assert re.search(r"T\.parallel\((\d+)\)", text).group(1) == str(tasks)  # 512 / (16 x nj)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, depth)).astype("float32")
    b = rng.standard_normal((depth, 512)).astype("float32")
    out = _run_prim_func(sch.mod["main"], [a, b, np.zeros((4, 512), "float32")])
    np.testing.assert_allclose(out, np.maximum(a @ b, 0), rtol=1e-4, atol=1e-3)  # 1280-term sums


@pytest.mark.parametrize("size, kernel, channels", [(16, 3, 96), (20, 5, 16), (9, 3, 8)])
def test_stride_two_convolutions_read_a_deinterleaved_padding_and_match_torch(size, kernel,
                                                                               channels):
    # A stride-2 depthwise convolution vectorized along its output width loaded every tap as
    # a gather (MobileNets' downsampling layers: 5x5 on [1, 16, 80, 160] 134 us, now 55 us);
    # its padding is now stored even / odd columns apart. An odd padded width (9 + 2) keeps
    # the plain layout.
    from tvm import te, topi

    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    pad = kernel // 2
    x = te.placeholder((2, channels, size, size), name="x")
    w = te.placeholder((channels, 1, kernel, kernel), name="w")
    out = topi.nn.group_conv2d_nchw(x, w, 2, pad, 1, channels)
    sch = BlockedMatmul._schedule(te.create_prim_func([x, w, out]), lanes=16)
    assert sch is not None
    padded = [b for b in sch.mod["main"].body.block.alloc_buffers if b.name == "pad_temp"]
    assert (len(padded[0].shape) == 5) == ((size + 2 * pad) % 2 == 0)
    module = nn.Sequential(nn.Conv2d(channels, channels, kernel, 2, padding=pad,
                                     groups=channels), nn.Hardswish())
    _assert_compiled_matches_torch(module.eval(), (torch.randn(2, channels, size, size),),
                                   rtol=1e-5, atol=1e-5)  # 9- and 25-term sums


# YOLO-audio's concatenations, splits and nearest upsampling: every axis was fused into one
# vectorized loop, so each lane divided its index back into (channel, row, column) and picked
# its concatenation input per lane; LLVM scalarized that (a 3-way concat of 32x20x20 maps took
# 27.6 us, 1.7 us vectorized along the row).
@pytest.mark.parametrize("size", [(20, 20), (40, 40), (3, 7), (5, 3), (1, 1), (2, 8), (6, 12)])
def test_fallback_vectorizes_copies_along_their_rows(size):
    import tvm
    from tvm import te, topi

    from mmcompile.targets.tvm.schedules import Fallback
    h, w = size
    parts = [te.placeholder((1, c, h, w), name=f"x{i}") for i, c in enumerate((32, 16, 8))]
    joined = topi.concatenate(parts, axis=1)
    func = te.create_prim_func([*parts, joined])
    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    sch = Fallback().apply(func, target, False)
    scheduled = sch.mod["main"]
    vector = _vector_loops(scheduled)
    if w % 4 == 0 or (h * w) % 16 == 0:
        (name, lanes), = vector
        assert lanes in (4, 8, 16) and (w % lanes == 0 or (h * w) % lanes == 0)
        assert "ax0" not in name  # the channel axis (the unit batch is dropped) stays outside
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal([int(d) for d in p.shape]).astype("float32") for p in parts]
    got = _run_prim_func(scheduled, [*arrays, np.full((1, 56, h, w), np.nan, "float32")])
    np.testing.assert_array_equal(got, np.concatenate(arrays, axis=1))


def _vector_loops(func) -> list[tuple[str, int]]:
    """(loop name, lanes) of each vectorized loop."""
    return [(name, int(n)) for name, n in re.findall(
        r"for (\w+) in T\.vectorized\((?:T\.int\d+\()?(\d+)", func.script())]


def test_fallback_keeps_a_nearest_upsample_vectorized_by_row():
    import tvm
    from tvm import te, topi

    from mmcompile.targets.tvm.schedules import Fallback
    x = te.placeholder((1, 16, 10, 10), name="x")
    skip = te.placeholder((1, 8, 20, 20), name="skip")
    up = topi.image.resize2d(x, [0.0] * 4, (20, 20), method="nearest_neighbor",
                             coordinate_transformation_mode="asymmetric",
                             rounding_method="floor")
    joined = topi.concatenate([up, skip], axis=1)
    func = te.create_prim_func([x, skip, joined])
    target = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    scheduled = Fallback().apply(func, target, False).mod["main"]
    vector = _vector_loops(scheduled)
    assert vector and all(lanes == 4 and "ax0" not in name for name, lanes in vector)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1, 16, 10, 10)).astype("float32")
    b = rng.standard_normal((1, 8, 20, 20)).astype("float32")
    got = _run_prim_func(scheduled, [a, b, np.full((1, 24, 20, 20), np.nan, "float32")])
    np.testing.assert_array_equal(got, np.concatenate([a.repeat(2, 2).repeat(2, 3), b], 1))


def test_blocked_matmul_reads_a_1x1_convolution_input_without_a_copy():
    # a convolution without padding still gets a pad_temp block, a plain copy of its input;
    # run as its own pass it cost as much as the 1x1 convolution (240 -> 40 channels on 10x10
    # maps: 266 -> 141 us); inlined, the reduction reads the input itself
    from tvm import te, topi

    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    x = te.placeholder((2, 48, 10, 10), name="x")
    w = te.placeholder((40, 48, 1, 1), name="w")
    out = topi.nn.relu(topi.nn.conv2d_nchw(x, w, 1, 0, 1))
    func = te.create_prim_func([x, w, out])
    assert "pad_temp" in func.script()
    sch = BlockedMatmul._schedule(func, 16)
    scheduled = sch.mod["main"]
    assert "pad_temp" not in scheduled.script()
    rng = np.random.default_rng(2)
    data = rng.standard_normal((2, 48, 10, 10)).astype("float32")
    weight = rng.standard_normal((40, 48, 1, 1)).astype("float32")
    got = _run_prim_func(scheduled, [data, weight, np.full((2, 40, 10, 10), np.nan, "float32")])
    want = np.maximum(np.einsum("oc,nchw->nohw", weight[:, :, 0, 0], data), 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _conv_with_epilogue(epilogue):
    from tvm import te, topi
    x = te.placeholder((2, 32, 6, 6), name="x")
    w = te.placeholder((48, 32, 1, 1), name="w")
    bias = te.placeholder((1, 48, 1, 1), name="bias")
    out = epilogue(topi.add(topi.nn.conv2d_nchw(x, w, 1, 0, 1), bias))
    return te.create_prim_func([x, w, bias, out])


def _hardswish(t):
    from tvm import topi
    return topi.multiply(t, topi.divide(topi.clip(topi.add(t, 3.0), 0.0, 6.0), 6.0))


def test_blocked_matmul_folds_a_hardswish_into_the_accumulator_write_back():
    # HardSwish after a bias is 6 blocks; computed per tile each made a pass through a
    # full-size intermediate buffer. Folded, only the accumulator and the output remain.
    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    scheduled = BlockedMatmul._schedule(_conv_with_epilogue(_hardswish), 16).mod["main"]
    text = scheduled.script()
    assert "T_add_intermediate" not in text and "T_divide" not in text
    rng = np.random.default_rng(3)
    data = rng.standard_normal((2, 32, 6, 6)).astype("float32")
    weight = rng.standard_normal((48, 32, 1, 1)).astype("float32")
    bias = rng.standard_normal((1, 48, 1, 1)).astype("float32")
    got = _run_prim_func(scheduled, [data, weight, bias,
                                     np.full((2, 48, 6, 6), np.nan, "float32")])
    pre = np.einsum("oc,nchw->nohw", weight[:, :, 0, 0], data) + bias
    np.testing.assert_allclose(got, pre * np.clip(pre + 3, 0, 6) / 6, rtol=1e-4, atol=1e-4)


def test_blocked_matmul_keeps_a_growing_epilogue_per_tile():
    # each op reads the one before twice: folded, the expression doubles at every step
    from tvm import topi

    from mmcompile.targets.tvm.cpu_matmul import EPILOGUE_TEXT_LIMIT, BlockedMatmul

    def squares(t):
        for _ in range(7):
            t = topi.add(topi.multiply(t, t), t)
        return t
    scheduled = BlockedMatmul._schedule(_conv_with_epilogue(squares), 16).mod["main"]
    assert "T_multiply" in scheduled.script()  # intermediate blocks kept, computed per tile
    assert EPILOGUE_TEXT_LIMIT < 10_000
    rng = np.random.default_rng(4)
    data = rng.standard_normal((2, 32, 6, 6)).astype("float32") * 0.01
    weight = rng.standard_normal((48, 32, 1, 1)).astype("float32") * 0.1
    bias = rng.standard_normal((1, 48, 1, 1)).astype("float32") * 0.01
    got = _run_prim_func(scheduled, [data, weight, bias,
                                     np.full((2, 48, 6, 6), np.nan, "float32")])
    want = np.einsum("oc,nchw->nohw", weight[:, :, 0, 0], data) + bias
    for _ in range(7):
        want = want * want + want
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_blocked_matmul_tiles_an_odd_number_of_vectors_three_wide():
    # 48 output channels on AVX-512 are 3 vectors: tiles one vector wide cost a load and a
    # broadcast per FMA or two; 3 wide the weights' loads are shared by the tile's rows
    from tvm import te, topi

    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    x = te.placeholder((2, 40, 10, 10), name="x")
    w = te.placeholder((1, 1, 40, 48), name="w")  # packed HWIO, as the weight packing makes
    rc = te.reduce_axis((0, 40), name="rc")
    out = te.compute((2, 48, 10, 10), lambda n, o, h, v: te.sum(
        x[n, rc, h, v] * w[0, 0, rc, o], axis=rc), name="conv")
    func = te.create_prim_func([x, w, topi.nn.relu(out)])
    scheduled = BlockedMatmul._schedule(func, 16).mod["main"]
    assert re.search(r"T\.unroll\((?:T\.int\d+\()?3\b", scheduled.script())
    rng = np.random.default_rng(5)
    data = rng.standard_normal((2, 40, 10, 10)).astype("float32")
    weight = rng.standard_normal((1, 1, 40, 48)).astype("float32")
    got = _run_prim_func(scheduled, [data, weight, np.full((2, 48, 10, 10), np.nan, "float32")])
    want = np.maximum(np.einsum("co,nchw->nohw", weight[0, 0], data), 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _pointwise_module(channels: int, size: int, kernel: int = 1, stride: int = 1):
    """A conv2d (bias, HardSwish) whose output is gated by a per-channel input, as in a
    squeeze-excitation block."""
    from tvm import relax
    rng = np.random.default_rng(6)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, channels, size, size), "float32"))
    gate = relax.Var("gate", relax.TensorType((2, 24, 1, 1), "float32"))
    weight = relax.const(rng.standard_normal((24, channels, kernel, kernel)).astype("float32"))
    bias = relax.const(rng.standard_normal((1, 24, 1, 1)).astype("float32"))
    with bb.function("main", [x, gate]):
        with bb.dataflow():
            t = bb.emit(relax.op.add(relax.op.nn.conv2d(x, weight, strides=stride), bias))
            t = bb.emit(relax.op.multiply(t, relax.op.divide(
                relax.op.clip(relax.op.add(t, relax.const(3.0)), 0, 6), relax.const(6.0))))
            out = bb.emit_output(relax.op.multiply(t, gate))
        bb.emit_func_output(out)
    return bb.get()


def _run_zero_pipeline(mod, feeds):
    """``mod``'s main on ``feeds`` (numpy), built for the host with the zero pipeline."""
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(tvm.compile(relax.get_pipeline("zero")(mod),
                                          target=tvm.target.Target({"kind": "llvm"})),
                              tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(f) for f in feeds)).numpy()


def test_shallow_1x1_convolutions_become_1d_convolutions_over_their_pixels():
    # 16 -> 72 channels on 40x40 maps (MobileNetV3's expansion): a 40-pixel row is 5 AVX2
    # vectors, tiles one vector wide; over the 1600 pixels of a map tiles are two wide. The
    # bias, HardSwish and a per-channel gate stay in the convolution's kernel.
    from tvm import relax

    from mmcompile.targets.tvm.pointwise_conv import FlatPointwiseConvs
    mod = _pointwise_module(16, 40)
    rewritten = FlatPointwiseConvs(8)(mod)
    assert "conv1d" in rewritten.script() and "conv2d" not in rewritten.script()
    fused = relax.get_pipeline("zero")(rewritten)
    kernels = [gv.name_hint for gv, f in fused.functions_items() if "conv1d" in gv.name_hint]
    assert len(kernels) == 1 and "clip" in kernels[0] and "multiply" in kernels[0], kernels
    rng = np.random.default_rng(7)
    feeds = [rng.standard_normal((2, 16, 40, 40)).astype("float32"),
             rng.standard_normal((2, 24, 1, 1)).astype("float32")]
    results = [_run_zero_pipeline(m, feeds) for m in (mod, rewritten)]
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)  # 16-term sums
    for case in (dict(channels=64, size=40),           # deep: vectorized along the channels
                 dict(channels=16, size=32),           # 32-pixel rows: whole two-vector tiles
                 dict(channels=16, size=10),           # 100 pixels: no whole vectors
                 dict(channels=16, size=40, kernel=3),
                 dict(channels=16, size=40, stride=2)):
        assert "conv1d" not in FlatPointwiseConvs(8)(_pointwise_module(**case)).script(), case


def test_deep_1x1_convolutions_whose_channels_fill_no_vector_are_flattened_too():
    # mobilenet_text's 88 -> 24 on 20x20 (AVX-512): 24 channels are no whole vector, so the
    # vectors ran along the rows, each padded from 20 to 32 pixels (its input copied padded):
    # 41 us on 1 or 2 threads; over the map's 400 pixels (25 vectors) 22 / 13 us
    from mmcompile.targets.tvm.pointwise_conv import FlatPointwiseConvs
    mod = _pointwise_module(88, 20)
    rewritten = FlatPointwiseConvs(16)(mod)
    assert "conv1d" in rewritten.script() and "conv2d" not in rewritten.script()
    assert "conv1d" not in FlatPointwiseConvs(8)(mod).script()  # 24 = 3 AVX2 vectors
    assert "conv1d" not in FlatPointwiseConvs(16)(_pointwise_module(88, 32)).script()  # whole
    rng = np.random.default_rng(8)
    feeds = [rng.standard_normal((2, 88, 20, 20)).astype("float32"),
             rng.standard_normal((2, 24, 1, 1)).astype("float32")]
    results = [_run_zero_pipeline(m, feeds) for m in (mod, rewritten)]
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4, atol=1e-4)  # 88-term sums


def test_flattened_1x1_convolutions_in_a_squeeze_excitation_block_match_torch():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = nn.Conv2d(16, 72, 1)
            self.squeeze = nn.Conv2d(72, 72, 1)

        def forward(self, x):
            y = nn.functional.hardswish(self.expand(x))
            gate = torch.sigmoid(self.squeeze(y.mean((2, 3), keepdim=True)))
            return y * gate

    torch.manual_seed(0)
    _assert_compiled_matches_torch(Block().eval(), (torch.randn(2, 16, 40, 20),),
                                   rtol=1e-4, atol=1e-4)  # 16- and 72-term sums


@pytest.mark.parametrize("channels, wide, rows", [(24, 3, 3), (40, 5, 2), (72, 3, 3)])
def test_blocked_matmul_tiles_avx2_columns_of_three_or_five_vectors_that_wide(channels, wide,
                                                                                rows):
    # AVX2 (8 lanes, 16 registers): 24 / 72 output channels take tiles three vectors wide by
    # 3 rows, 40 five wide by 2 (4 rows of three spilled accumulators in the reduction loop)
    from tvm import te, topi

    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    x = te.placeholder((2, 88, 6, 6), name="x")
    w = te.placeholder((1, 1, 88, channels), name="w")  # packed HWIO
    rc = te.reduce_axis((0, 88), name="rc")
    out = te.compute((2, channels, 6, 6), lambda n, o, h, v: te.sum(
        x[n, rc, h, v] * w[0, 0, rc, o], axis=rc), name="conv")
    func = te.create_prim_func([x, w, topi.nn.relu(out)])
    text = BlockedMatmul._schedule(func, 8).mod["main"].script()
    unrolled = {int(n) for n in re.findall(r"T\.unroll\((?:T\.int\d+\()?(\d+)\b", text)}
    assert wide in unrolled and rows in unrolled and not unrolled - {1, wide, rows}, unrolled
    rng = np.random.default_rng(8)
    data = rng.standard_normal((2, 88, 6, 6)).astype("float32")
    weight = rng.standard_normal((1, 1, 88, channels)).astype("float32")
    scheduled = BlockedMatmul._schedule(func, 8).mod["main"]
    got = _run_prim_func(scheduled, [data, weight,
                                     np.full((2, channels, 6, 6), np.nan, "float32")])
    want = np.maximum(np.einsum("co,nchw->nohw", weight[0, 0], data), 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # 88-term sums


@pytest.mark.parametrize("shape, axes, tiled", [
    ((508, 512), (1, 0), True),         # Magika's GEMM output back to channels-first
    ((2, 24, 40), (0, 2, 1), True),     # batched: the batch stays an outer parallel axis
    ((4, 12, 20), (0, 2, 1), False),    # 12 rows: no whole tile of 8
    ((3, 8, 16), (1, 0, 2), False),     # the innermost axis stays contiguous: no transpose
])
def test_transposing_copies_are_tiled_and_match_numpy(shape, axes, tiled):
    # Untiled, each output row walked a whole input column and the next row read the same
    # lines again (Magika's [508, 512] transpose: 0.73 -> 0.24 ms, one thread, znver3).
    import tvm
    from tvm import relax

    import mmcompile.targets.tvm.schedule_util as util
    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import lower_cpu
    taken = []
    original = util._transposed_copy

    def spy(*args):
        taken.append(original(*args))
        return taken[-1]

    target = llvm_target()
    module = _one_op_module(shape, lambda x: relax.op.permute_dims(x, axes))
    util._transposed_copy = spy
    try:
        lowered, _ = lower_cpu(module, target)
    finally:
        util._transposed_copy = original
    assert any(taken) == tiled
    vm = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cpu())
    data = np.random.default_rng(0).standard_normal(shape).astype("float32")
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(data)).numpy(),
                                  data.transpose(axes))  # a copy: exact


@pytest.mark.parametrize("dtype, swapped", [("int32", False), ("int64", True), ("uint8", False)])
def test_one_hot_matmuls_become_row_lookups_and_match_numpy(dtype, swapped):
    # Magika's byte embedding: Equal(ids[..., None], range(257)) -> Cast -> MatMul -> GELU;
    # the one-hot matrix and its GEMM took 1.5 of 12 ms, the lookup 0.15 (one thread).
    import tvm
    from tvm import relax

    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import lower_cpu
    from mmcompile.targets.tvm.one_hot import OneHotMatmuls
    rng = np.random.default_rng(0)
    depth, width = (256 if dtype == "uint8" else 19), 24  # 256: no uint8 id is outside
    weights = rng.standard_normal((depth, width)).astype("float32")

    def module(table, w):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((2, 30, 1), dtype))
        with bb.function("main", [x]):
            with bb.dataflow():
                pair = (relax.const(table), x) if swapped else (x, relax.const(table))
                hot = bb.emit(relax.op.astype(relax.op.equal(*pair), "float32"))
                y = bb.emit(relax.op.matmul(hot, relax.const(w)))
                out = bb.emit_output(relax.op.nn.relu(y))
            bb.emit_func_output(out)
        return bb.get()

    mod = module(np.arange(depth, dtype=dtype).reshape(1, 1, depth), weights)
    assert "R.matmul" not in OneHotMatmuls()(mod).script()
    low, high = (0, 256) if dtype == "uint8" else (-3, depth + 3)  # some outside the range
    ids = rng.integers(low, high, (2, 30, 1)).astype(dtype)
    expected = np.maximum(((ids == np.arange(depth)).astype("float32")) @ weights, 0)
    target = llvm_target()
    lowered, _ = lower_cpu(mod, target)
    vm = relax.VirtualMachine(tvm.compile(lowered, target=target), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(ids)).numpy(), expected)
    # not a range, or weights that 0 * w would turn into NaN: the matmul stays
    shuffled = rng.permutation(depth).astype(dtype).reshape(1, 1, depth)
    assert "R.matmul" in OneHotMatmuls()(module(shuffled, weights)).script()
    infinite = weights.copy()
    infinite[3, 5] = np.inf
    table = np.arange(depth, dtype=dtype).reshape(1, 1, depth)
    assert "R.matmul" in OneHotMatmuls()(module(table, infinite)).script()


def test_pack_matmul_weights_packs_matmuls_with_a_symbolic_batch():
    # A dynamic-batch artifact's matmuls keep their packed panels (no row padding there).
    import tvm
    from tvm import relax

    from mmcompile.targets.tvm.layout import PackMatmulWeights
    batch = tvm.tirx.Var("batch", "int64")
    weights = np.random.default_rng(0).standard_normal((24, 120)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, 7, 24), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(weights)))
        bb.emit_func_output(out)
    packed = PackMatmulWeights(16)(bb.get())
    kernel = next(f for _, f in packed.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    text = re.sub(r"T\.int64\((\d+)\)", r"\1", kernel.script())
    assert "(8, 24, 16)" in text and '"matmul_corner"' in text and '"matmul_rows"' not in text
    data = np.random.default_rng(1).standard_normal((3, 7, 24)).astype("float32")
    np.testing.assert_allclose(_run_relax(packed, data), data @ weights, rtol=1e-4, atol=1e-4)


def _depthwise_func(batch, channels, size, kernel, stride=1, dilation=1, per_group=1,
                    epilogue=None, width=None):
    from tvm import te, topi
    x = te.placeholder((batch, channels, size, width or size), name="x")
    w = te.placeholder((channels, per_group, kernel, kernel), name="w")
    bias = te.placeholder((1, channels, 1, 1), name="bias")
    pad = dilation * (kernel // 2)
    out = topi.nn.group_conv2d_nchw(x, w, stride, pad, dilation, channels // per_group)
    out = (epilogue or (lambda t: t))(topi.add(out, bias))
    return te.create_prim_func([x, w, bias, out])


# MobileNetV3's depthwise layers (mobilenet_text, PaddleOCR): 5x5 on 10x10 and 5x5 maps with
# HardSwish, stride-2 3x3 / 5x5 downsampling, a 7x7 window (unrolled along its rows only),
# dilation, batch 1 (no batch loop left), widths of one partial vector (5), one and a partial
# (10, 20: a 20-wide row is three vectors), and split into vectors (40, 28), a width that is
# not the height, and channel counts that fill no vector (the vector is along the width).
@pytest.mark.parametrize("batch, channels, size, kernel, stride, dilation, width, lanes", [
    (2, 24, 10, 5, 1, 1, None, 8), (1, 16, 5, 5, 1, 1, None, 8), (2, 8, 20, 3, 2, 1, None, 8),
    (1, 12, 20, 5, 2, 1, None, 8), (2, 8, 9, 7, 1, 1, None, 8), (1, 8, 12, 3, 1, 2, None, 8),
    (1, 8, 40, 3, 1, 1, None, 8), (2, 4, 7, 3, 1, 1, 28, 8), (1, 8, 6, 3, 1, 1, 20, 8),
    (2, 8, 10, 5, 1, 1, 80, 16), (1, 8, 20, 3, 2, 1, None, 16)])  # AVX-512's 16 lanes
def test_depthwise_planes_pad_each_plane_in_its_task_and_match_the_plain_loops(
        batch, channels, size, kernel, stride, dilation, width, lanes):
    from tvm import tirx

    from mmcompile.targets.tvm.cpu_depthwise import DepthwisePlanes
    func = _depthwise_func(batch, channels, size, kernel, stride, dilation,
                           epilogue=_hardswish, width=width)
    sch = DepthwisePlanes._schedule(func, lanes=lanes)
    assert sch is not None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    # one parallel loop over the planes holds everything: the padding runs inside each
    # plane's task; the HardSwish is folded into the write-back (no block of its own)
    outer = {sch.get(sch.get_loops(b)[0]) for b in blocks}
    assert len(outer) == 1 and outer.pop().kind == tirx.ForKind.PARALLEL
    assert any("pad" in name for name in names), names
    assert not any("T_divide" in name or "T_add" in name for name in names), names
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32")
              for p in func.params[:3]]
    out = [int(d) for d in func.params[3].ty.shape]
    expected = _run_prim_func(func, arrays + [np.zeros(out, "float32")])
    got = _run_prim_func(sch.mod["main"], arrays + [np.full(out, np.nan, "float32")])
    # up to 49-term float32 sums of unit normals, in another order
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected).max() > 1


def test_depthwise_planes_decline_what_is_not_a_depthwise_convolution_or_would_gather():
    from tvm import te, topi

    from mmcompile.targets.tvm.cpu_depthwise import DepthwisePlanes

    def taken(func) -> bool:
        return DepthwisePlanes._schedule(func, lanes=8) is not None

    assert taken(_depthwise_func(1, 16, 10, 3))
    assert not taken(_depthwise_func(1, 16, 10, 3, per_group=2))  # grouped
    assert not taken(_conv_func("OIHW", 1, cin=8, size=16))  # dense
    assert not taken(_matmul_relu_func(64, 128, 96))
    assert not taken(_depthwise_func(1, 16, 9, 3, stride=2))  # 11 padded columns: no
    assert not taken(_depthwise_func(1, 16, 12, 3, stride=3))  # even / odd split; stride 3
    assert not taken(_depthwise_func(1, 16, 3, 3))  # 3 columns: the channels-last form
    # stride 2 without padding reads the input itself: each vector load a gather
    x = te.placeholder((1, 16, 12, 12), name="x")
    w = te.placeholder((16, 1, 3, 3), name="w")
    assert not taken(te.create_prim_func([x, w, topi.nn.group_conv2d_nchw(x, w, 2, 0, 1, 16)]))


@pytest.mark.parametrize("width, height, tile", [
    (10, 10, (10, 5)), (5, 5, (5, 5)), (20, 20, (20, 4)), (40, 40, (8, 10)), (80, 80, (16, 5)),
    (320, 160, (32, 2)), (7, 7, (7, 7)), (160, 1, (32, 1)),
    (28, 7, (14, 1))])  # 7 rows of two vectors: no divisor fits 6 rows, one row a tile
def test_depthwise_register_tiles_stay_within_the_accumulator_registers(width, height, tile):
    from mmcompile.targets.tvm.cpu_depthwise import MAX_ACCUMULATORS, _tile
    assert _tile(width, height, 8) == tile
    columns, rows = tile
    assert rows * -(-columns // 8) <= MAX_ACCUMULATORS


def test_mobilenet_v3_block_with_depthwise_planes_matches_torch():
    class Block(nn.Module):  # expand, depthwise 5x5 + HardSwish, squeeze-excitation, project
        def __init__(self):
            super().__init__()
            self.expand = nn.Sequential(nn.Conv2d(16, 48, 1), nn.Hardswish())
            self.depthwise = nn.Sequential(nn.Conv2d(48, 48, 5, padding=2, groups=48),
                                           nn.Hardswish())
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(48, 12, 1), nn.ReLU(),
                                      nn.Conv2d(12, 48, 1), nn.Hardsigmoid())
            self.project = nn.Conv2d(48, 16, 1)

        def forward(self, x):
            y = self.depthwise(self.expand(x))
            return x + self.project(y * self.gate(y))
    _assert_compiled_matches_torch(Block().eval(), (torch.randn(2, 16, 10, 10),),
                                   rtol=1e-4, atol=1e-4)  # 48- and 25-term sums


def _fast_silu(t):
    """SiLU as TVM legalizes it with fast math: ``x / (1 + fast_exp(-x))`` (x read twice)."""
    from tvm import topi
    return topi.divide(t, topi.add(topi.fast_exp(topi.negative(t)), 1.0))


def _silu_reference(pre):
    return pre / (1 + np.exp(-pre))


@pytest.mark.parametrize("stride, size", [(2, 16), (1, 10), (1, 20)])
def test_blocked_conv2d_takes_a_silu_chain_as_one_vectorized_pass(stride, size):
    # The chain reads the biased output twice, so it does not fold into the write-back; the
    # rule used to decline such convolutions (YOLO-style Conv + SiLU went to BlockedMatmul).
    from tvm import te, tirx, topi

    from mmcompile.targets.tvm.cpu_conv import BlockedConv2d
    data = te.placeholder((1, 8, size, size), name="x")
    weight = te.placeholder((3, 3, 8, 16), name="w")  # HWIO, as PackConvWeights leaves it
    bias = te.placeholder((1, 16, 1, 1), name="b")
    conv = topi.nn.conv(data, weight, stride, 1, 1, 1, "NCHW", "HWIO")
    func = te.create_prim_func([data, weight, bias, _fast_silu(conv + bias)])
    sch = BlockedConv2d._schedule(func, lanes=8)
    assert sch is not None
    root = sch.get_child_blocks(sch.get_sblock("root"))
    last = sch.get(root[-1])
    assert "T_divide" in last.name_hint and len(last.reads) >= 1
    loops = [sch.get(loop) for loop in sch.get_loops(root[-1])]
    assert loops[0].kind == tirx.ForKind.PARALLEL  # its own parallel pass after the tiles
    side = size // stride
    if side % 8 == 0 or side * side % 8 == 0:  # rows of 20: vectors across rows
        assert loops[-1].kind == tirx.ForKind.VECTORIZED
    else:  # 10 x 10 (100 elements) is left to LLVM's loop vectorizer
        assert loops[-1].kind != tirx.ForKind.VECTORIZED
    assert "T_fast_exp" not in sch.mod["main"].script()  # inlined: no temporaries
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal([int(d) for d in t.shape]).astype("float32")
              for t in (data, weight, bias)]
    arrays.append(np.full((1, 16, size // stride, size // stride), np.nan, "float32"))
    pre = _run_prim_func(te.create_prim_func([data, weight, bias, conv + bias]),
                         arrays[:3] + [arrays[3].copy()])
    np.testing.assert_allclose(_run_prim_func(sch.mod["main"], arrays), _silu_reference(pre),
                               rtol=1e-4, atol=1e-4)


def test_contiguous_rows_vectorizes_across_rows_only_where_every_buffer_is_contiguous():
    # An elementwise pass over 20 x 20 maps: rows are not whole vectors, the plane is. A
    # per-channel operand (not indexed by the fused axes) keeps it; an operand indexed by the
    # rows only (a broadcast along the columns) or read transposed would need a division per
    # lane, and is refused.
    from tvm import s_tir, te, tirx

    from mmcompile.targets.tvm.schedule_util import contiguous_rows
    x = te.placeholder((8, 20, 20), name="x")
    per_channel = te.placeholder((8,), name="c")
    per_row = te.placeholder((8, 20), name="r")
    cases = {
        "channel": (te.compute(x.shape, lambda c, h, w: x[c, h, w] * per_channel[c], "y"),
                    [x, per_channel], True),
        "row": (te.compute(x.shape, lambda c, h, w: x[c, h, w] + per_row[c, h], "y"),
                [x, per_row], False),
        "transposed": (te.compute(x.shape, lambda c, h, w: x[c, w, h], "y"), [x], False),
    }
    rng = np.random.default_rng(3)
    for name, (out, ins, applies) in cases.items():
        sch = s_tir.Schedule(te.create_prim_func([*ins, out]))
        assert contiguous_rows(sch, sch.get_sblock("y"), 16) is applies, name
        if not applies:
            continue
        loops = [sch.get(loop) for loop in sch.get_loops(sch.get_sblock("y"))]
        assert loops[-1].kind == tirx.ForKind.VECTORIZED and int(loops[-1].extent) == 16
        assert loops[0].kind == tirx.ForKind.PARALLEL
        arrays = [rng.standard_normal([int(d) for d in t.shape]).astype("float32")
                  for t in ins]
        got = _run_prim_func(sch.mod["main"], arrays + [np.full((8, 20, 20), np.nan,
                                                                "float32")])
        np.testing.assert_array_equal(got, arrays[0] * arrays[1][:, None, None])


def test_blocked_matmul_moves_a_long_chain_out_of_tiles_it_cannot_vectorize():
    # 6x6 maps: the tile's innermost axis (output pixels of an NCHW output) is not a vector,
    # so per tile each block of the chain was a scalar loop through a full-size temporary.
    from tvm import tirx

    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    sch = BlockedMatmul._schedule(_conv_with_epilogue(_fast_silu), 16)
    text = sch.mod["main"].script()
    assert "T_fast_exp" not in text and "T_negative" not in text
    last = sch.get_child_blocks(sch.get_sblock("root"))[-1]
    assert sch.get(sch.get_loops(last)[0]).kind == tirx.ForKind.PARALLEL
    rng = np.random.default_rng(6)
    data = rng.standard_normal((2, 32, 6, 6)).astype("float32")
    weight = rng.standard_normal((48, 32, 1, 1)).astype("float32")
    bias = rng.standard_normal((1, 48, 1, 1)).astype("float32")
    got = _run_prim_func(sch.mod["main"], [data, weight, bias,
                                           np.full((2, 48, 6, 6), np.nan, "float32")])
    pre = np.einsum("oc,nchw->nohw", weight[:, :, 0, 0], data) + bias
    np.testing.assert_allclose(got, _silu_reference(pre), rtol=1e-4, atol=1e-4)


def test_a_row_mean_with_elementwise_ops_after_it_compiles_and_matches():
    # The expanded layer norm (onnx's test_layer_normalization_*_expanded): var = mean(x * x)
    # - mean(x)^2 and its sqrt fused after the mean. Its row loop was vectorized as if it were
    # an element loop, with the lane partials inside (code generation failed).
    from helpers import FLOAT, make_graph
    from onnx import helper

    from mmcompile.reference import run_onnxruntime
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"]),
             helper.make_node("Mul", ["x", "x"], ["xx"]),
             helper.make_node("ReduceMean", ["xx", "axes"], ["mm"]),
             helper.make_node("Mul", ["m", "m"], ["m2"]),
             helper.make_node("Sub", ["mm", "m2"], ["var"]),
             helper.make_node("Add", ["var", "eps"], ["var_eps"]),
             helper.make_node("Sqrt", ["var_eps"], ["std"]),
             helper.make_node("Sub", ["x", "m"], ["centered"]),
             helper.make_node("Div", ["centered", "std"], ["y"])]
    # std read twice (as the expanded op's InvStdDev output does): FuseOps ends the mean's
    # function at the sqrt, whose loops are all row loops
    graph = make_graph(nodes, [("x", FLOAT, [6, 20])],
                       [("y", FLOAT, [6, 20]), ("std", FLOAT, [6, 1])],
                       {"axes": np.array([1], np.int64), "eps": np.array(1e-5, np.float32)})
    x = np.random.default_rng(0).standard_normal((6, 20)).astype(np.float32)
    got = mmcompile.compile(graph, {"x": x}, target="cpu").run({"x": x})
    expected = run_onnxruntime(graph, {"x": x})
    for name in ("y", "std"):  # var by cancellation: float32 rounding of ~1e-6 relative
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4)
