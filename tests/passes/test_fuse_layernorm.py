"""fuse-layernorm: decomposed layer norms become LayerNormalization, affine tail included."""

import numpy as np
import pytest
from helpers import FLOAT, check_pass, make_graph
from onnx import helper

import mmcompile

SHAPE = [2, 5, 8]
RNG = np.random.default_rng(0)
CONSTS = {
    "axes": np.array([-1], np.int64), "axes2": np.array([2], np.int64),
    "axes_mid": np.array([1], np.int64), "axes_last2": np.array([-2, -1], np.int64),
    "eps": np.array(1e-5, np.float32), "two": np.array(2.0, np.float32),
    "half": np.array(0.5, np.float32), "mhalf": np.array(-0.5, np.float32),
    "keep_shape": np.array([2, 5, 1], np.int64),
    "gamma": RNG.standard_normal(8).astype(np.float32),
    "beta": RNG.standard_normal(8).astype(np.float32),
}


def _reduce_mean(x, out, axes="axes", keepdims=1, opset=18):
    if opset >= 18:
        return helper.make_node("ReduceMean", [x, axes], [out], keepdims=keepdims)
    values = CONSTS[axes].tolist()
    return helper.make_node("ReduceMean", [x], [out], axes=values, keepdims=keepdims)


def _layernorm_graph(square="mul", centering="shared", keepdims=1, denominator="div_sqrt",
                     affine="scale_bias", opset=18, axes="axes", var_axes=None, eps_input=False):
    """A decomposed layer norm over x [2, 5, 8]; each argument picks one spelling."""
    nodes = [_reduce_mean("x", "mean", axes, opset=opset),
             helper.make_node("Sub", ["x", "mean"], ["d"])]
    c = "d"
    if centering == "recomputed":  # what torch's var() exports
        nodes += [_reduce_mean("x", "mean2", "axes2", opset=opset),
                  helper.make_node("Sub", ["x", "mean2"], ["d2"])]
        c = "d2"
    nodes.append(helper.make_node("Mul", [c, c], ["sq"]) if square == "mul"
                 else helper.make_node("Pow", [c, "two"], ["sq"]))
    var_axes = var_axes or axes
    if keepdims:
        nodes.append(_reduce_mean("sq", "var", var_axes, opset=opset))
    else:
        nodes += [_reduce_mean("sq", "var0", var_axes, keepdims=0, opset=opset),
                  helper.make_node("Reshape", ["var0", "keep_shape"], ["var"])]
    nodes.append(helper.make_node("Add", ["var", "eps"], ["ve"]))
    nodes += {
        "div_sqrt": [helper.make_node("Sqrt", ["ve"], ["s"]),
                     helper.make_node("Div", ["d", "s"], ["n"])],
        "div_pow": [helper.make_node("Pow", ["ve", "half"], ["s"]),
                    helper.make_node("Div", ["d", "s"], ["n"])],
        "mul_recip": [helper.make_node("Sqrt", ["ve"], ["s"]),
                      helper.make_node("Reciprocal", ["s"], ["r"]),
                      helper.make_node("Mul", ["r", "d"], ["n"])],
        "mul_pow": [helper.make_node("Pow", ["ve", "mhalf"], ["r"]),
                    helper.make_node("Mul", ["d", "r"], ["n"])],
    }[denominator]
    last = "n"
    if affine in ("scale", "scale_bias"):
        nodes.append(helper.make_node("Mul", ["gamma", last], ["scaled"]))
        last = "scaled"
    if affine in ("bias", "scale_bias"):
        nodes.append(helper.make_node("Add", [last, "beta"], ["shifted"]))
        last = "shifted"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    consts = dict(CONSTS)
    inputs = [("x", FLOAT, SHAPE)]
    if eps_input:
        del consts["eps"]
        inputs.append(("eps", FLOAT, []))
    return make_graph(nodes, inputs, [("y", FLOAT, SHAPE)], consts, opset=opset)


def _fused(scale=None, bias=None, axis=-1):
    def structure(g):
        assert g.op_counts() == {"LayerNormalization": 1, "Identity": 1}
        ln = next(n for n in g.gs.nodes if n.op == "LayerNormalization")
        assert ln.inputs[0].name == "x" and ln.attrs["axis"] == axis
        assert ln.attrs["epsilon"] == pytest.approx(1e-5)
        norm_shape = SHAPE[axis:]
        expect_scale = np.ones(norm_shape) if scale is None else scale
        expect_bias = np.zeros(norm_shape) if bias is None else bias
        np.testing.assert_allclose(ln.inputs[1].values, expect_scale)
        np.testing.assert_allclose(ln.inputs[2].values, expect_bias)
    return structure


@pytest.mark.parametrize("keepdims", [1, 0])
@pytest.mark.parametrize("centering", ["shared", "recomputed"])
@pytest.mark.parametrize("square", ["mul", "pow"])
def test_fuses_variance_spellings(square, centering, keepdims):
    g = _layernorm_graph(square, centering, keepdims)
    result = check_pass(g, "fuse-layernorm", expect_changed=True,
                        structure=_fused(CONSTS["gamma"], CONSTS["beta"]))
    assert result.records[0].stats == {"layernorm_fused": 1, "affine_folded": 2}


@pytest.mark.parametrize("denominator", ["div_sqrt", "div_pow", "mul_recip", "mul_pow"])
def test_fuses_denominator_spellings(denominator):
    check_pass(_layernorm_graph(denominator=denominator, affine="none"), "fuse-layernorm",
               expect_changed=True, structure=_fused())


@pytest.mark.parametrize("affine,scale,bias", [
    ("none", None, None), ("scale", CONSTS["gamma"], None), ("bias", None, CONSTS["beta"])])
def test_partial_affine_tails(affine, scale, bias):
    check_pass(_layernorm_graph(affine=affine), "fuse-layernorm", expect_changed=True,
               structure=_fused(scale, bias))


def test_axes_as_attribute_before_opset_18():
    check_pass(_layernorm_graph(opset=17, centering="recomputed"), "fuse-layernorm",
               expect_changed=True, structure=_fused(CONSTS["gamma"], CONSTS["beta"]))


def test_normalising_over_two_trailing_axes():
    check_pass(_layernorm_graph(affine="none", axes="axes_last2"), "fuse-layernorm",
               expect_changed=True, structure=_fused(axis=-2))


def test_gamma_varying_over_other_axes_is_not_folded():
    g = _layernorm_graph(affine="scale")
    g.gs.tensors()["gamma"].values = RNG.standard_normal((5, 1)).astype(np.float32)

    def structure(out):
        assert out.op_counts() == {"LayerNormalization": 1, "Mul": 1, "Identity": 1}

    result = check_pass(g, "fuse-layernorm", expect_changed=True, structure=structure)
    assert result.records[0].stats == {"layernorm_fused": 1, "affine_folded": 0}


@pytest.mark.parametrize("case", ["non_last_axis", "mismatched_axes", "eps_input", "opset_16"])
def test_leaves_other_reductions_alone(case):
    if case == "non_last_axis":
        g = _layernorm_graph(axes="axes_mid")
    elif case == "mismatched_axes":  # mean over the last axis, variance over axis 1
        g = _layernorm_graph(var_axes="axes_mid")
    elif case == "eps_input":
        g = _layernorm_graph(eps_input=True)
    else:
        g = _layernorm_graph(opset=16)
    check_pass(g, "fuse-layernorm", expect_changed=False)


def test_torch_hand_written_layernorm():
    torch = pytest.importorskip("torch")

    class LayerNorm(torch.nn.Module):
        def __init__(self, n, eps=1e-5):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(n))
            self.b = torch.nn.Parameter(torch.randn(n))
            self.eps = eps

        def forward(self, x):
            return (x - x.mean(-1, keepdim=True)) / torch.sqrt(
                x.var(-1, keepdim=True, unbiased=False) + self.eps) * self.w + self.b

    torch.manual_seed(0)
    module = LayerNorm(8)
    g = mmcompile.trace(module, (torch.randn(*SHAPE),))

    def structure(out):
        assert out.op_counts() == {"LayerNormalization": 1}
        ln = out.gs.nodes[0]
        np.testing.assert_allclose(ln.inputs[1].values, module.w.detach().numpy())
        np.testing.assert_allclose(ln.inputs[2].values, module.b.detach().numpy())

    result = check_pass(g, "fuse-layernorm", expect_changed=True, structure=structure)
    assert result.records[0].stats["layernorm_fused"] == 1


def test_torch_nn_layernorm_is_left_alone():
    torch = pytest.importorskip("torch")
    g = mmcompile.trace(torch.nn.LayerNorm(8), (torch.randn(*SHAPE),))
    assert g.op_counts() == {"LayerNormalization": 1}  # the exporter already emits the op
    check_pass(g, "fuse-layernorm", expect_changed=False)
