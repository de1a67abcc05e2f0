"""The accelerator's tiler, instruction stream and functional simulator
(targets/accel/lowering.py, isa.py, simulator.py): tiles fit the buffers for awkward shapes,
dependency tokens are what keeps double buffering correct, streams round-trip through a file,
and the simulator's int8 outputs are bit-exact to onnxruntime's on single quantized ops."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from mmcompile.targets.accel import isa
from mmcompile.targets.accel.layers import QConv2d, QGemm, QParams, reference
from mmcompile.targets.accel.lowering import TilePlan, lower, plan_tiles, supports
from mmcompile.targets.accel.simulator import run
from mmcompile.targets.accel.spec import load_spec, presets
from mmcompile.targets.onnxruntime import int8_exact
from onnx import TensorProto, helper, numpy_helper

from mmcompile.errors import InputError, UnsupportedOpError

PRESETS = sorted(presets())


def _gemm(m, k, n, *, x="uint8", y="int8", relu=False, op="MatMul", seed=0, shape=None):
    rng = np.random.default_rng(seed)
    zx = {"uint8": 131, "int8": -3}[x]
    zy = {"uint8": 7, "int8": -5}[y]
    return QGemm(name=f"gemm{m}x{k}x{n}", weight=rng.integers(-127, 128, (k, n), dtype=np.int8),
                 w_scale=(rng.random(n) * 0.01 + 0.002).astype(np.float32),
                 x=QParams(0.02, zx, x), y=QParams(0.004 * np.sqrt(k), zy, y),
                 bias=rng.integers(-3000, 3000, n).astype(np.int32),
                 activation="relu" if relu else None, input_shape=shape or (m, k), op_type=op)


def _conv(n, c, h, w, f, kernel, *, x="uint8", y="uint8", relu=False, seed=0, **geometry):
    rng = np.random.default_rng(seed)
    zx = {"uint8": 120, "int8": 4}[x]
    zy = {"uint8": 9, "int8": -7}[y]
    return QConv2d(name=f"conv{c}x{h}x{w}to{f}",
                   weight=rng.integers(-127, 128, (f, c, *kernel), dtype=np.int8),
                   w_scale=(rng.random(f) * 0.01 + 0.002).astype(np.float32),
                   x=QParams(0.02, zx, x), y=QParams(0.01 * np.sqrt(c * kernel[0] * kernel[1]),
                                                     zy, y),
                   bias=rng.integers(-3000, 3000, f).astype(np.int32),
                   activation="relu" if relu else None, input_shape=(n, c, h, w), **geometry)


def _input(layer, seed=1):
    info = np.iinfo(layer.x.dtype)
    return np.random.default_rng(seed).integers(info.min, info.max + 1, layer.input_shape,
                                                dtype=layer.x.dtype)


def _fits_spec(stream, spec):
    """The stream's buffers fit the description's capacities."""
    b = stream.buffers
    assert b["acc"].slots * b["acc"].slot_bytes <= spec.accumulator_bytes
    scratch = b["inp"].slots * b["inp"].slot_bytes + b["wgt"].slots * b["wgt"].slot_bytes
    if spec.input_kib is None:
        assert scratch <= spec.scratchpad_bytes
    else:
        assert b["inp"].slots * b["inp"].slot_bytes <= spec.input_kib * 1024
        assert b["wgt"].slots * b["wgt"].slot_bytes <= spec.weight_kib * 1024
    assert all(buf.slots == spec.slots for buf in b.values())


AWKWARD = {
    "tiny": lambda: _gemm(1, 3, 2),
    "not_multiples": lambda: _gemm(37, 45, 29, x="int8"),
    "k_over_the_scratchpad": lambda: _gemm(9, 5000, 24, relu=True),
    "batched_matmul": lambda: _gemm(6, 40, 33, shape=(2, 3, 40), y="uint8"),
    "wide_n": lambda: _gemm(20, 64, 700, op="Gemm"),
    "conv_pads_strides_dilations": lambda: _conv(2, 5, 13, 11, 7, (3, 3), pads=(1, 2, 0, 1),
                                                 strides=(2, 1), dilations=(1, 2), relu=True),
    "conv_1x1_int8": lambda: _conv(1, 24, 7, 7, 40, (1, 1), x="int8", y="int8"),
}


@pytest.mark.parametrize("accel", PRESETS)
@pytest.mark.parametrize("case", sorted(AWKWARD))
def test_tiles_fit_the_buffers_and_results_are_exact(case, accel):
    spec, layer = load_spec(accel), AWKWARD[case]()
    stream = lower(spec, layer)
    _fits_spec(stream, spec)
    x = _input(layer)
    got = run(stream, x)["y"]
    want = reference(layer, x)
    assert got.dtype == want.dtype and got.shape == want.shape == tuple(layer.output_shape)
    assert np.array_equal(got, want), f"{np.count_nonzero(got != want)} of {got.size} differ"


def test_k_larger_than_the_scratchpad_is_split_and_summed_exactly():
    spec = presets()["gemmini-16x16"].with_overrides(scratchpad_kib=8, accumulator_kib=4)
    layer = _gemm(40, 9000, 50)  # one input row of K alone is over the 8 KiB scratchpad
    stream = lower(spec, layer)
    tm, tk, tn = stream.info["tile"]
    assert tk < 9000 and 2 * (tm * tk + tk * tn) <= 8 * 1024
    _fits_spec(stream, spec)
    x = _input(layer)
    assert np.array_equal(run(stream, x)["y"], reference(layer, x))


@pytest.mark.parametrize("flow", ["ws", "os", "is"])
def test_every_dataflow_and_single_buffering_compute_the_same(flow):
    spec = presets()["edge-32x32"].with_overrides(dataflow=flow, double_buffer=False,
                                                  scratchpad_kib=16, accumulator_kib=8)
    layer = _conv(1, 12, 10, 9, 20, (3, 3), pads=(1, 1, 1, 1))
    stream = lower(spec, layer)
    assert stream.buffers["inp"].slots == 1
    x = _input(layer)
    assert np.array_equal(run(stream, x)["y"], reference(layer, x))


def test_an_explicit_tile_plan_is_used_and_a_plan_that_does_not_fit_is_refused():
    spec, layer = load_spec("vta-16x16"), _gemm(50, 64, 48)
    stream = lower(spec, layer, TilePlan(16, 32, 16, "nm", 0.0))
    assert stream.info["tile"] == [16, 32, 16] and stream.info["order"] == "nm"
    x = _input(layer)
    assert np.array_equal(run(stream, x)["y"], reference(layer, x))
    with pytest.raises(UnsupportedOpError, match="do not fit its buffers"):
        lower(spec, layer, TilePlan(50, 64, 48 * 100, "mn", 0.0))


def test_resident_tiles_are_not_loaded_again():
    spec = load_spec("edge-32x32")
    plan = plan_tiles(spec, 64, 64, 64)
    assert plan.tm * plan.tk * plan.tn >= 64 * 32 * 64  # small layers are not cut up
    # four row tiles share one weight tile: it is loaded once, the inputs once each
    stream = lower(spec, _gemm(64, 64, 64), TilePlan(16, 64, 64, "mn", 0.0))
    loads = [i.buffer for i in stream.instructions if isinstance(i, isa.Load)
             and i.queue == "load"]
    assert loads.count("wgt") == 1 and loads.count("inp") == 4


# -- dependency tokens ------------------------------------------------------------------------

def test_tokens_are_what_keeps_double_buffering_correct():
    spec, layer = load_spec("gemmini-16x16"), _gemm(100, 300, 70)
    stream = lower(spec, layer)
    x = _input(layer)
    assert np.array_equal(run(stream, x)["y"], reference(layer, x))
    flags = [i.deps for i in stream.instructions]
    assert any(d.push_next for d in flags) and any(d.pop_next for d in flags)  # both ways
    # Without tokens the load queue runs ahead and overwrites slots still being read.
    bare = replace(stream, instructions=tuple(replace(i, deps=isa.NO_DEPS)
                                              for i in stream.instructions))
    assert not np.array_equal(run(bare, x)["y"], reference(layer, x))


def test_a_pop_nobody_pushes_is_a_deadlock():
    stream = lower(load_spec("vta-16x16"), _gemm(8, 8, 8))
    first = stream.instructions[0]
    broken = replace(stream, instructions=(replace(first, deps=isa.Deps(pop_next=True)),
                                           *stream.instructions[1:]))
    with pytest.raises(isa.StreamError, match="deadlock"):
        run(broken, _input(_gemm(8, 8, 8)))


def test_dependences_are_derived_from_slot_reads_and_writes():
    program = [isa.Load("inp", 0, "x", (0, 1), (0, 1)), isa.Load("wgt", 0, "w", (0, 1), (0, 1)),
               isa.Gemm(0, 0, 0, 1, 1, 1), isa.Load("inp", 0, "x", (0, 1), (0, 1)),
               isa.Store(0, "y", (0, 1), (0, 1))]
    deps = [i.deps for i in isa.insert_dependences(program)]
    assert deps[1].push_next and not deps[0].push_next  # one token covers both loads (RAW)
    assert deps[2].pop_prev and deps[2].push_prev and deps[2].push_next
    assert deps[3].pop_next  # the reload waits until the GEMM has read the slot (WAR)
    assert deps[4].pop_prev  # the store waits for the GEMM (RAW)


# -- files ------------------------------------------------------------------------------------

def test_a_stream_round_trips_through_a_file(tmp_path):
    layer = _conv(1, 6, 9, 9, 10, (3, 3), pads=(1, 1, 1, 1), relu=True)
    stream = lower(load_spec("edge-32x32"), layer)
    path = isa.save(stream, tmp_path / "layer.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.npz"]  # no temp file left
    back = isa.load(path)
    assert back.header() == stream.header()
    assert back.constants.keys() == stream.constants.keys()
    for name, value in stream.constants.items():
        assert back.constants[name].dtype == value.dtype
        assert np.array_equal(back.constants[name], value)
    x = _input(layer)
    assert np.array_equal(run(back, x)["y"], run(stream, x)["y"])


def test_unreadable_or_foreign_files_are_refused(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(isa.StreamError, match="not a readable accelerator stream"):
        isa.load(junk)
    stream = lower(load_spec("vta-16x16"), _gemm(4, 4, 4))
    header = stream.header()
    header["version"] = 99
    other = tmp_path / "other.npz"
    np.savez(other, header=np.frombuffer(__import__("json").dumps(header).encode(), np.uint8))
    with pytest.raises(isa.StreamError, match="version"):
        isa.load(other)
    with pytest.raises(isa.StreamError, match="cannot write"):
        isa.save(stream, tmp_path / "no" / "such" / "dir" / "s.npz")


def test_a_tile_over_its_slot_is_caught_by_validation():
    stream = lower(load_spec("vta-16x16"), _gemm(20, 20, 20))
    small = replace(stream, buffers={**stream.buffers, "inp": isa.BufferDecl(2, 8)})
    with pytest.raises(isa.StreamError, match="overflows a slot of buffer 'inp'"):
        isa.validate(small)


# -- placement questions ----------------------------------------------------------------------

def test_supports_refuses_with_a_reason_naming_the_accelerator():
    spec = load_spec("vta-16x16")
    depthwise = QConv2d(name="dw", weight=np.ones((8, 1, 3, 3), np.int8),
                        w_scale=np.float32(0.1), x=QParams(0.1, 0, "uint8"),
                        y=QParams(0.1, 0, "uint8"), input_shape=(1, 8, 6, 6), groups=8)
    ok, reason = supports(spec, depthwise)
    assert not ok and reason.startswith("not supported by vta-16x16: depthwise convolution")
    with pytest.raises(UnsupportedOpError, match="depthwise"):
        lower(spec, depthwise)
    assert supports(spec, _gemm(4, 4, 4)) == (True, "")
    no_gemm = spec.with_overrides(ops=["MatMul", "QuantizeLinear"])
    ok, reason = supports(no_gemm, _gemm(4, 4, 4, op="Gemm", relu=True))
    assert not ok and "Gemm is not among its ops" in reason
    ok, reason = supports(no_gemm, _gemm(4, 4, 4, relu=True))
    assert not ok and "Relu" in reason


def test_wrong_inputs_get_an_input_error():
    layer = _gemm(4, 8, 4)
    stream = lower(load_spec("vta-16x16"), layer)
    with pytest.raises(InputError, match="must be uint8 \\[4, 8\\]"):
        run(stream, np.zeros((4, 8), np.int8))
    with pytest.raises(InputError, match="no input 'z'"):
        run(stream, {"z": np.zeros((4, 8), np.uint8)})


# -- bit-exactness against onnxruntime --------------------------------------------------------

def _qdq_model(layer, relu_as: str = "qdq") -> onnx.ModelProto:
    """The layer as a QDQ graph: DQ(x), DQ(W) per channel, DQ(bias int32) -> op -> Q, a ReLU
    either between Q/DQ pairs (as onnxruntime's quantizer writes it) or in float."""
    x, y, ch = layer.x, layer.y, layer.channels
    conv = isinstance(layer, QConv2d)
    types = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}
    weight = layer.weight if conv or layer.op_type == "MatMul" else layer.weight.T.copy()
    sw = np.broadcast_to(np.asarray(layer.w_scale, np.float32), (ch,)).copy()
    inits = [numpy_helper.from_array(np.array(np.float32(x.scale)), "sx"),
             numpy_helper.from_array(np.array(x.zero_point, x.dtype), "zx"),
             numpy_helper.from_array(weight, "wq"), numpy_helper.from_array(sw, "sw"),
             numpy_helper.from_array(np.zeros(ch, np.int8), "zw"),
             numpy_helper.from_array(np.array(np.float32(y.scale)), "sy"),
             numpy_helper.from_array(np.array(y.zero_point, y.dtype), "zy"),
             numpy_helper.from_array(layer.bias_or_zeros(), "bq"),
             numpy_helper.from_array(np.float32(x.scale) * sw, "bs"),
             numpy_helper.from_array(np.zeros(ch, np.int32), "bz")]
    axis = 1 if not conv and layer.op_type == "MatMul" else 0
    nodes = [helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=axis),
             helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], axis=0)]
    if conv:
        nodes.append(helper.make_node("Conv", ["xd", "wd", "bd"], ["c"],
                                      strides=list(layer.strides), pads=list(layer.pads),
                                      dilations=list(layer.dilations)))
    elif layer.op_type == "Gemm":
        nodes.append(helper.make_node("Gemm", ["xd", "wd", "bd"], ["c"], transB=1))
    else:
        nodes += [helper.make_node("MatMul", ["xd", "wd"], ["c0"]),
                  helper.make_node("Add", ["c0", "bd"], ["c"])]
    last = "c"
    if layer.activation == "relu":
        if relu_as == "qdq":
            nodes += [helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["q0"]),
                      helper.make_node("DequantizeLinear", ["q0", "sy", "zy"], ["d0"])]
            last = "d0"
        nodes.append(helper.make_node("Relu", [last], ["r"]))
        last = "r"
    nodes.append(helper.make_node("QuantizeLinear", [last, "sy", "zy"], ["yq"]))
    graph = helper.make_graph(
        nodes, layer.name, [helper.make_tensor_value_info("xq", types[x.dtype],
                                                          list(layer.input_shape))],
        [helper.make_tensor_value_info("yq", types[y.dtype], list(layer.output_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _onnxruntime(model, feeds, tmp_path, optimized=True):
    """onnxruntime's outputs and the op types it actually ran (after its graph fusions)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    out = session.run(None, feeds)
    ran = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    return out, ran


ORT_CASES = {
    "matmul_u8": lambda: _gemm(33, 70, 40),
    "matmul_s8": lambda: _gemm(33, 70, 40, x="int8", y="int8", seed=2),
    "matmul_3d_u8_relu": lambda: _gemm(12, 50, 24, shape=(2, 6, 50), y="uint8", relu=True),
    "gemm_u8_relu": lambda: _gemm(17, 130, 36, op="Gemm", y="uint8", relu=True, seed=3),
    "gemm_s8_relu": lambda: _gemm(17, 130, 36, op="Gemm", x="int8", y="int8", relu=True),
    "conv_u8": lambda: _conv(1, 8, 12, 12, 32, (3, 3), pads=(1, 1, 1, 1)),
    "conv_u8_strided_relu": lambda: _conv(2, 5, 15, 13, 24, (3, 3), pads=(1, 1, 1, 1),
                                          strides=(2, 1), relu=True, seed=4),
    "conv_u8_dilated_1x1ch": lambda: _conv(1, 1, 20, 20, 16, (5, 5), pads=(2, 2, 2, 2),
                                           dilations=(2, 1), seed=5),
    "conv_s8_relu": lambda: _conv(1, 6, 11, 9, 12, (3, 3), x="int8", y="int8", relu=True),
}
FUSED = {"QLinearConv", "QGemm", "QLinearMatMul"}


@pytest.mark.parametrize("case", sorted(ORT_CASES))
def test_simulator_is_bit_exact_to_onnxruntime_on_qdq_ops(case, tmp_path):
    layer = ORT_CASES[case]()
    spec = load_spec("gemmini-16x16" if "conv" in case else "vta-16x16")
    xq = _input(layer, seed=7)
    got = run(lower(spec, layer), xq)["y"]
    assert np.array_equal(got, reference(layer, xq))
    for relu_as in (("qdq", "float") if layer.activation else ("qdq",)):
        # onnxruntime's int8 kernels where they sum exactly (VNNI), else its float evaluation
        (want,), ran = _onnxruntime(_qdq_model(layer, relu_as), {"xq": xq}, tmp_path,
                                    optimized=int8_exact())
        assert want.dtype == got.dtype and want.shape == got.shape
        differ = int(np.count_nonzero(got != want))
        if FUSED & set(ran):
            # onnxruntime ran its int8 kernel: exact sums, one float32 multiplier per channel
            assert differ == 0, f"{differ} of {got.size} differ from {ran}"
        else:
            # onnxruntime kept the QDQ ops in float (it fuses only matching input/output
            # types with nothing between the op and its QuantizeLinear, and has no int8
            # QDQ Conv on x86): its float32 sum can put a value that lies within rounding
            # of a half step on the other side; never more than one step, and rare.
            assert differ <= max(1, got.size // 1000), f"{differ} of {got.size} differ"
            assert np.abs(got.astype(int) - want.astype(int)).max(initial=0) <= 1


def test_int8_convolution_is_bit_exact_to_onnxruntimes_qlinearconv(tmp_path):
    """onnxruntime has no fused int8 (s8s8) QDQ Conv on x86; its QLinearConv kernel, given
    directly, is the int8 reference."""
    layer = _conv(2, 7, 12, 10, 20, (3, 3), x="int8", y="int8", pads=(1, 0, 1, 2),
                  strides=(1, 2), seed=9)
    sw = np.asarray(layer.w_scale, np.float32)
    inits = [numpy_helper.from_array(np.array(np.float32(layer.x.scale)), "sx"),
             numpy_helper.from_array(np.array(layer.x.zero_point, np.int8), "zx"),
             numpy_helper.from_array(layer.weight, "w"), numpy_helper.from_array(sw, "sw"),
             numpy_helper.from_array(np.zeros(layer.channels, np.int8), "zw"),
             numpy_helper.from_array(np.array(np.float32(layer.y.scale)), "sy"),
             numpy_helper.from_array(np.array(layer.y.zero_point, np.int8), "zy"),
             numpy_helper.from_array(layer.bias_or_zeros(), "b")]
    node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "b"],
                            ["y"], pads=list(layer.pads), strides=list(layer.strides))
    graph = helper.make_graph([node], "qlinearconv", [helper.make_tensor_value_info(
        "x", TensorProto.INT8, list(layer.input_shape))], [helper.make_tensor_value_info(
            "y", TensorProto.INT8, list(layer.output_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    xq = _input(layer, seed=3)
    (want,), _ = _onnxruntime(model, {"x": xq}, tmp_path)
    got = run(lower(load_spec("edge-32x32"), layer), xq)["y"]
    assert np.array_equal(got, want), f"{np.count_nonzero(got != want)} of {got.size} differ"


def test_layers_from_onnxruntimes_quantizer_are_bit_exact(tmp_path):
    """A float Conv -> ReLU -> Gemm model through ``quantize_static`` (per-channel int8
    weights, uint8 activations, the ReLU folded into its QuantizeLinear); each layer's
    quantized output from onnxruntime is compared with the simulator's."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((10, 8 * 6 * 6)).astype(np.float32) * 0.05
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "float", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b1"),
         numpy_helper.from_array(rng.standard_normal(10).astype(np.float32) * 0.1, "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "float.onnx")
    samples = [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(samples)

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "qdq.onnx"), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    qdq = onnx.load(tmp_path / "qdq.onnx")
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}

    def dq(name):  # (quantized data, scale, zero point) behind a DequantizeLinear output
        node = producer[name]
        return tuple(inits.get(i) for i in node.input[:3])

    def quantized_input(node):  # the node's quantized input: (tensor name, QParams)
        dequantize = producer[node.input[0]]
        scale, zero = (inits[i] for i in dequantize.input[1:3])
        return dequantize.input[0], QParams(float(scale), int(zero), str(zero.dtype))

    def quantized_output(node):  # the QuantizeLinear reading the node's output
        quantize = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear"
                        and n.input[0] == node.output[0])
        scale, zero = (inits[i] for i in quantize.input[1:3])
        return quantize.output[0], QParams(float(scale), int(zero), str(zero.dtype))

    conv = next(n for n in qdq.graph.node if n.op_type == "Conv")
    gemm = next(n for n in qdq.graph.node if n.op_type == "Gemm")
    x_q, x_params = quantized_input(conv)
    conv_q, conv_params = quantized_output(conv)
    flat_q, flat_params = quantized_input(gemm)
    gemm_q, gemm_params = quantized_output(gemm)
    wc, swc, _ = dq(conv.input[1])
    bc, _, _ = dq(conv.input[2])
    wg, swg, _ = dq(gemm.input[1])
    bg, _, _ = dq(gemm.input[2])
    layers = [
        (x_q, conv_q, QConv2d(name="conv", weight=wc, w_scale=swc, bias=bc, x=x_params,
                              y=conv_params, input_shape=(1, 4, 6, 6), pads=(1, 1, 1, 1))),
        (flat_q, gemm_q, QGemm(name="gemm", weight=np.ascontiguousarray(wg.T), w_scale=swg,
                               bias=bg, x=flat_params, y=gemm_params, input_shape=(1, 288),
                               op_type="Gemm")),
    ]
    assert conv_params.zero_point == 0  # the ReLU lives on in the uint8 clamp
    for tensor in {t for source, out, _ in layers for t in (source, out)}:
        qdq.graph.output.append(helper.make_value_info(tensor, onnx.TypeProto()))
    names = [o.name for o in qdq.graph.output]
    feeds = {"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32) * 1.5}
    exact = int8_exact()  # else onnxruntime's int8 kernels saturate: its float evaluation
    outs, _ = _onnxruntime(qdq, feeds, tmp_path, optimized=exact)
    got = dict(zip(names, outs))
    spec = load_spec("gemmini-16x16")
    for source, out, layer in layers:
        assert supports(spec, layer) == (True, "")
        mine = run(lower(spec, layer), got[source].reshape(layer.input_shape))["y"]
        want = got[out].reshape(mine.shape)
        if exact:
            assert np.array_equal(mine, want), layer.name
        else:  # a float sum may round the other way: one step, rarely
            step = np.abs(mine.astype(int) - want.astype(int))
            assert step.max() <= 1 and np.count_nonzero(step) <= max(1, step.size // 1000)
