"""Property-based tests: random small multimodal DAGs through every registered pass.

Each generated model has two or three input branches (an image branch on NCHW tensors, and
vector branches for text/audio/tabular features) built from a menu of the subgraphs exporters
emit (decomposed GELU and LayerNorm, Conv+BatchNorm, MatMul+Add, no-op Reshape/Cast/Transpose,
duplicated subexpressions), meeting at a Concat + Gemm fusion head. Every pass, alone and in the
default pipeline, must keep the outputs equal to the original under onnxruntime within
``ATOL + RTOL * max|ref|``, with the graph verified after every pass.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import mmcompile
from mmcompile.frontend import from_onnx_model
from mmcompile.reference import compare_outputs, random_inputs, run_onnxruntime

ATOL, RTOL = 1e-4, 1e-4
WIDTH = 8


class _Builder:
    def __init__(self, rng: np.random.Generator):
        self.rng, self.nodes, self.inits, self.ids = rng, [], [], itertools.count()

    def name(self, base: str) -> str:
        return f"{base}{next(self.ids)}"

    def const(self, value: np.ndarray) -> str:
        name = self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name("n"), **attrs))
        return out

    def weight(self, *shape: int) -> str:
        return self.const(self.rng.standard_normal(shape).astype(np.float32) * 0.5)


def _gelu(b: _Builder, x: str) -> str:
    erf = b.node("Erf", [b.node("Div", [x, b.const(np.float32(1.4142135))])])
    return b.node("Mul", [b.node("Mul", [x, b.const(np.float32(0.5))]),
                          b.node("Add", [erf, b.const(np.float32(1.0))])])


def _layernorm(b: _Builder, x: str) -> str:
    axes = b.const(np.array([-1], np.int64))
    centered = b.node("Sub", [x, b.node("ReduceMean", [x, axes], keepdims=1)])
    var = b.node("ReduceMean", [b.node("Pow", [centered, b.const(np.float32(2.0))]), axes],
                 keepdims=1)
    std = b.node("Sqrt", [b.node("Add", [var, b.const(np.float32(1e-5))])])
    return b.node("Add", [b.node("Mul", [b.node("Div", [centered, std]), b.weight(WIDTH)]),
                          b.weight(WIDTH)])


def _linear(b: _Builder, x: str) -> str:
    return b.node("Add", [b.node("MatMul", [x, b.weight(WIDTH, WIDTH)]), b.weight(WIDTH)])


def _noop_reshape(b: _Builder, x: str) -> str:
    return b.node("Reshape", [x, b.const(np.array([1, WIDTH], np.int64))])


def _noop_cast(b: _Builder, x: str) -> str:
    return b.node("Cast", [x], to=TensorProto.FLOAT)


def _double_transpose(b: _Builder, x: str) -> str:
    return b.node("Transpose", [b.node("Transpose", [x], perm=[1, 0])], perm=[1, 0])


def _duplicate(b: _Builder, x: str) -> str:
    scale = b.const(np.float32(0.7))
    return b.node("Add", [b.node("Mul", [x, scale]), b.node("Mul", [x, scale])])


def _scaled(b: _Builder, x: str) -> str:
    return b.node("Mul", [b.node("Add", [x, b.const(np.zeros(WIDTH, np.float32))]),
                          b.const(np.ones(WIDTH, np.float32))])


def _relu(b: _Builder, x: str) -> str:
    return b.node("Relu", [x])


def _tanh(b: _Builder, x: str) -> str:
    return b.node("Tanh", [x])


VECTOR_OPS = [_gelu, _layernorm, _linear, _noop_reshape, _noop_cast, _double_transpose,
              _duplicate, _scaled, _relu, _tanh]


def _image_branch(b: _Builder, x: str, depth: int) -> str:
    channels = 3
    for _ in range(depth):
        conv = b.node("Conv", [x, b.weight(4, channels, 3, 3), b.weight(4)], pads=[1, 1, 1, 1])
        var = b.const((b.rng.random(4) + 0.5).astype(np.float32))
        x = b.node("BatchNormalization", [conv, b.weight(4), b.weight(4), b.weight(4), var],
                   epsilon=1e-5)
        x = b.node("Relu", [x])
        channels = 4
    pooled = b.node("GlobalAveragePool", [x])
    flat = b.node("Flatten", [pooled], axis=1)
    return b.node("Gemm", [flat, b.weight(WIDTH, 4)], transB=1)


@st.composite
def multimodal_models(draw) -> onnx.ModelProto:
    b = _Builder(np.random.default_rng(draw(st.integers(0, 2**16))))
    n_vector = draw(st.integers(1, 2))
    with_image = draw(st.booleans()) or n_vector == 1
    inputs, branch_outputs = [], []
    if with_image:
        inputs.append(helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                    [1, 3, 6, 6]))
        branch_outputs.append(_image_branch(b, "pixel_values", draw(st.integers(1, 2))))
    for name in ["input_features", "sensor_values"][:n_vector]:
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, WIDTH]))
        x = name
        for op_fn in draw(st.lists(st.sampled_from(VECTOR_OPS), min_size=1, max_size=5)):
            x = op_fn(b, x)
        branch_outputs.append(x)
    fused = b.node("Concat", branch_outputs, axis=1)
    head = b.node("Gemm", [fused, b.weight(WIDTH * len(branch_outputs), 4), b.weight(4)])
    out = _gelu(b, head) if draw(st.booleans()) else head
    graph = helper.make_graph(b.nodes, "random_multimodal", inputs,
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4])],
                              initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _check(model: onnx.ModelProto, passes: str) -> None:
    graph = from_onnx_model(model, name="random")
    result = mmcompile.optimize(graph, passes, ctx=mmcompile.PassContext(verify_each=True))
    inputs = random_inputs(graph, seed=1)
    for diff in compare_outputs(run_onnxruntime(graph, inputs),
                                run_onnxruntime(result.graph, inputs)):
        assert diff.ok(ATOL, RTOL), f"{passes}: {diff}"


_FAST = settings(max_examples=15, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("pass_name", sorted(mmcompile.registered_passes()))
@_FAST
@given(model=multimodal_models())
def test_every_pass_preserves_outputs(pass_name, model):
    _check(model, pass_name)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=multimodal_models())
def test_default_pipeline_preserves_outputs_and_never_grows(model):
    graph = from_onnx_model(model, name="random")
    result = mmcompile.optimize(graph, "default", ctx=mmcompile.PassContext(verify_each=True))
    assert result.nodes_after <= result.nodes_before
    inputs = random_inputs(graph, seed=2)
    for diff in compare_outputs(run_onnxruntime(graph, inputs),
                                run_onnxruntime(result.graph, inputs)):
        assert diff.ok(ATOL, RTOL), str(diff)
