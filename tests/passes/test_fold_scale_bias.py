"""fold-scale-bias: constant per-channel Mul/Div/Add/Sub after Conv/Gemm/MatMul fold into it.

Rescaled weights round differently, so outputs are compared within atol=1e-4 + 1e-5 * max|ref|.
"""

import numpy as np
import pytest
import torch
from helpers import FLOAT, check_pass, make_graph
from onnx import helper

import mmcompile

ATOL, RTOL = 1e-4, 1e-5


def _const(*shape, seed=1, low=0.5, high=1.5):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def _weights(*shape, seed=2):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _conv_graph(tail, consts, conv_inputs=("x", "w"), op_type="Conv", spatial=2,
                y_shape=None, extra_inputs=(), extra_outputs=()):
    """x -> Conv (4 -> 6 channels, 3-wide kernel, writes h) -> ``tail`` (the last node writes y).

    ``extra_inputs``/``extra_outputs`` are more graph inputs/outputs shaped like h.
    """
    kernel = [3] * spatial
    w = _weights(6, 4, *kernel) if op_type == "Conv" else _weights(4, 6, *kernel)
    init = {"w": w, "b": _weights(6, seed=3), **consts}
    size = 3 if op_type == "Conv" else 7
    h_shape = [1, 6] + [size] * spatial
    nodes = [helper.make_node(op_type, list(conv_inputs), ["h"], kernel_shape=kernel), *tail]
    inputs = [("x", FLOAT, [1, 4] + [5] * spatial)] + [(n, FLOAT, h_shape) for n in extra_inputs]
    outputs = [("y", FLOAT, y_shape or h_shape)] + [(n, FLOAT, h_shape) for n in extra_outputs]
    return make_graph(nodes, inputs, outputs, init)


def _ops(graph):
    return dict(graph.op_counts())


def test_folds_mul_and_add_into_conv():
    tail = [helper.make_node("Mul", ["s", "h"], ["m"]), helper.make_node("Add", ["m", "t"], ["y"])]
    graph = _conv_graph(tail, {"s": _const(6, 1, 1), "t": _const(1, 6, 1, 1, seed=4)},
                        ("x", "w", "b"))

    def structure(g):
        assert _ops(g) == {"Conv": 1}

    result = check_pass(graph, "fold-scale-bias", expect_changed=True, structure=structure,
                        atol=ATOL, rtol=RTOL)
    assert result.records[0].stats == {"scales_folded": 1, "biases_folded": 1}


@pytest.mark.parametrize("op_type,spatial", [("Conv", 1), ("Conv", 3), ("ConvTranspose", 2)])
def test_folds_div_and_sub_into_conv_without_bias(op_type, spatial):
    per_channel = (6,) + (1,) * spatial
    tail = [helper.make_node("Div", ["h", "s"], ["m"]), helper.make_node("Sub", ["m", "t"], ["y"])]
    graph = _conv_graph(tail, {"s": _const(*per_channel), "t": np.float32(0.25)},
                        op_type=op_type, spatial=spatial)

    def structure(g):
        assert _ops(g) == {op_type: 1}
        assert len(g.gs.nodes[0].inputs) == 3  # the Sub became a bias

    check_pass(graph, "fold-scale-bias", expect_changed=True, structure=structure,
               atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("trans_b,with_c", [(1, True), (0, False)])
def test_folds_mul_and_add_into_gemm(trans_b, with_c):
    w = _weights(6, 5) if trans_b else _weights(5, 6)
    init = {"w": w, "c": _weights(6, seed=3), "s": _const(6), "t": _const(1, 6, seed=4)}
    nodes = [helper.make_node("Gemm", ["x", "w", "c"] if with_c else ["x", "w"], ["h"],
                              transB=trans_b, alpha=0.5, beta=2.0),
             helper.make_node("Mul", ["h", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["y"])]
    graph = make_graph(nodes, [("x", FLOAT, [3, 5])], [("y", FLOAT, [3, 6])], init)

    def structure(g):
        assert _ops(g) == {"Gemm": 1}
        assert len(g.gs.nodes[0].inputs) == 3

    check_pass(graph, "fold-scale-bias", expect_changed=True, structure=structure,
               atol=ATOL, rtol=RTOL)


def test_folds_mul_into_rank3_matmul_but_leaves_add_to_fuse_gemm():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Mul", ["h", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["y"])]
    graph = make_graph(nodes, [("x", FLOAT, [2, 3, 5])], [("y", FLOAT, [2, 3, 6])],
                       {"w": _weights(5, 6), "s": _const(1, 6), "t": _const(6, seed=4)})

    def structure(g):
        assert _ops(g) == {"MatMul": 1, "Add": 1}

    result = check_pass(graph, "fold-scale-bias", expect_changed=True, structure=structure,
                        atol=ATOL, rtol=RTOL)
    assert result.records[0].stats == {"scales_folded": 1, "biases_folded": 0}


@pytest.mark.parametrize("shape,y_shape", [
    ((1, 6, 3, 3), None),  # varies over space, not only over channels
    ((1, 1, 3), None),  # per column, not per channel
    ((2, 6, 1, 1), [2, 6, 3, 3]),  # broadcasts the output to a larger shape
    ((1, 6, 1, 1, 1), [1, 6, 6, 3, 3]),  # raises the output rank
])
def test_leaves_non_channel_constants_alone(shape, y_shape):
    graph = _conv_graph([helper.make_node("Mul", ["h", "s"], ["y"])], {"s": _const(*shape)},
                        y_shape=y_shape)
    check_pass(graph, "fold-scale-bias", expect_changed=False)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf - inf when comparing
def test_leaves_division_by_zero_alone():
    zero = _const(6, 1, 1)
    zero[2] = 0.0  # x / 0 is inf; 1 / 0 folded into the weights gives inf - inf = nan
    graph = _conv_graph([helper.make_node("Div", ["h", "zero"], ["y"])], {"zero": zero})
    check_pass(graph, "fold-scale-bias", expect_changed=False)


def test_leaves_other_cases_alone():
    tail = [
        helper.make_node("Sub", ["s", "h"], ["e"]),  # c - x: only x - c folds
        helper.make_node("Mul", ["e", "x2"], ["y"]),  # x2 is not a constant
    ]
    graph = _conv_graph(tail, {"s": _const(6, 1, 1)}, extra_inputs=("x2",))
    check_pass(graph, "fold-scale-bias", expect_changed=False)

    shared = _conv_graph([helper.make_node("Mul", ["h", "s"], ["y"])], {"s": _const(6, 1, 1)},
                         extra_outputs=("h",))  # the Conv output is also a graph output
    check_pass(shared, "fold-scale-bias", expect_changed=False)


class _ConvScaleBias(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.scale = torch.nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.shift = torch.nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x):
        return self.conv(x) * self.scale + self.shift


def test_torch_conv_scale_bias():
    torch.manual_seed(0)
    graph = mmcompile.trace(_ConvScaleBias(), (torch.randn(1, 3, 8, 8),))
    assert {"Mul", "Add"} <= set(graph.op_counts())

    def structure(g):
        assert _ops(g) == {"Conv": 1}

    check_pass(graph, "fold-scale-bias", expect_changed=True, structure=structure,
               atol=ATOL, rtol=RTOL)
