"""fuse-conv-bn: an inference BatchNormalization folds into the Conv/ConvTranspose/Gemm/MatMul
before it.

Folding changes rounding (weights are rescaled in float64 and cast back to float32), so outputs
are compared within atol=1e-4 + 1e-5 * max|ref|.
"""

import numpy as np
import pytest
import torch
from helpers import FLOAT, check_pass, make_graph
from onnx import helper

import mmcompile

ATOL, RTOL = 1e-4, 1e-5
BN_INPUTS = ["bn.scale", "bn.bias", "bn.mean", "bn.var"]


def _bn_params(channels, seed=1):
    rng = np.random.default_rng(seed)
    return {"bn.scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
            "bn.bias": rng.standard_normal(channels).astype(np.float32),
            "bn.mean": rng.standard_normal(channels).astype(np.float32),
            "bn.var": rng.uniform(0.5, 2.0, channels).astype(np.float32)}


def _bn(x, y="y", **attrs):
    return helper.make_node("BatchNormalization", [x, *BN_INPUTS], [y], epsilon=1e-3, **attrs)


def _weights(*shape, seed=2):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _conv_bn_graph(spatial, bias, groups, op_type="Conv"):
    c_in, c_out, k = 4, 6, 3
    kernel = [k] * spatial
    if op_type == "Conv":
        w = _weights(c_out, c_in // groups, *kernel)
    else:
        w = _weights(c_in, c_out // groups, *kernel)
    init = {"w": w, **_bn_params(c_out)}
    inputs = ["x", "w"]
    if bias:
        init["b"] = _weights(c_out, seed=3)
        inputs.append("b")
    nodes = [helper.make_node(op_type, inputs, ["h"], group=groups, kernel_shape=kernel),
             _bn("h")]
    size = 3 if op_type == "Conv" else 7
    return make_graph(nodes, [("x", FLOAT, [1, c_in] + [5] * spatial)],
                      [("y", FLOAT, [1, c_out] + [size] * spatial)], init)


def _only_node(graph, op_type):
    nodes = [n for n in graph.gs.nodes if n.op == op_type]
    assert len(nodes) == 1, graph.op_counts()
    return nodes[0]


@pytest.mark.parametrize("op_type,spatial,bias,groups", [
    ("Conv", 2, True, 1), ("Conv", 1, False, 1), ("Conv", 3, True, 2), ("Conv", 2, False, 2),
    ("ConvTranspose", 2, True, 2), ("ConvTranspose", 1, False, 1),
])
def test_folds_bn_into_conv(op_type, spatial, bias, groups):
    graph = _conv_bn_graph(spatial, bias, groups, op_type)
    w_before = graph.gs.tensors()["w"].values.copy()

    def structure(g):
        assert g.op_counts() == {op_type: 1}
        conv = _only_node(g, op_type)
        assert len(conv.inputs) == 3 and tuple(conv.inputs[2].shape) == (6,)
        assert conv.inputs[1].values.dtype == np.float32
        assert not np.allclose(conv.inputs[1].values, w_before)

    result = check_pass(graph, "fuse-conv-bn", expect_changed=True, structure=structure,
                        atol=ATOL, rtol=RTOL)
    assert result.records[0].stats == {"bn_folded": 1}


@pytest.mark.parametrize("trans_b,c_shape", [(1, [6]), (0, None), (0, [1, 6]), (1, [3, 1])])
def test_folds_bn_into_gemm(trans_b, c_shape):
    w = _weights(6, 5) if trans_b else _weights(5, 6)
    init = {"w": w, **_bn_params(6)}
    inputs = ["x", "w"]
    if c_shape is not None:
        init["c"] = _weights(*c_shape, seed=3)
        inputs.append("c")
    nodes = [helper.make_node("Gemm", inputs, ["h"], transB=trans_b, alpha=0.7, beta=1.3),
             _bn("h")]
    graph = make_graph(nodes, [("x", FLOAT, [3, 5])], [("y", FLOAT, [3, 6])], init)

    def structure(g):
        gemm = _only_node(g, "Gemm")
        assert g.op_counts() == {"Gemm": 1}
        assert len(gemm.inputs) == 3 and gemm.attrs["beta"] == 1.0

    check_pass(graph, "fuse-conv-bn", expect_changed=True, structure=structure,
               atol=ATOL, rtol=RTOL)


def test_folds_bn_after_2d_matmul_into_gemm():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), _bn("h")]
    graph = make_graph(nodes, [("x", FLOAT, [3, 5])], [("y", FLOAT, [3, 6])],
                       {"w": _weights(5, 6), **_bn_params(6)})

    def structure(g):
        assert g.op_counts() == {"Gemm": 1}

    check_pass(graph, "fuse-conv-bn", expect_changed=True, structure=structure,
               atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("outputs,read,attrs,opset", [
    (["y", "rm", "rv"], ["y", "rm", "rv"], {"training_mode": 1}, 18),  # statistics are read
    (["y", "rm", "rv"], ["y"], {"training_mode": 1}, 18),  # normalizes with batch statistics
    (["y"], ["y"], {"spatial": 0}, 7),  # per-element statistics, not per-channel
])
def test_leaves_non_inference_bn_alone(outputs, read, attrs, opset):
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]),
             helper.make_node("BatchNormalization", ["h", *BN_INPUTS], outputs, **attrs)]
    params = _bn_params(6)
    if attrs.get("spatial") == 0:
        params = {k: np.broadcast_to(v[:, None, None], (6, 3, 3)).copy() for k, v in params.items()}
    shapes = {"y": [2, 6, 3, 3], "rm": [6], "rv": [6]}
    graph = make_graph(nodes, [("x", FLOAT, [2, 4, 5, 5])],
                       [(n, FLOAT, shapes[n]) for n in read],
                       {"w": _weights(6, 4, 3, 3), **params}, opset=opset)
    check_pass(graph, "fuse-conv-bn", expect_changed=False)


def test_leaves_shared_conv_output_alone():
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]), _bn("h"),
             helper.make_node("Relu", ["h"], ["r"])]
    graph = make_graph(nodes, [("x", FLOAT, [1, 4, 5, 5])],
                       [("y", FLOAT, [1, 6, 3, 3]), ("r", FLOAT, [1, 6, 3, 3])],
                       {"w": _weights(6, 4, 3, 3), **_bn_params(6)})
    check_pass(graph, "fuse-conv-bn", expect_changed=False)


def test_leaves_non_constant_weight_alone():
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]), _bn("h")]
    graph = make_graph(nodes, [("x", FLOAT, [1, 4, 5, 5]), ("w", FLOAT, [6, 4, 3, 3])],
                       [("y", FLOAT, [1, 6, 3, 3])], _bn_params(6))
    check_pass(graph, "fuse-conv-bn", expect_changed=False)


def test_leaves_rank3_matmul_alone():
    # BN normalizes axis 1 (the sequence here), not the MatMul's output channels.
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), _bn("h")]
    graph = make_graph(nodes, [("x", FLOAT, [2, 6, 5])], [("y", FLOAT, [2, 6, 6])],
                       {"w": _weights(5, 6), **_bn_params(6)})
    check_pass(graph, "fuse-conv-bn", expect_changed=False)


class _MatMulBN(torch.nn.Module):
    # The exporter folds BN after Conv/Gemm itself, but not after a MatMul.
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 6))
        self.bn = torch.nn.BatchNorm1d(6)
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)
        self.bn.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.bn(x @ self.w)


def test_torch_matmul_bn():
    torch.manual_seed(0)
    graph = mmcompile.trace(_MatMulBN(), (torch.randn(4, 8),))
    assert graph.op_counts()["BatchNormalization"] == 1

    def structure(g):
        assert g.op_counts() == {"Gemm": 1}

    check_pass(graph, "fuse-conv-bn", expect_changed=True, structure=structure,
               atol=ATOL, rtol=RTOL)
