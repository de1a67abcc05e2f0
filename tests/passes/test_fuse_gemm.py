"""fuse-gemm: MatMul + Add -> Gemm where Gemm's rank and broadcasting rules allow it, and an Add
into a Gemm that has no C. Only the summation order changes, so atol=1e-5 + 1e-5 * max|ref|."""

import numpy as np
import pytest
import torch
from helpers import FLOAT, INT64, check_pass, make_graph
from onnx import helper

import mmcompile


def _weights(*shape, seed=2, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _matmul_add(x_shape, c_shape, y_shape, *, c_const=True, b_const=True, extra_outputs=()):
    """y = x @ b + c, b is [5, 6]."""
    init, inputs = {}, [("x", FLOAT, x_shape)]
    for name, shape, is_const in (("b", [5, 6], b_const), ("c", c_shape, c_const)):
        if is_const:
            init[name] = _weights(*shape, seed=len(init))
        else:
            inputs.append((name, FLOAT, shape))
    nodes = [helper.make_node("MatMul", ["x", "b"], ["h"]),
             helper.make_node("Add", ["c", "h"], ["y"])]
    outputs = [("y", FLOAT, y_shape)] + [(n, FLOAT, [3, 6]) for n in extra_outputs]
    return make_graph(nodes, inputs, outputs, init)


def _is_gemm(g):
    assert dict(g.op_counts()) == {"Gemm": 1}
    assert len(g.gs.nodes[0].inputs) == 3


@pytest.mark.parametrize("x_shape,c_shape,c_const,b_const", [
    ([3, 5], [6], True, True),  # nn.Linear written as x @ W + b
    ([3, 5], [3, 1], False, False),  # neither B nor C constant; C broadcasts along N
    (["n", 5], [1, 6], True, True),  # symbolic M
    (["n", 5], ["n", 6], False, True),  # C as large as the output, same symbolic M
])
def test_fuses_matmul_add(x_shape, c_shape, c_const, b_const):
    graph = _matmul_add(x_shape, c_shape, [x_shape[0], 6], c_const=c_const, b_const=b_const)
    result = check_pass(graph, "fuse-gemm", expect_changed=True, structure=_is_gemm)
    assert result.records[0].stats == {"gemm_fused": 1, "gemm_bias_folded": 0}


def test_a_constant_row_bias_becomes_a_vector():
    """C of shape [1, N] (a tf2onnx Dense, Magika's) is written [N]: onnxruntime's per-channel
    quantizer indexes a bias by output channel and raised on the row."""
    graph = _matmul_add([3, 5], [1, 6], [3, 6])

    def structure(g):
        _is_gemm(g)
        assert g.gs.nodes[0].inputs[2].values.shape == (6,)

    check_pass(graph, "fuse-gemm", expect_changed=True, structure=structure)


def test_folds_add_into_gemm_without_c():
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], transB=1, alpha=0.5, beta=3.0),
             helper.make_node("Add", ["h", "c"], ["y"])]
    graph = make_graph(nodes, [("x", FLOAT, [3, 5])], [("y", FLOAT, [3, 6])],
                       {"w": _weights(6, 5), "c": _weights(1, 6, seed=3)})

    def structure(g):
        _is_gemm(g)
        assert g.gs.nodes[0].attrs["beta"] == 1.0 and g.gs.nodes[0].attrs["alpha"] == 0.5

    result = check_pass(graph, "fuse-gemm", expect_changed=True, structure=structure)
    assert result.records[0].stats == {"gemm_fused": 0, "gemm_bias_folded": 1}


@pytest.mark.parametrize("x_shape,c_shape,y_shape", [
    ([2, 3, 5], [6], [2, 3, 6]),  # rank-3 MatMul, as in transformers: no reshapes are inserted
    ([3, 5], [2, 3, 6], [2, 3, 6]),  # C broadcasts the sum to a larger shape
    ([3, 5], [4, 1, 1], [4, 3, 6]),
    ([5], [6], [6]),  # rank-1 A
    (["n", 5], ["m", 6], ["n", 6]),  # C's rows may not be M's
])
def test_leaves_illegal_shapes_alone(x_shape, c_shape, y_shape):
    graph = _matmul_add(x_shape, c_shape, y_shape, c_const=isinstance(c_shape[0], int))
    check_pass(graph, "fuse-gemm", expect_changed=False)


def test_leaves_shared_matmul_output_alone():
    graph = _matmul_add([3, 5], [6], [3, 6], extra_outputs=("h",))
    check_pass(graph, "fuse-gemm", expect_changed=False)


def test_leaves_integer_matmul_and_gemm_with_c_alone():
    nodes = [helper.make_node("MatMul", ["i", "ib"], ["ih"]),
             helper.make_node("Add", ["ih", "ic"], ["iy"]),
             helper.make_node("Gemm", ["x", "w", "c"], ["h"]),
             helper.make_node("Add", ["h", "c"], ["y"])]
    init = {"ib": np.ones((5, 6), np.int64), "ic": np.arange(6, dtype=np.int64),
            "w": _weights(5, 6), "c": _weights(6, seed=3)}
    graph = make_graph(nodes, [("i", INT64, [3, 5]), ("x", FLOAT, [3, 5])],
                       [("iy", INT64, [3, 6]), ("y", FLOAT, [3, 6])], init)
    check_pass(graph, "fuse-gemm", expect_changed=False)


class _LinearStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 6))
        self.b = torch.nn.Parameter(torch.randn(6))
        self.linear = torch.nn.Linear(6, 4, bias=False)
        self.bias = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        # exported as MatMul + Add, then Gemm (no C) + Add
        return self.linear(x @ self.w + self.b) + self.bias


def test_torch_linear_bias_add():
    torch.manual_seed(0)
    graph = mmcompile.trace(_LinearStack(), (torch.randn(3, 8),))
    assert graph.op_counts()["Add"] == 2

    def structure(g):
        assert dict(g.op_counts()) == {"Gemm": 2}

    result = check_pass(graph, "fuse-gemm", expect_changed=True, structure=structure)
    assert result.records[0].stats == {"gemm_fused": 1, "gemm_bias_folded": 1}
