"""Int8 kernels of the CPU target (targets/tvm/int8.py, cpu_int8.py): QDQ MatMul / Gemm / Conv
become u8 x s8 -> i32 kernels whose requantized outputs are bit-exact to onnxruntime's int8 kernels
on the same QDQ graph, with VNNI (vpdpbusd) and without (AVX2's vpmaddwd on int16)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from mmcompile.schedule import cpu_info
from mmcompile.targets.onnxruntime import int8_exact
from mmcompile.targets.tvm import int8
from mmcompile.targets.tvm.cpu_int8 import Int8Contraction
from mmcompile.targets.tvm.host import host_cpu
from onnx import TensorProto, helper, numpy_helper

import mmcompile

VNNI = "znver4"     # AVX-512 with VNNI
NO_VNNI = "znver3"  # AVX2: vpmaddwd


def _machine_runs(mcpu: str) -> bool:
    """Whether code for ``mcpu`` runs on this CPU (znver4 code needs AVX-512 and VNNI)."""
    if mcpu != VNNI:
        return True
    flags = cpu_info()["flags"]
    return "avx512_vnni" in flags and "avx512bw" in flags


def _assert_matches_onnxruntime(got, model, feeds):
    """``got`` (u8) bit-exact to onnxruntime's int8 kernels on the same QDQ graph where those
    sum exactly, and never more than one step from its float evaluation of the graph (a float
    sum of products may round the other way).

    Without VNNI onnxruntime's kernels saturate (:func:`~mmcompile.targets.onnxruntime.
    int8_exact`: up to 163 steps off on these cases, on znver3) while ours (pairs widened to
    int16 first, ``vpmaddwd``) stay within one: there the float evaluation is the reference."""
    expected = _onnxruntime(model, feeds, optimized=True)    # onnxruntime's int8 kernels
    reference = _onnxruntime(model, feeds, optimized=False)  # QDQ in float
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.abs(got.astype(int) - reference.astype(int)).max() <= 1
    if np.abs(expected.astype(int) - reference.astype(int)).max() <= 1:
        assert np.array_equal(got, expected), \
            f"{np.count_nonzero(got != expected)} of {got.size} differ"
    else:  # onnxruntime's own int8 kernels saturate: known only where it lacks VNNI
        assert not int8_exact()


def _out_shape(op, x_shape, w_shape, attrs):
    if op == "MatMul":
        return [*x_shape[:-1], w_shape[1]]
    if op == "Gemm":
        return [x_shape[0], w_shape[0]]
    dims = len(x_shape) - 2
    pads, strides = attrs.get("pads", [0] * 2 * dims), attrs.get("strides", [1] * dims)
    dilations = attrs.get("dilations", [1] * dims)
    return [x_shape[0], w_shape[0]] + [
        (x_shape[2 + i] + pads[i] + pads[i + dims] - dilations[i] * (w_shape[2 + i] - 1) - 1)
        // strides[i] + 1 for i in range(dims)]


def _qdq_model(op: str, x_shape, w_shape, *, signed=False, attrs=None, seed=0, bias=True,
               relu=False, zero_y=120):
    """x (float) -> Q -> DQ -> op(DQ(W int8, per channel), DQ(bias int32)) [-> Relu]
    -> Q (uint8)."""
    rng = np.random.default_rng(seed)
    zx = np.array(-3 if signed else 131, np.int8 if signed else np.uint8)
    sx = np.float32(0.02)
    weight = rng.integers(-127, 128, w_shape).astype(np.int8)
    out_axis = {"MatMul": 1, "Gemm": 0, "Conv": 0}[op]
    channels = w_shape[out_axis]
    sw = (rng.random(channels).astype(np.float32) + 0.5) * 0.01
    inits = [numpy_helper.from_array(np.array(sx), "sx"), numpy_helper.from_array(zx, "zx"),
             numpy_helper.from_array(weight, "wq"), numpy_helper.from_array(sw, "sw"),
             numpy_helper.from_array(np.zeros(channels, np.int8), "zw"),
             numpy_helper.from_array(np.array(np.float32(0.05)), "sy"),
             numpy_helper.from_array(np.array(zero_y, np.uint8), "zy")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=out_axis)]
    args = ["xd", "wd"]
    if bias:
        b = rng.integers(-2000, 2000, channels).astype(np.int32)
        inits += [numpy_helper.from_array(b, "bq"), numpy_helper.from_array(sx * sw, "bs"),
                  numpy_helper.from_array(np.zeros(channels, np.int32), "bz")]
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], axis=0))
        if op != "MatMul":
            args.append("bd")
    nodes.append(helper.make_node(op, args, ["y0"], **(attrs or {})))
    last = "y0"
    if bias and op == "MatMul":
        nodes.append(helper.make_node("Add", ["y0", "bd"], ["y1"]))
        last = "y1"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["y2"]))
        last = "y2"
    nodes.append(helper.make_node("QuantizeLinear", [last, "sy", "zy"], ["y"]))
    graph = helper.make_graph(
        nodes, f"qdq_{op.lower()}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.UINT8,
                                       _out_shape(op, x_shape, w_shape, attrs or {}))],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, {"x": rng.standard_normal(x_shape).astype(np.float32) * 1.5}


def _onnxruntime(model, feeds, optimized: bool):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _compile(model, feeds, mcpu, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return mmcompile.compile(str(path), feeds, target=f"cpu{{mcpu={mcpu}}}", verify=False)


CASES = {
    "matmul": ("MatMul", (1, 6, 64), (64, 32), {}),
    "matmul_odd": ("MatMul", (2, 5, 30), (30, 20), {}),              # K % 4, N % 16
    "matmul_rows65": ("MatMul", (2, 65, 40), (40, 32), {}),          # rows padded (AVX2)
    "gemm": ("Gemm", (3, 48), (40, 48), {"transB": 1}),
    "conv3x3": ("Conv", (1, 8, 12, 12), (32, 8, 3, 3), {"pads": [1, 1, 1, 1]}),
    "conv_stride_dilation": ("Conv", (2, 3, 15, 13), (16, 3, 3, 3),
                             {"pads": [2, 1, 2, 1], "strides": [2, 1], "dilations": [2, 1]}),
    "conv1ch5x5": ("Conv", (1, 1, 20, 20), (16, 1, 5, 5), {"pads": [2, 2, 2, 2]}),  # 4 columns
    "conv1ch_stride": ("Conv", (2, 1, 17, 19), (24, 1, 3, 3),                       # per dot
                       {"pads": [1, 0, 1, 2], "strides": [2, 2]}),
    "conv1x1": ("Conv", (1, 24, 7, 7), (40, 24, 1, 1), {}),
    # stems on VNNI (int8._int8_stem): 40 pixels padded to 48; a 2-channel conv1d, 7 taps
    "stem_rgb": ("Conv", (2, 3, 40, 40), (32, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    "stem_conv1d": ("Conv", (2, 2, 50), (16, 2, 7), {"pads": [3, 3]}),
    "conv_column": ("Conv", (2, 16, 30, 1), (24, 16, 3, 1),     # down one column, stride 2
                    {"pads": [1, 0, 1, 0], "strides": [2, 1]}),
    "conv1d": ("Conv", (2, 12, 30), (32, 12, 3), {"pads": [1, 1], "strides": [2]}),
}


@pytest.mark.parametrize("mcpu", [VNNI, NO_VNNI])
@pytest.mark.parametrize("case", sorted(CASES))
def test_int8_kernel_is_bit_exact_to_onnxruntime_int8(case, mcpu, tmp_path):
    if not _machine_runs(mcpu):
        pytest.skip(f"this CPU cannot run {mcpu} code")
    op, x_shape, w_shape, attrs = CASES[case]
    model, feeds = _qdq_model(op, x_shape, w_shape, attrs=attrs, signed=case == "matmul")
    cm = _compile(model, feeds, mcpu, tmp_path)
    # The int8 kernel sums exactly and scales once, as onnxruntime's QLinear kernels do:
    # identical bytes (where onnxruntime's kernels are exact: see the helper).
    _assert_matches_onnxruntime(cm(**feeds), model, feeds)  # one output: the array itself


def _requantized_reference(model, feeds, op: str, relu: bool) -> np.ndarray:
    """What onnxruntime's requantizing int8 kernels (QLinearConv / QLinearMatMul / QGemm)
    write for a :func:`_qdq_model` graph, in numpy: the exact int32 sum with the int32 bias,
    times ``float32(sx * sw) / sy`` (float32), rounded half to even, plus ``zy``, saturated.
    The sum is exact in float64 (|sum| < 2^53)."""
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    sx, zx, sw, sy, zy = init["sx"], int(init["zx"]), init["sw"], init["sy"], int(init["zy"])
    low = -128 if init["zx"].dtype == np.int8 else 0
    xq = np.clip(np.rint(feeds["x"] / sx) + zx, low, low + 255) - zx
    weight = init["wq"].astype(np.float64)
    if op == "Conv":  # exact in float64 (integer sums below 2^53)
        import torch
        (node,) = [n for n in model.graph.node if n.op_type == "Conv"]
        attrs = {a.name: list(a.ints) for a in node.attribute}
        dims = xq.ndim - 2
        pads = attrs.get("pads", [0] * 2 * dims)
        assert pads[:dims] == pads[dims:], "symmetric padding only"
        conv = torch.nn.functional.conv2d if dims == 2 else torch.nn.functional.conv1d
        acc = conv(torch.from_numpy(xq.astype(np.float64)), torch.from_numpy(weight),
                   stride=attrs.get("strides", [1] * dims), padding=pads[:dims],
                   dilation=attrs.get("dilations", [1] * dims)).numpy()
        column = (None, slice(None)) + (None,) * dims
    elif op == "Gemm":  # transB
        acc, column = xq @ weight.T, (None, slice(None))
    else:
        acc, column = xq @ weight, (None, None, slice(None))
    if "bq" in init:
        acc = acc + init["bq"].astype(np.float64)[column]
    multiplier = (np.float32(sx) * sw) / sy  # float32 throughout, as onnxruntime computes it
    out = np.rint(acc.astype(np.float32) * multiplier[column]) + zy
    return np.clip(out, zy if relu else 0, 255).astype(np.uint8)


@pytest.mark.parametrize("mcpu", [VNNI, NO_VNNI])
@pytest.mark.parametrize("op, x_shape, w_shape, attrs, relu, zero_y", [
    ("Conv", (4, 16, 64, 64), (64, 16, 3, 3), {"pads": [1] * 4}, False, 120),
    ("Conv", (2, 16, 64, 64), (64, 16, 3, 3), {"pads": [1] * 4}, True, 0),
    ("Conv", (2, 16, 64, 64), (64, 16, 3, 3), {"pads": [1] * 4}, True, 37),
    ("MatMul", (4, 256, 256), (256, 512), {}, False, 120),
])
def test_a_requantized_contraction_rounds_once_as_onnxruntime_int8_on_many_outputs(
        mcpu, op, x_shape, w_shape, attrs, relu, zero_y, tmp_path):
    """``Q([Relu](op(DQ, DQ) + DQ(bias)))`` is one kernel scaling the int32 sum with the int32
    bias once by ``sx * sw / sy``. Through float (scale, add the dequantized bias, divide by
    ``sy``) an output near a tie rounded the other way: 1-2 in 10^6 against onnxruntime's
    int8 kernels (AVX512-VNNI). Exact (0 differences) here, on either instruction set."""
    if not _machine_runs(mcpu):
        pytest.skip(f"this CPU cannot run {mcpu} code")
    model, feeds = _qdq_model(op, x_shape, w_shape, attrs=attrs, relu=relu, zero_y=zero_y)
    got = _compile(model, feeds, mcpu, tmp_path)(**feeds)
    expected = _requantized_reference(model, feeds, op, relu)
    assert got.size >= 500_000
    assert np.array_equal(got, expected), f"{np.count_nonzero(got != expected)} differ"
    if int8_exact() and not (relu and zero_y):  # onnxruntime fuses the group (ReLU: zy == 0)
        assert np.array_equal(got, _onnxruntime(model, feeds, optimized=True))


def _host_has_amx() -> bool:
    from mmcompile.targets.tvm.host import llvm_target
    return int8.has_amx(llvm_target())


AMX_CASES = {
    "clip_mlp": ("MatMul", (8, 65, 128), (128, 512), {}),       # rows 520 padded to 544
    "odd": ("MatMul", (2, 40, 120), (120, 72), {}),             # K 120 -> 128, N 72 -> 96
    "gemm": ("Gemm", (64, 192), (80, 192), {"transB": 1}),
    # convolutions (int8._amx_conv2d): a 16-pixel row (two rows a register block), a stride 2
    # on a 12-pixel row (padded to 16), 5x5 on 28 pixels (padded to 32) with 16 channels (5
    # columns x 4 groups = 20 reduction rows, padded to 32), a dilated conv1d
    "conv_3x3": ("Conv", (2, 32, 16, 16), (64, 32, 3, 3), {"pads": [1] * 4}),
    "conv_stride_2": ("Conv", (1, 64, 24, 24), (128, 64, 3, 3),
                      {"pads": [1] * 4, "strides": [2, 2]}),
    "conv_5x5": ("Conv", (1, 16, 28, 28), (32, 16, 5, 5), {"pads": [2] * 4}),
    "conv1d_dilated": ("Conv", (2, 64, 100), (64, 64, 5), {"pads": [4, 4], "dilations": [2]}),
    # a conv1d written as a conv2d down a one-column map (tf2onnx: Magika), run as one row
    "conv_column": ("Conv", (2, 64, 100, 1), (64, 64, 5, 1), {"pads": [2, 0, 2, 0]}),
}


@pytest.mark.skipif(not _host_has_amx(), reason="this CPU (or its OS) offers no AMX tiles")
@pytest.mark.parametrize("signed, relu", [(False, False), (True, True)])
@pytest.mark.parametrize("case", sorted(AMX_CASES))
def test_amx_kernels_are_bit_exact(case, signed, relu, tmp_path):
    """On a CPU with AMX, matmuls of 32 rows or more run on tiles (cpu_amx.py), exactly:
    padded rows, reduction and columns, int8 activations shifted to uint8, the requantizing
    epilogue."""
    op, x_shape, w_shape, attrs = AMX_CASES[case]
    model, feeds = _qdq_model(op, x_shape, w_shape, attrs=attrs, signed=signed, relu=relu,
                              zero_y=0 if relu else 120)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    cm = mmcompile.compile(str(path), feeds, verify=False)  # this host: AMX
    manifest = (cm.save(tmp_path / "model.mmc") / "manifest.json").read_text()
    assert '"amx": 1' in manifest, manifest
    got = cm(**feeds)
    expected = _requantized_reference(model, feeds, op, relu)
    assert np.array_equal(got, expected), f"{np.count_nonzero(got != expected)} differ"
    assert np.array_equal(got, _onnxruntime(model, feeds, optimized=True))
    reloaded = mmcompile.load(tmp_path / "model.mmc")  # asks for tile state again
    assert np.array_equal(reloaded(**feeds), got)


def test_an_amx_kernel_loads_the_tile_configuration_once_per_parallel_task():
    """Scheduled and compiled for Sapphire Rapids on any host (not run): 17 row blocks of 32
    for 2 threads make 17 tasks of 16 column blocks, each loading the configuration once
    (per register block it cost ~500 cycles) and releasing the tiles at its end; each
    block's epilogue right after its store."""
    import tvm
    from mmcompile.targets.tvm.cpu_amx import configure_tiles
    from mmcompile.targets.tvm.host import llvm_target
    from tvm import te
    target = llvm_target("sapphirerapids", threads=2)
    weight = np.random.default_rng(0).integers(-127, 128, (128, 512)).astype(np.int8)
    packed = int8.pack_weights(weight, True, amx=True)
    assert packed.shape == (32, 32, 16, 4)
    x = te.placeholder((520, 128), "uint8", name="x")  # CLIP's 8 x 65 tokens, flattened
    w = te.placeholder(packed.shape, "int8", name="w")
    c = te.placeholder((512,), "int32", name="c")
    s = te.placeholder((512,), "float32", name="s")
    func = te.create_prim_func([x, w, c, s, int8._amx_matmul(x, w, c, s, False)])
    mod = configure_tiles(Int8Contraction()._schedule(func, target).mod)
    text = mod["main"].script()
    assert re.search(r"in T\.parallel\(17\):\n\s+cfg = ", text), text
    assert text.count("llvm.x86.ldtilecfg") == 1 and text.count("llvm.x86.tilerelease") == 1
    assert text.count("llvm.x86.tdpbusd") == 4 and text.count("llvm.x86.tilestored64") == 4
    # two parallel loops (staging; tasks), the epilogue per register block inside the second
    assert text.count("T.parallel(") == 2 and text.count("T.vectorized(16)") == 1, text
    assert text.index("T.vectorized(16)") > text.index("llvm.x86.tilestored64")
    tvm.compile(mod, target=target)  # LLVM takes the tile intrinsics


def test_an_amx_convolution_is_one_parallel_loop_of_register_blocks_with_their_epilogue():
    """Scheduled and compiled for Sapphire Rapids on any host (not run): 3x3, 32 -> 64
    channels on 2 x 16 x 16 pixels: register blocks of two 16-pixel rows x 32 channels, 16 in
    all, in 2 tasks; per block 3 kernel rows x 2 tile loads of weights and 2 of pixels, 4
    ``tdpbsud``, then the NCHW epilogue vectorized along 16 pixels."""
    import tvm
    from mmcompile.targets.tvm.cpu_amx import configure_tiles
    from mmcompile.targets.tvm.host import llvm_target
    from tvm import te
    target = llvm_target("sapphirerapids", threads=2)
    weight = np.random.default_rng(0).integers(-127, 128, (64, 32, 3, 3)).astype(np.int8)
    plan = int8.AmxConv.plan(32, 64, (3, 3), (16, 16))
    assert plan == int8.AmxConv(groups=8, rows=32, row_tiles=2, pixels=16)
    packed = int8.amx_conv_weights(weight, plan)
    assert packed.shape == (3, 2, 4, 16, 16, 4)
    x = te.placeholder((2, 32, 16, 16), "uint8", name="x")
    w = te.placeholder(packed.shape, "int8", name="w")
    c = te.placeholder((64,), "int32", name="c")
    s = te.placeholder((64,), "float32", name="s")
    out = int8._amx_conv2d(x, w, c, s, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 131, False)
    func = te.create_prim_func([x, w, c, s, out])
    mod = configure_tiles(Int8Contraction()._schedule(func, target).mod)
    text = mod["main"].script()
    assert re.search(r"in T\.parallel\(2\):\n\s+cfg = ", text), text
    assert text.count("llvm.x86.ldtilecfg") == 1 and text.count("llvm.x86.tilerelease") == 1
    assert text.count("llvm.x86.tdpbsud") == 4 and text.count("llvm.x86.tilestored64") == 4
    assert text.index("T.vectorized(16)") > text.index("llvm.x86.tilestored64"), text
    tvm.compile(mod, target=target)


def test_amx_convolution_weights_hold_every_weight_once_where_the_sum_reads_it():
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (40, 6, 2, 3)).astype(np.int8)  # 6 channels: 2 groups
    plan = int8.AmxConv.plan(6, 40, (2, 3), (8, 40))
    assert (plan.groups, plan.rows, plan.row_tiles, plan.pixels) == (2, 16, 1, 32)
    packed = int8.amx_conv_weights(weight, plan)
    assert packed.shape == (2, 1, 4, 16, 16, 4)  # 40 output channels padded to 64
    # element [kh, q, nb, nl, rr, j]: output 16 nb + nl, column / group divmod(16 q + rr, 2),
    # channel 4 group + j
    for o, c, kh, kw in [(0, 0, 0, 0), (39, 5, 1, 2), (17, 4, 0, 1), (5, 3, 1, 0)]:
        column_group = kw * plan.groups + c // 4
        assert packed[kh, column_group // 16, o // 16, o % 16, column_group % 16, c % 4] == \
            weight[o, c, kh, kw]
    assert np.count_nonzero(packed) == np.count_nonzero(weight)


def test_stems_and_small_convolutions_stay_on_vpdpbusd():
    assert int8.use_amx_conv(32, 64, (3, 3), (16, 16), 8)
    assert int8.use_amx_conv(64, 128, (3, 3), (12, 12), 1)
    assert not int8.use_amx_conv(3, 32, (3, 3), (48, 48), 8)   # 9 reduction bytes of 64
    assert not int8.use_amx_conv(1, 16, (5, 5), (28, 28), 8)   # 5 of 64 bytes, 16 channels
    assert not int8.use_amx_conv(8, 64, (3, 3), (32, 32), 8)   # 24 of 64 bytes a kernel row
    assert not int8.use_amx_conv(64, 64, (3, 3), (4, 4), 1)    # 590k multiply-adds


def test_stems_with_rows_that_fill_pixel_vectors_sum_along_the_pixels():
    assert int8.use_stem(3, 64, True) and int8.use_stem(1, 112, True)
    assert int8.use_stem(3, 13, True)        # 13 of 16 lanes
    assert not int8.use_stem(3, 8, True)     # CLIP's patch embedding: half the lanes idle
    assert not int8.use_stem(3, 20, True)    # 20 pixels padded to 32
    assert not int8.use_stem(8, 64, True)    # channel vectors
    assert not int8.use_stem(3, 64, False)   # vpdpbusd only


def test_small_or_shallow_contractions_stay_on_vpdpbusd():
    assert int8.use_amx(520, 128) and int8.use_amx(64, 120)
    assert not int8.use_amx(16, 512)   # one tile of rows, half of it padding
    assert not int8.use_amx(520, 40)   # the reduction padded 40 -> 64
    assert not int8.use_amx(33, 512)   # rows padded 33 -> 64


def test_an_amx_artifact_on_a_machine_without_tiles_is_a_clear_error(monkeypatch, tmp_path):
    from mmcompile.artifact import ArtifactError
    from mmcompile.targets.tvm import executable
    monkeypatch.setattr(executable, "enable_amx", lambda: False)
    info = {"int8": {"amx": 2}, "versions": {"tvm": executable.tvm_version()},
            "inputs": ["x"], "outputs": ["y"]}
    with pytest.raises(ArtifactError, match="AMX tiles"):
        executable.load_executable(tmp_path, {"library": "lib.so"}, info, "cpu", 1)


def _contractions(model):
    from mmcompile.targets.tvm.host import llvm_target
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    mod = relax.transform.DecomposeOpsForInference()(from_onnx(model, keep_params_in_input=False))
    rewrite = int8.QuantizedContractions(llvm_target(VNNI))
    return rewrite(mod)["main"].script(), rewrite


@pytest.mark.parametrize("op, w_shape, attrs", [
    ("Conv", (32, 8, 3, 3), {"pads": [1] * 4}), ("Gemm", (40, 48), {"transB": 1}),
    ("MatMul", (48, 40), {})])
def test_the_requantizing_kernel_replaces_bias_add_relu_and_quantize(op, w_shape, attrs):
    x_shape = (1, 8, 12, 12) if op == "Conv" else (3, 48)
    text, rewrite = _contractions(_qdq_model(op, x_shape, w_shape, attrs=attrs, relu=True)[0])
    assert (rewrite.count, rewrite.requantized) == (1, 1)
    assert re.search(r'call_tir\(int8_\w+, .*dtype="uint8"\)\)', text), text
    for gone in ("R.add", "R.nn.relu", "R.quantize(lv"):
        assert gone not in text, text


def test_a_contraction_whose_float_output_is_read_twice_is_not_requantized():
    """The float output is also a graph output: requantizing would compute the sum twice."""
    model, _ = _qdq_model("Conv", (1, 8, 12, 12), (32, 8, 3, 3), attrs={"pads": [1] * 4},
                          bias=False)
    model.graph.output.append(helper.make_tensor_value_info("y0", TensorProto.FLOAT, None))
    text, rewrite = _contractions(model)
    assert (rewrite.count, rewrite.requantized) == (1, 0)
    assert "R.quantize(" in text.split("int8_conv2d")[-1], text


def test_a_bias_scaled_otherwise_than_the_sum_stays_a_float_add():
    model, _ = _qdq_model("Conv", (1, 8, 12, 12), (32, 8, 3, 3), attrs={"pads": [1] * 4})
    [scale] = [i for i in model.graph.initializer if i.name == "bs"]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 2, "bs"))
    text, rewrite = _contractions(model)
    assert (rewrite.count, rewrite.requantized) == (1, 0)
    assert "R.add" in text


def test_the_rewrite_takes_qdq_contractions_and_reports_them(tmp_path):
    model, feeds = _qdq_model("Conv", (1, 8, 12, 12), (32, 8, 3, 3), attrs={"pads": [1] * 4})
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    cm = mmcompile.compile(str(path), feeds, verify=False)
    saved = cm.save(tmp_path / "model.mmc")
    manifest = (saved / "manifest.json").read_text()
    assert '"int8"' in manifest and '"kernels": 1' in manifest
    assert '"requantized": 1' in manifest  # bias, quantize: in the kernel


def _qdq_pool(signed: bool, relu: bool, attrs: dict, scale: float = 0.02):
    """x -> Q -> DQ [-> Relu] -> MaxPool -> Q (uint8): the island a QDQ graph keeps between
    two quantized convolutions."""
    zx = np.array(-3 if signed else 131, np.int8 if signed else np.uint8)
    inits = [numpy_helper.from_array(np.array(np.float32(scale)), "sx"),
             numpy_helper.from_array(zx, "zx"),
             numpy_helper.from_array(np.array(np.float32(0.013)), "sy"),
             numpy_helper.from_array(np.array(7, np.uint8), "zy")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"])]
    if relu:
        nodes.append(helper.make_node("Relu", ["xd"], ["xr"]))
    nodes += [helper.make_node("MaxPool", ["xr" if relu else "xd"], ["p"], **attrs),
              helper.make_node("QuantizeLinear", ["p", "sy", "zy"], ["y"])]
    shape = [2, 5, 11, 9]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", 1, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [None] * 4)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(3).normal(0, 1.5, shape).astype(np.float32)  # some clip
    return model, {"x": x}


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("attrs", [{"kernel_shape": [2, 2], "strides": [2, 2]},
                                   {"kernel_shape": [3, 3], "strides": [2, 2],
                                    "pads": [1, 1, 1, 1]},
                                   {"kernel_shape": [3, 2], "strides": [2, 1],
                                    "ceil_mode": 1}])
def test_max_pools_of_dequantized_tensors_run_on_the_quantized_ones_bit_exact(
        signed, relu, attrs, tmp_path):
    """DQ [-> Relu] -> MaxPool -> Q pools the quantized tensor instead (exact: the dequantize
    and the ReLU never decrease; padding is the type's minimum), bit-exact to onnxruntime's
    float evaluation of the graph, also where a window overhangs or is padded and with int8
    activations (padded with -128)."""
    from mmcompile.targets.tvm.host import llvm_target
    from tvm.relax.frontend.onnx import from_onnx
    model, feeds = _qdq_pool(signed, relu, attrs)
    rewrite = int8.QuantizedContractions(llvm_target(NO_VNNI))
    text = rewrite(from_onnx(model, keep_params_in_input=False)).script()
    assert rewrite.pools == 1
    pool_input = "int8" if signed else "uint8"
    assert f'dtype="{pool_input}") = R.nn.max_pool2d' in text, text
    path = tmp_path / "pool.onnx"
    onnx.save(model, path)
    got = mmcompile.compile(str(path), feeds, verify=False)(**feeds)
    reference = _onnxruntime(model, feeds, optimized=False)
    assert np.array_equal(got, reference)


def test_a_max_pool_of_a_negatively_scaled_dequantize_stays_float():
    """A negative scale reverses the order: the maximum of the quantized values would be
    the float minimum, so such a pool is left as it is."""
    from mmcompile.targets.tvm.host import llvm_target
    from tvm.relax.frontend.onnx import from_onnx
    model, _ = _qdq_pool(False, False, {"kernel_shape": [2, 2]}, scale=-0.02)
    rewrite = int8.QuantizedContractions(llvm_target(NO_VNNI))
    rewrite(from_onnx(model, keep_params_in_input=False))
    assert rewrite.pools == 0


def test_float_contractions_and_per_tensor_weights_with_zero_points_stay_float():
    """Only constant int8 weights with zero zero-points are taken: a float matmul is not."""
    from tvm import relax
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, relax.const(np.ones((8, 16), np.float32))))
        bb.emit_func_output(y)
    from mmcompile.targets.tvm.host import llvm_target
    rewrite = int8.QuantizedContractions(llvm_target())
    rewrite(bb.get())
    assert rewrite.count == 0


@pytest.mark.parametrize("vnni", [True, False])
def test_packed_weights_hold_every_weight_once_and_zeros_elsewhere(vnni):
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (30, 20)).astype(np.int8)  # K=30 -> 32, N=20 -> 32
    packed = int8.pack_weights(w, vnni)
    step = 4 if vnni else 2  # vpdpbusd sums 4 bytes, vpmaddwd 2 int16
    assert packed.shape == (2, 32 // step, 16, step)
    assert packed.dtype == (np.int8 if vnni else np.int16)
    unpacked = packed.transpose(1, 3, 0, 2).reshape(32, 32)
    assert np.array_equal(unpacked[:30, :20], w)
    assert not unpacked[30:].any() and not unpacked[:, 20:].any()


def test_vnni_detection_follows_the_target_cpu():
    from mmcompile.targets.tvm.host import llvm_target
    assert int8.has_vnni(llvm_target("znver4"))
    assert not int8.has_vnni(llvm_target("znver3"))
    assert not int8.has_vnni(llvm_target("skylake-avx512"))  # AVX-512 without VNNI
    assert isinstance(host_cpu()["mcpu"], str)


@pytest.mark.parametrize("mcpu", [VNNI, NO_VNNI])
@pytest.mark.parametrize("case", ["matmul", "gemm", "conv3x3", "conv1ch5x5", "conv1d"])
def test_the_int8_rule_schedules_every_int8_kernel_with_its_epilogue_per_tile(case, mcpu):
    """A kernel the rule declines falls to the float rules, which run it correctly but as
    scalar int32 code (CLIP's int8 matmuls: 4x slower): every int8 kernel must be ours,
    with the epilogue (scale, bias, requantize) inside the tile loop."""
    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import fuse_cpu
    from tvm import relax, tirx
    from tvm.relax.frontend.onnx import from_onnx
    op, x_shape, w_shape, attrs = CASES[case]
    model, _ = _qdq_model(op, x_shape, w_shape, attrs=attrs)
    mod = relax.transform.DecomposeOpsForInference()(from_onnx(model, keep_params_in_input=False))
    target = llvm_target(mcpu)
    kernels = [f for gv, f in fuse_cpu(mod, target).functions_items()
               if isinstance(f, tirx.PrimFunc) and "int8_" in gv.name_hint]
    assert len(kernels) == 1
    sch = Int8Contraction()._schedule(kernels[0], target)
    assert sch is not None
    text = sch.mod["main"].script()
    assert ("vpdpbusd" in text) == (mcpu == VNNI)
    assert ("pmadd.wd" in text) == (mcpu == NO_VNNI)
    # vpmaddwd's activations are widened once, while staging, not per broadcast (three
    # vector instructions per pair: 3x3 conv 32 -> 64 on 28x28 347 -> 271 us at one thread)
    staged = "uint8" if mcpu == VNNI else "int16"
    assert re.search(rf'int8_data = T\.sblock_alloc_buffer\(.*, "{staged}"\)\n', text), text
    if case == "conv3x3":  # NHWC staging: the loop over pixels and their channels is not
        assert "for w, c in T.grid(" in text, text  # fused into the rows (a div/mod each)
    out_width = _out_shape(op, x_shape, w_shape, attrs)[-1]
    if op == "Conv" and int8.use_stem(x_shape[1], out_width, mcpu == VNNI):  # int8._int8_stem:
        # the padding (fill and copy, or one pass), the tap runs, the tiles
        assert "int8_data_rows" in text and text.count("\n    for ") in (3, 4), text
    else:  # two loop nests at the root: the staging and the tiles (sum + epilogue)
        assert text.count("\n    for ") == 2, text


@pytest.mark.parametrize("out, acc, aliased", [
    ([8, 32, 64, 64], [8, 64, 64, 32], True),    # 4 KB planes: 32 lines in one set
    ([1, 32, 128, 128], [1, 128, 128, 32], True),
    ([8, 64, 32, 32], [8, 32, 32, 64], True),    # 1 KB planes: 16 lines a set
    ([8, 32, 32, 32], [8, 32, 32, 32], False),   # 8 lines a set: as many as it holds
    ([8, 32, 48, 48], [8, 48, 48, 32], False),   # 2304-byte planes spread over 16 sets
    ([8, 16, 56, 56], [8, 56, 56, 16], False),
    ([8, 65, 512], [8, 66, 512], False),         # a matmul: channels contiguous
])
def test_tiles_writing_nchw_planes_that_share_l1_sets_leave_the_epilogue_to_a_pass(
        out, acc, aliased):
    from mmcompile.targets.tvm.cpu_int8 import aliased_planes
    assert aliased_planes(out, acc, 1, 32 if out[1] <= 32 else 64) == aliased


def test_a_stem_on_64x64_runs_its_epilogue_after_the_tiles_and_stays_exact(tmp_path):
    """3 -> 32 channels on 64x64: per tile, each pixel's 32 channel bytes went to 32 planes
    4 KB apart (one L1 set); as a pass after the tiles: 2x faster (late fusion's stem)."""
    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import fuse_cpu
    from tvm import relax, tirx
    from tvm.relax.frontend.onnx import from_onnx
    model, feeds = _qdq_model("Conv", (2, 3, 64, 64), (32, 3, 3, 3), attrs={"pads": [1] * 4})
    mod = relax.transform.DecomposeOpsForInference()(from_onnx(model, keep_params_in_input=False))
    target = llvm_target(NO_VNNI)
    [kernel] = [f for gv, f in fuse_cpu(mod, target).functions_items()
                if isinstance(f, tirx.PrimFunc) and "int8_" in gv.name_hint]
    text = Int8Contraction()._schedule(kernel, target).mod["main"].script()
    assert text.count("\n    for ") == 3, text  # staging, tiles, the epilogue's pass
    _assert_matches_onnxruntime(_compile(model, feeds, NO_VNNI, tmp_path)(**feeds), model,
                                feeds)


@pytest.mark.parametrize("mcpu, rows, tile_rows", [(NO_VNNI, 66, 2), (VNNI, 65, 5)])
def test_int8_matmul_rows_without_a_divisor_near_the_tile_are_padded(mcpu, rows, tile_rows):
    """65 rows (CLIP's tokens; ViT's 197) have no divisor up to AVX2's row limit of 2: the
    tile was one row, one accumulator pair streaming every weight per row (CLIP batch 8's
    MLP matmul 712 -> 615 us). They are padded to 66, the epilogue still per tile; VNNI's
    limit (6 with two column blocks) divides 65 by 5 and pads nothing."""
    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import fuse_cpu
    from tvm import relax, tirx
    from tvm.relax.frontend.onnx import from_onnx
    op, x_shape, w_shape, attrs = CASES["matmul_rows65"]
    model, _ = _qdq_model(op, x_shape, w_shape, attrs=attrs)
    mod = relax.transform.DecomposeOpsForInference()(from_onnx(model, keep_params_in_input=False))
    target = llvm_target(mcpu)
    [kernel] = [f for gv, f in fuse_cpu(mod, target).functions_items()
                if isinstance(f, tirx.PrimFunc) and "int8_" in gv.name_hint]
    text = Int8Contraction()._schedule(kernel, target).mod["main"].script()
    assert re.search(rf"int8_acc = T\.sblock_alloc_buffer\(\(T\.int64\(2\), T\.int64\({rows}\),",
                     text), text
    assert re.search(rf"for \w+ in T\.unroll\(T\.int64\({tile_rows}\)\)", text), text
    assert text.count("\n    for ") == 2, text  # staging; tiles with their epilogue


@pytest.mark.parametrize("case", ["matmul_odd", "conv_stride_dilation"])
def test_int8_kernels_without_avx2_run_as_vector_int32_and_stay_exact(case, tmp_path):
    op, x_shape, w_shape, attrs = CASES[case]
    model, feeds = _qdq_model(op, x_shape, w_shape, attrs=attrs)
    got = _compile(model, feeds, "x86-64", tmp_path)(**feeds)  # SSE2 only
    _assert_matches_onnxruntime(got, model, feeds)


def test_the_epilogue_runs_per_tile_only_where_a_tile_is_a_box_of_its_output():
    """A reshape fused after the sum (heads split off the columns) makes a tile's output a
    non-box region, which TVM over-approximates: the epilogue would read accumulators of
    tiles not summed yet. Only the contraction's own layouts qualify."""
    from mmcompile.targets.tvm.cpu_int8 import tile_box
    assert tile_box([1, 12, 64], [1, 12, 64]) == 64            # matmul
    assert tile_box([3, 40], [3, 48]) == 40                    # padded columns
    assert tile_box([1, 32, 56, 56], [1, 56, 56, 32]) == 32    # conv2d, NCHW
    assert tile_box([2, 32, 15], [2, 1, 15, 32]) == 32         # conv1d, NCW
    assert tile_box([1, 12, 4, 16], [1, 12, 64]) is None       # heads split off
    assert tile_box([12, 64], [1, 12, 64]) is None             # rows reshaped


def _two_layer_model(rows: int, width: int):
    """x -> Q -> DQ -> MatMul(W1) + b1 -> Q -> DQ -> MatMul(W2) + b2 -> Q (uint8): two
    layers of one shape whose activations have other scales and zero points."""
    rng = np.random.default_rng(5)
    layers = [dict(sx=np.float32(0.02), zx=131, sy=np.float32(0.05), zy=120),
              dict(sx=np.float32(0.05), zx=120, sy=np.float32(0.08), zy=97)]
    inits, nodes, source = [], [helper.make_node("QuantizeLinear", ["x", "sx0", "zx0"],
                                                 ["q0"])], "q0"
    inits += [numpy_helper.from_array(np.array(layers[0]["sx"]), "sx0"),
              numpy_helper.from_array(np.array(131, np.uint8), "zx0")]
    for i, layer in enumerate(layers):
        weight = rng.integers(-127, 128, (width, width)).astype(np.int8)
        sw = (rng.random(width).astype(np.float32) + 0.5) * 0.01
        bias = rng.integers(-2000, 2000, width).astype(np.int32)
        layer.update(weight=weight, sw=sw, bias=bias)
        names = {k: f"{k}{i}" for k in ("sx", "zx", "w", "sw", "zw", "b", "bs", "bz", "sy",
                                         "zy")}
        inits += [numpy_helper.from_array(weight, names["w"]),
                  numpy_helper.from_array(sw, names["sw"]),
                  numpy_helper.from_array(np.zeros(width, np.int8), names["zw"]),
                  numpy_helper.from_array(bias, names["b"]),
                  numpy_helper.from_array(layer["sx"] * sw, names["bs"]),
                  numpy_helper.from_array(np.zeros(width, np.int32), names["bz"]),
                  numpy_helper.from_array(np.array(layer["sy"]), names["sy"]),
                  numpy_helper.from_array(np.array(layer["zy"], np.uint8), names["zy"])]
        if i:  # the activation is the previous layer's output, with its parameters
            names["sx"], names["zx"] = f"sy{i - 1}", f"zy{i - 1}"
        nodes += [helper.make_node("DequantizeLinear", [source, names["sx"], names["zx"]],
                                   [f"xd{i}"]),
                  helper.make_node("DequantizeLinear", [names["w"], names["sw"], names["zw"]],
                                   [f"wd{i}"], axis=1),
                  helper.make_node("DequantizeLinear", [names["b"], names["bs"], names["bz"]],
                                   [f"bd{i}"], axis=0),
                  helper.make_node("MatMul", [f"xd{i}", f"wd{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"bd{i}"], [f"a{i}"]),
                  helper.make_node("QuantizeLinear", [f"a{i}", names["sy"], names["zy"]],
                                   [f"y{i}"])]
        source = f"y{i}"
    graph = helper.make_graph(
        nodes, "two_layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                            [rows, width])],
        [helper.make_tensor_value_info("y1", TensorProto.UINT8, [rows, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    feeds = {"x": rng.standard_normal((rows, width)).astype(np.float32) * 1.5}
    expected = np.clip(np.rint(feeds["x"] / layers[0]["sx"]) + 131, 0, 255)
    for layer in layers:  # what onnxruntime's QLinearMatMul computes, layer by layer
        acc = (expected - layer["zx"]) @ layer["weight"].astype(np.float64) + layer["bias"]
        multiplier = (layer["sx"] * layer["sw"]) / layer["sy"]  # float32, as onnxruntime
        expected = np.clip(np.rint(acc.astype(np.float32) * multiplier) + layer["zy"], 0, 255)
    return model, feeds, expected.astype(np.uint8)


@pytest.mark.parametrize("rows, amx", [(8, False), (64, False), (64, True)])
def test_layers_of_one_shape_share_their_int8_kernel(rows, amx, tmp_path):
    """The zero points and output levels are kernel arguments, not constants in the code
    (a matmul's padding needs no zero point): two requantizing layers of one shape with other
    scales and zero points are one kernel, called twice, and each computes its own layer
    (vpdpbusd; AMX tiles on a CPU that has them)."""
    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import fuse_cpu
    from tvm import relax, tirx
    from tvm.relax.frontend.onnx import from_onnx
    if amx and not _host_has_amx():
        pytest.skip("this CPU (or its OS) offers no AMX tiles")
    if not _machine_runs(VNNI):
        pytest.skip(f"this CPU cannot run {VNNI} code")
    model, feeds, expected = _two_layer_model(rows, 128)
    mod = relax.transform.DecomposeOpsForInference()(from_onnx(model, keep_params_in_input=False))
    mod = fuse_cpu(mod, llvm_target() if amx else llvm_target(VNNI))
    kernels = [gv.name_hint for gv, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and "int8_matmul" in gv.name_hint]
    assert len(kernels) == 1 and ("amx" in kernels[0]) == amx, kernels
    assert mod["main"].script().count(kernels[0] + ",") == 2
    if amx:
        path = tmp_path / "model.onnx"
        onnx.save(model, path)
        got = mmcompile.compile(str(path), feeds, verify=False)(**feeds)
    else:
        got = _compile(model, feeds, VNNI, tmp_path)(**feeds)
    assert np.array_equal(got, expected), f"{np.count_nonzero(got != expected)} differ"


def test_quantize_kernels_of_other_scales_share_their_code(tmp_path):
    """A scalar scale / zero point of a quantize or dequantize is a kernel argument (TVM's
    legalization writes it into the code): the QDQ pairs of two tensors of one shape with
    other scales are one kernel, and each still rounds with its own scale (exactly as
    onnxruntime)."""
    import onnxruntime as ort
    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import legalize_and_fuse
    from tvm import relax, tirx
    from tvm.relax.frontend.onnx import from_onnx
    inits = [numpy_helper.from_array(np.array(np.float32(s)), f"s{i}")
             for i, s in enumerate((0.02, 0.07))]
    inits += [numpy_helper.from_array(np.array(z, np.uint8), f"z{i}")
              for i, z in enumerate((131, 17))]
    nodes = []
    for i in range(2):
        nodes += [helper.make_node("QuantizeLinear", [f"x{i}", f"s{i}", f"z{i}"], [f"q{i}"]),
                  helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"y{i}"])]
    info = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "qdq", [info(f"x{i}", TensorProto.FLOAT, [64, 256])
                                             for i in range(2)],
                              [info(f"y{i}", TensorProto.FLOAT, [64, 256]) for i in range(2)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    mod = relax.transform.DecomposeOpsForInference()(from_onnx(model, keep_params_in_input=False))
    kernels = [f for _, f in legalize_and_fuse(mod, llvm_target()).functions_items()
               if isinstance(f, tirx.PrimFunc)]
    assert len(kernels) == 1
    rng = np.random.default_rng(0)
    feeds = {f"x{i}": rng.standard_normal((64, 256)).astype(np.float32) * 3 for i in range(2)}
    path = tmp_path / "qdq.onnx"
    onnx.save(model, path)
    got = mmcompile.compile(str(path), feeds, verify=False).run(feeds)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, feeds)
    for i in range(2):
        assert np.array_equal(got[f"y{i}"], expected[i])
