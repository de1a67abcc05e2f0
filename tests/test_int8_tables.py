"""Elementwise chains between quantized tensors as byte lookup tables (targets/tvm/
int8_tables.py): ``Q(f(DQ(x)))`` -> ``take(table, x)`` where ``f`` is elementwise with scalar
constants, holds an op costlier than a few vector instructions, and its intermediate values
are read nowhere else."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import mmcompile


def _chain_model(kind: str, signed: bool = False, extra_output: bool = False,
                 signed_out: bool = False):
    """x -> Q -> DQ -> f -> Q (uint8, or int8 with ``signed_out``); ``kind`` picks f."""
    qtype = np.int8 if signed else np.uint8
    inits = [numpy_helper.from_array(np.array(np.float32(0.05)), "sx"),
             numpy_helper.from_array(np.array(-7 if signed else 121, qtype), "zx"),
             numpy_helper.from_array(np.array(np.float32(0.03)), "sy"),
             numpy_helper.from_array(np.array(9, np.int8 if signed_out else np.uint8), "zy"),
             numpy_helper.from_array(np.array(np.float32(1.702)), "k"),
             numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32)
                                     .reshape(1, 8, 1), "per_channel")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"])]
    if kind == "quick_gelu":  # CLIP's x * sigmoid(1.702 x)
        nodes += [helper.make_node("Mul", ["xd", "k"], ["t"]),
                  helper.make_node("Sigmoid", ["t"], ["s"]),
                  helper.make_node("Mul", ["xd", "s"], ["f"])]
    elif kind == "tanh":
        nodes += [helper.make_node("Tanh", ["xd"], ["f"])]
    elif kind == "relu":
        nodes += [helper.make_node("Relu", ["xd"], ["f"])]

    elif kind == "per_channel":  # a constant that differs along an axis: not one byte's function
        nodes += [helper.make_node("Mul", ["xd", "per_channel"], ["f"])]
    nodes.append(helper.make_node("QuantizeLinear", ["f", "sy", "zy"], ["y"]))
    outputs = [helper.make_tensor_value_info(
        "y", TensorProto.INT8 if signed_out else TensorProto.UINT8, [2, 8, 50])]
    if extra_output:  # an intermediate value read outside the chain
        outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, 8, 50]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 8, 50])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    feeds = {"x": (np.random.default_rng(0).standard_normal((2, 8, 50)) * 4).astype(np.float32)}
    return model, feeds


def _tables(model) -> tuple[int, str]:
    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.int8_tables import QuantizedTables
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    mod = relax.transform.DecomposeOpsForInference()(from_onnx(model, keep_params_in_input=False))
    rewrite = QuantizedTables(llvm_target())
    mod = rewrite(mod)
    return rewrite.count, mod["main"].script()


def _float_chain(model, feeds):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("kind, signed, signed_out", [
    ("quick_gelu", False, False), ("quick_gelu", True, False), ("tanh", False, False),
    ("quick_gelu", True, True)])
def test_a_chain_between_quantized_tensors_becomes_a_table(kind, signed, signed_out, tmp_path):
    model, feeds = _chain_model(kind, signed, signed_out=signed_out)
    count, text = _tables(model)
    assert count == 1 and "int8_table" in text and "R.sigmoid" not in text, text
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    got = mmcompile.compile(str(path), feeds, verify=False)(**feeds)
    expected = _float_chain(model, feeds)  # the QDQ graph in float: onnxruntime, no fusion
    steps = np.abs(got.astype(int) - expected.astype(int))
    assert steps.max() <= 1  # float32 rounding at a tie may differ, never more
    assert np.count_nonzero(steps) <= got.size // 100, np.count_nonzero(steps)


def test_a_chain_whose_intermediate_is_read_elsewhere_stays_float():
    count, text = _tables(_chain_model("quick_gelu", extra_output=True)[0])
    assert count == 0 and "R.sigmoid" in text


def test_a_per_channel_constant_keeps_the_chain_float():
    count, text = _tables(_chain_model("per_channel")[0])
    assert count == 0 and "int8_table" not in text


def test_a_chain_of_cheap_ops_stays_float_arithmetic():
    """DQ -> ReLU -> Q vectorizes as arithmetic in the kernel it fuses into; a byte gather
    per element is slower."""
    count, text = _tables(_chain_model("relu")[0])
    assert count == 0 and "R.nn.relu" in text


def test_the_table_holds_every_byte_of_the_chain(tmp_path):
    """All 256 codes through the compiled tanh chain: each equals f evaluated in float32 on
    the dequantized code (the table's definition)."""
    from mmcompile.targets.tvm.int8_tables import UNARY
    model, _ = _chain_model("tanh")
    codes = np.resize(np.arange(256), 800).reshape(2, 8, 50)
    feeds = {"x": ((codes - 121) * np.float32(0.05)).astype(np.float32)}
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    got = mmcompile.compile(str(path), feeds, verify=False)(**feeds)
    dequantized = (codes - 121).astype(np.float32) * np.float32(0.05)
    expected = np.clip(np.rint(UNARY["relax.tanh"](dequantized) / np.float32(0.03)) + 9, 0, 255)
    assert np.array_equal(got, expected.astype(np.uint8))


@pytest.mark.parametrize("permuted", [False, True], ids=["bytes", "vpermi2b"])
@pytest.mark.parametrize("size, in_dtype, out_dtype", [
    (800, "uint8", "uint8"), (64, "int8", "uint8"), (63, "uint8", "int8"),
    (40001, "int8", "int8")])  # a tail shorter than a vector; several parallel tasks
def test_the_lookup_kernel_gives_each_byte_its_entry(permuted, size, in_dtype, out_dtype):
    """The kernel alone, both ways (AVX512-VBMI's byte permutes, and one byte at a time):
    ``y[i] = table[byte of x[i]]`` for every byte value, in every position of a vector."""
    import tvm
    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.int8_tables import lookup_kernel
    from mmcompile.targets.tvm.schedule_util import has_features
    host = llvm_target()
    if permuted and not has_features(host, "avx512vbmi", "avx512bw"):
        pytest.skip("this CPU has no AVX512-VBMI")
    kernel = lookup_kernel(size, in_dtype, out_dtype, permuted)
    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}),
                      target=host)
    rng = np.random.default_rng(size)
    x = np.resize(rng.permutation(256), size).astype(np.uint8).view(in_dtype)
    table = rng.integers(0, 256, 256).astype(np.uint8)
    y = tvm.runtime.tensor(np.zeros(size, out_dtype))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(table), y)
    assert np.array_equal(y.numpy(), table[x.view(np.uint8)].view(out_dtype))


# -- Q -> DQ pairs left in float regions ----------------------------------------------------------

def _fake_quant_model(signed: bool):
    """x -> Mul -> Q -> DQ (a float op with its output's QDQ pair, as a QDQ graph's softmax or
    attention product has)."""
    qtype = np.int8 if signed else np.uint8
    inits = [numpy_helper.from_array(np.array(np.float32(0.05)), "s"),
             numpy_helper.from_array(np.array(-3 if signed else 121, qtype), "z"),
             numpy_helper.from_array(np.array(np.float32(1.0)), "one")]
    nodes = [helper.make_node("Mul", ["x", "one"], ["sq"]),
             helper.make_node("QuantizeLinear", ["sq", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [4, 250])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [4, 250])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _compile_relax(model, fake_quant: bool):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.int8_tables import FakeQuantPairs
    from mmcompile.targets.tvm.lowering import legalize_and_fuse
    from mmcompile.targets.tvm.schedules import schedule_cpu
    target = llvm_target()
    mod = relax.transform.DecomposeOpsForInference()(from_onnx(model, keep_params_in_input=False))
    rewrite = FakeQuantPairs()
    if fake_quant:
        mod = rewrite(mod)
    mod = schedule_cpu(legalize_and_fuse(mod, target), target)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    return rewrite.count, mod, lambda x: vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("signed", [False, True], ids=["uint8", "int8"])
def test_a_quantize_dequantize_pair_in_float_is_one_op_with_the_same_numbers(signed):
    # half steps (ties, or next to them after float32 rounding), values past both clamps,
    # and plain random ones
    model = _fake_quant_model(signed)
    rng = np.random.default_rng(0)
    steps = np.concatenate([np.arange(-300, 300) + 0.5, rng.uniform(-400, 400, 400)])
    x = (steps * 0.05).astype(np.float32).reshape(4, 250)
    count, mod, run = _compile_relax(model, fake_quant=True)
    assert count == 1
    assert "fake_quant" in mod.script() and "R.quantize" not in mod.script()
    _, _, reference = _compile_relax(model, fake_quant=False)  # TVM's own two ops
    got, expected = run(x), reference(x)
    assert np.array_equal(got, expected)  # bit for bit, ties and clamps included
    info = np.iinfo(np.int8 if signed else np.uint8)
    zero = -3 if signed else 121
    codes = np.rint(expected / np.float32(0.05)) + zero
    assert codes.min() == info.min and codes.max() == info.max  # both clamps reached
    assert len(np.unique(codes)) > 150  # and most codes between


def test_a_pair_with_different_scales_is_left_to_the_two_ops():
    model = _fake_quant_model(signed=False)
    model.graph.initializer.append(numpy_helper.from_array(np.array(np.float32(0.1)), "s2"))
    model.graph.node[2].input[1] = "s2"
    count, mod, _ = _compile_relax(model, fake_quant=True)
    assert count == 0
