"""Max pooling and bare ReLUs on the accelerator (targets/accel: QPool in layers.py, the
importer's pattern, lowering, the POOL instruction and the ALU's ``rescale``): bit-exact
to onnxruntime on the QDQ graph, tiled to the buffers, costed, refused with a reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from mmcompile.targets.accel import isa
from mmcompile.targets.accel.cost import estimate
from mmcompile.targets.accel.importer import analyse
from mmcompile.targets.accel.layers import LayerError, QParams, QPool, reference
from mmcompile.targets.accel.lowering import lower, supports
from mmcompile.targets.accel.simulator import run
from mmcompile.targets.accel.spec import load_spec, presets
from onnx import TensorProto, helper, numpy_helper

import mmcompile

PRESETS = sorted(presets())


def _pool_model(shape, dtype, x, y, *, relu="", op="MaxPool", clip=False, indices=False,
                **attrs) -> onnx.ModelProto:
    """``xq -> DequantizeLinear -> [Relu] -> op -> [Relu | Clip] -> QuantizeLinear -> yq``;
    ``relu``: "", "before" or "after"; ``op`` "Relu" alone is a bare ReLU."""
    elem = TensorProto.UINT8 if dtype == "uint8" else TensorProto.INT8
    inits = [numpy_helper.from_array(np.array(x[0], np.float32), "sx"),
             numpy_helper.from_array(np.array(x[1], dtype), "zx"),
             numpy_helper.from_array(np.array(y[0], np.float32), "sy"),
             numpy_helper.from_array(np.array(y[1], dtype), "zy")]
    nodes = [helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["d"], name="dq")]
    last = "d"
    if relu == "before":
        nodes.append(helper.make_node("Relu", [last], ["r0"], name="relu0"))
        last = "r0"
    outs = ["p", "idx"] if indices else ["p"]
    nodes.append(helper.make_node(op, [last], outs, name="pool", **attrs))
    last = "p"
    if relu == "after":
        nodes.append(helper.make_node("Relu", [last], ["r1"], name="relu1"))
        last = "r1"
    if clip:
        inits += [numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(1.0, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", [last, "lo", "hi"], ["c"], name="clip"))
        last = "c"
    nodes.append(helper.make_node("QuantizeLinear", [last, "sy", "zy"], ["yq"], name="q"))
    outputs = [helper.make_tensor_value_info("yq", elem, None)]
    if indices:
        nodes.append(helper.make_node("Identity", ["idx"], ["idx_out"], name="read_idx"))
        outputs.append(helper.make_tensor_value_info("idx_out", TensorProto.INT64, None))
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("xq", elem, shape)],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _layer(model, spec):
    """The one layer the importer finds in ``model`` for ``spec`` (or why not)."""
    return analyse(mmcompile.Graph.from_onnx(model), spec)


def _onnxruntime(model, xq, optimized):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    return session.run(["yq"], {"xq": xq})[0]


# name: (input shape, dtype, (sx, zx), (sy, zy), relu, MaxPool attributes)
CASES = {
    "u8_2x2_same_scale": ((2, 16, 28, 28), "uint8", (0.05, 0), (0.05, 0), "before",
                          {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "u8_3x3_s2_pad_rescale": ((1, 40, 15, 17), "uint8", (0.031, 117), (0.02, 3), "",
                              {"kernel_shape": [3, 3], "strides": [2, 2],
                               "pads": [1, 1, 1, 1]}),
    "s8_3x3_s1_pad_relu_after": ((2, 7, 9, 11), "int8", (0.1, -5), (0.07, 12), "after",
                                 {"kernel_shape": [3, 3], "pads": [1, 0, 1, 2]}),
    "s8_dilated": ((1, 33, 12, 12), "int8", (0.2, 20), (0.3, -20), "",
                   {"kernel_shape": [2, 3], "dilations": [2, 2], "strides": [1, 2]}),
    "u8_1d": ((3, 24, 50), "uint8", (0.01, 128), (0.012, 120), "before",
              {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    "u8_many_channels": ((1, 300, 8, 8), "uint8", (0.02, 10), (0.02, 10), "",
                         {"kernel_shape": [2, 2], "strides": [2, 2]}),
}


@pytest.mark.parametrize("accel", PRESETS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_pools_are_bit_exact_to_onnxruntime(case, accel):
    """Dequantize, ReLU and quantize are non-decreasing, so they commute with the max: the
    integers equal onnxruntime's float QDQ evaluation and its own int8 MaxPool alike, with
    no tolerance (an exact rescale, not a sum)."""
    shape, dtype, x, y, relu, attrs = CASES[case]
    model = _pool_model(shape, dtype, x, y, relu=relu, **attrs)
    spec = load_spec(accel)
    found = _layer(model, spec)
    assert list(found.layers) == ["pool"], found.refused
    match = found.layers["pool"]
    assert isinstance(match.layer, QPool) and match.layer.activation == ("relu" if relu
                                                                         else None)
    assert set(found.owner) == {"dq", "pool", "q"} | ({"relu0"} if relu == "before" else set()) \
        | ({"relu1"} if relu == "after" else set())
    info = np.iinfo(dtype)
    xq = np.random.default_rng(3).integers(info.min, int(info.max) + 1, shape).astype(dtype)
    stream = lower(spec, match.layer)
    got = run(stream, xq.reshape(match.layer.input_shape))["y"].reshape(match.output_shape)
    assert np.array_equal(got, reference(match.layer, xq.reshape(match.layer.input_shape))
                          .reshape(match.output_shape))
    for optimized in (False, True):
        want = _onnxruntime(model, xq, optimized)
        assert want.dtype == got.dtype and want.shape == got.shape
        assert np.array_equal(got, want), f"{np.count_nonzero(got != want)} differ"


def test_a_bare_relu_between_quantizations_is_a_1x1_layer():
    model = _pool_model((2, 37), "uint8", (0.04, 100), (0.03, 0), op="Relu")
    found = _layer(model, load_spec("edge-32x32"))
    layer = found.layers["pool"].layer
    assert (layer.op_type, layer.kind, layer.window, layer.label) == ("Relu", "relu", 1,
                                                                     "relu 74")
    xq = np.arange(74, dtype=np.uint8).reshape(2, 37) * 3
    got = run(lower(load_spec("edge-32x32"), layer), xq.reshape(layer.input_shape))["y"]
    assert np.array_equal(got.reshape(2, 37), _onnxruntime(model, xq, optimized=False))
    with pytest.raises(LayerError, match="a MaxPool or a ReLU"):
        QPool("r", QParams(1.0, 0, "uint8"), QParams(1.0, 0, "uint8"), (1, 4, 2, 2), (2, 2),
              activation="relu", op_type="Relu")


def test_pooling_tiles_fit_small_buffers_and_split_channels():
    """A description with 2 KiB of accumulators and 1 KiB of input buffer: the pool splits
    into many pixel and channel tiles, double-buffered, and stays exact."""
    spec = load_spec("gemmini-16x16").with_overrides(scratchpad_kib=1, accumulator_kib=2)
    layer = QPool("p", QParams(0.05, 3, "uint8"), QParams(0.04, 0, "uint8"), (2, 70, 13, 11),
                  (3, 3), (1, 1), (1, 1, 1, 1), activation="relu")
    stream = lower(spec, layer)
    tm, tc = stream.info["tile"]
    assert tc < 70 and tm < 2 * 13 * 11 and stream.info["output_tiles"] > 8
    assert all(stream.buffers[b].slots == 2 for b in ("inp", "acc"))
    xq = np.random.default_rng(0).integers(0, 256, layer.input_shape).astype(np.uint8)
    assert np.array_equal(run(stream, xq)["y"], reference(layer, xq))


def test_the_cycle_model_counts_pool_instructions_on_the_alu():
    spec = load_spec("edge-32x32")
    layer = QPool("p", QParams(0.05, 0, "uint8"), QParams(0.05, 0, "uint8"), (1, 32, 8, 8),
                  (2, 2), (2, 2))
    stream = lower(spec, layer)
    pools = [i for i in stream.instructions if isinstance(i, isa.Pool)]
    alus = [i for i in stream.instructions if isinstance(i, isa.Alu)]
    assert [(p.m, p.n, p.window) for p in pools] == [(16, 32, 4)]
    assert [a.op for a in alus] == ["rescale"]
    report = estimate(stream, spec)
    # POOL: one 32-lane vector per cycle per window element; the ALU: one per cycle
    assert report.alu_cycles == 16 * 4 + 16
    assert report.macs == 0 and report.utilization == 0
    assert report.dram_read_bytes == 8 + 32 * 8 * 8  # the scales, each input byte once
    assert report.dram_write_bytes == 16 * 32
    assert report.energy_pj["scratchpad"] > 0 and report.cycles > report.alu_cycles


def test_a_pool_stream_round_trips_through_a_file(tmp_path):
    spec = load_spec("vta-16x16")
    layer = QPool("p", QParams(0.05, -3, "int8"), QParams(0.06, 4, "int8"), (1, 20, 6, 6),
                  (3, 3), (1, 1), (1, 1, 1, 1))
    stream = lower(spec, layer)
    loaded = isa.load(isa.save(stream, tmp_path / "p.npz"))
    assert loaded.instructions == stream.instructions
    xq = np.random.default_rng(1).integers(-128, 128, layer.input_shape).astype(np.int8)
    assert np.array_equal(run(loaded, xq)["y"], run(stream, xq)["y"])
    bad = isa.Stream(stream.name, stream.accel, stream.tensors, stream.buffers,
                     (isa.Alu(0, 0, 1, 1, 0, -128, 127, op="exp"),), stream.constants)
    with pytest.raises(isa.StreamError, match="unknown ALU operation 'exp'"):
        isa.validate(bad)


@pytest.mark.parametrize("kind, reason", [
    ("no_maxpool", "MaxPool is not among its ops"),
    ("ceil_mode", "ceil_mode=1 adds a window at the edge"),
    ("indices", "its Indices output is read"),
    ("clip", "a Clip after it"),
    ("average", "AveragePool is not a quantized Conv/MatMul/Gemm/MaxPool layer"),
])
def test_pools_it_cannot_run_stay_on_the_host_with_the_reason(kind, reason):
    spec = load_spec("gemmini-16x16")
    attrs = {"kernel_shape": [2, 2], "strides": [2, 2]}
    if kind == "no_maxpool":
        spec = spec.with_overrides(ops=[op for op in spec.ops if op != "MaxPool"])
    if kind == "ceil_mode":
        attrs["ceil_mode"] = 1
    model = _pool_model((1, 4, 7, 7), "uint8", (0.1, 0), (0.1, 0),
                        op="AveragePool" if kind == "average" else "MaxPool",
                        indices=kind == "indices", clip=kind == "clip", **attrs)
    found = _layer(model, spec)
    assert not found.layers
    assert reason in found.reason(next(n for n in mmcompile.Graph.from_onnx(model).gs.nodes
                                       if n.name == "pool"))


def test_a_window_of_padding_alone_is_refused():
    with pytest.raises(LayerError, match="must be smaller than the window"):
        QPool("p", QParams(0.1, 0, "uint8"), QParams(0.1, 0, "uint8"), (1, 1, 4, 4), (2, 2),
              pads=(2, 0, 0, 0))
    layer = QPool("p", QParams(0.1, 0, "uint8"), QParams(0.1, 0, "uint8"), (1, 1, 4, 4),
                  (2, 2))
    assert supports(load_spec("vta-16x16"), layer) == (True, "")


def test_a_relu_between_host_ops_stays_on_the_host():
    """conv -> relu -> depthwise -> relu -> depthwise -> relu -> conv: the ReLUs next to a
    dense convolution join it on the array; the one between the two depthwise convolutions
    (host) would only add two stage boundaries there, and stays on the host, saying why."""
    import torch

    from mmcompile.quantize import quantize

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.dw1 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.dw2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.b = torch.nn.Conv2d(8, 16, 3, padding=1)

        def forward(self, image):
            x = torch.relu(self.a(image))
            x = torch.relu(self.dw1(x))
            return self.b(torch.relu(self.dw2(x)))

    graph = mmcompile.trace(Net().eval(), {"image": torch.randn(1, 3, 8, 8)},
                            {"image": "image"})
    rng = np.random.default_rng(0)
    calibration = {"image": rng.standard_normal((4, 1, 3, 8, 8)).astype(np.float32)}
    qdq = quantize(graph, calibration, max_drop=None).graph
    found = analyse(qdq, load_spec("gemmini-16x16"))
    kinds = sorted(m.layer.op_type for m in found.layers.values())
    assert kinds == ["Conv", "Conv", "Relu", "Relu"]
    (alone,) = [n for n, r in found.refused.items() if "no accelerator layer next to it" in r]
    assert found.refused[alone].startswith("a Relu with no accelerator layer next to it")
    # with the convolutions on the host too (a description without Conv), every ReLU is
    # between host nodes; a pool or ReLU at the graph's own inputs and outputs (the single-op
    # graphs above) has no host node to split
    no_conv = load_spec("gemmini-16x16").with_overrides(
        ops=["MatMul", "Relu", "QuantizeLinear", "DequantizeLinear"])
    assert not analyse(qdq, no_conv).layers
