"""Reductions over one element (depthwise 1x1 convolutions, K = 1 matmuls, 1x1 pools): the
TIR rewrite that makes them elementwise, and the models it used to miscompile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mmcompile


def _reduce_then_bias(k: int):
    """``out = sum_r(x[i, j, r] * w[j, r]) + b[j]`` over a reduction of ``k`` elements."""
    from tvm import te
    x = te.placeholder((4, 16, k), name="x")
    w = te.placeholder((16, k), name="w")
    b = te.placeholder((16,), name="b")
    r = te.reduce_axis((0, k), "r")
    s = te.compute((4, 16), lambda i, j: te.sum(x[i, j, r] * w[j, r], axis=r), name="s")
    out = te.compute((4, 16), lambda i, j: s[i, j] + b[j], name="out")
    return te.create_prim_func([x, w, b, out])


def _max_then_relu():
    from tvm import te
    x = te.placeholder((8, 1), name="x")
    r = te.reduce_axis((0, 1), "r")
    m = te.compute((8,), lambda i: te.max(x[i, r], axis=r), name="m")
    return te.create_prim_func([x, te.compute((8,), lambda i: te.max(m[i], 0.0), name="out")])


def _has_init(func) -> bool:
    return "T.init()" in func.script()


def _run(func, arrays):
    import tvm
    lib = tvm.compile(func.with_attr("global_symbol", "main"),
                      target=tvm.target.Target({"kind": "llvm"})).jit()
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*args)
    return args[-1].numpy()


def _arrays(func, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [[int(d) for d in p.shape] for p in func.params]  # TVM 0.27: params are buffers
    return [rng.standard_normal(s).astype("float32") for s in shapes[:-1]] + \
        [np.zeros(shapes[-1], "float32")]


@pytest.mark.parametrize("build", [lambda: _reduce_then_bias(1), _max_then_relu],
                         ids=["sum", "max"])
def test_unit_reductions_become_elementwise_blocks_with_the_same_numbers(build):
    from mmcompile.targets.tvm.unit_reductions import spatialize
    func = build()
    assert _has_init(func)
    new, count = spatialize(func)
    assert count == 1 and not _has_init(new)
    again, count_again = spatialize(new)
    assert count_again == 0 and again.same_as(new)  # a second run is a no-op
    arrays = _arrays(func)
    np.testing.assert_array_equal(_run(new, arrays), _run(func, arrays))  # same operations


def test_reductions_over_several_elements_are_left_alone():
    from mmcompile.targets.tvm.unit_reductions import spatialize
    func = _reduce_then_bias(3)
    new, count = spatialize(func)
    assert count == 0 and new.same_as(func) and _has_init(new)


@pytest.mark.parametrize("k", [1, 3])
def test_cpu_rules_apply_a_bias_after_a_unit_reduction_once(k):
    # The miscompile's mechanism: the generic rule inlined the bias into the reduction's
    # init and its body (2x the bias). Through the whole lowering (zero pipeline + rewrite +
    # CPU rules), the scheduled kernel must equal the plain loops.
    import tvm

    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.schedules import schedule_cpu
    from mmcompile.targets.tvm.unit_reductions import SpatializeUnitReductions
    func = _reduce_then_bias(k)
    mod = SpatializeUnitReductions()(tvm.IRModule({"main": func}))
    scheduled = schedule_cpu(mod, llvm_target(None, 2))["main"]
    arrays = _arrays(func, seed=1)
    np.testing.assert_allclose(_run(scheduled, arrays), _run(func, arrays), rtol=1e-6, atol=1e-6)


class _PlusConstant(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, input):
        return self.inner(input) + 1.5


class _GlobalPool(nn.Module):
    def forward(self, input):
        return nn.functional.adaptive_avg_pool2d(input, 1) + 1.0


# Each was off by 20-41% of its output's range (relative to max(1, max|ref|)) before the
# rewrite: the bias / constant after the unit reduction was added twice.
_LAYERS = {
    "depthwise_1x1": (lambda: nn.Conv2d(16, 16, 1, groups=16), (1, 16, 32, 32)),
    "depthwise_1x1_stride2": (lambda: nn.Conv2d(16, 16, 1, stride=2, groups=16), (1, 16, 32, 32)),
    "depthwise_1x1_gelu": (lambda: nn.Sequential(nn.Conv2d(16, 16, 1, groups=16), nn.GELU()),
                           (2, 16, 32, 32)),
    "one_channel_1x1": (lambda: nn.Conv2d(1, 8, 1), (1, 1, 32, 32)),
    "depthwise_conv1d_1": (lambda: nn.Conv1d(16, 16, 1, groups=16), (1, 16, 64)),
    "linear_k1": (lambda: nn.Linear(1, 32), (2, 8, 1)),
    "avg_pool_1x1": (lambda: _PlusConstant(nn.AvgPool2d(1)), (1, 4, 8, 16)),
    "global_pool_of_1x1": (lambda: _GlobalPool(), (1, 16, 1, 1)),
    "depthwise_conv_transpose_1x1": (lambda: nn.ConvTranspose2d(16, 16, 1, groups=16),
                                     (1, 16, 8, 8)),
}


@pytest.mark.parametrize("name", list(_LAYERS))
def test_layers_with_single_element_reductions_match_torch(name):
    build, shape = _LAYERS[name]
    torch.manual_seed(0)
    module = build().eval()
    x = torch.randn(*shape)
    compiled = mmcompile.compile(module, {"input": x}, verify=False)
    with torch.no_grad():
        expected = module(x).numpy()
    got = compiled(input=x.numpy())
    # elementwise after the fix: float32 rounding only (GELU's polynomial: ~2e-7)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_cuda_lowering_shares_the_rewrite():
    # dlight's GPU rules inline epilogues the same way (the CUDA target had the same bug):
    # the scheduled kernel of a depthwise 1x1 conv + bias has no init and reads the bias once
    # in its computation. Lowering only: no GPU or nvcc needed.
    import tvm

    from mmcompile.target import CompileOptions
    from mmcompile.targets.tvm.target import TVMCudaTarget, import_relax
    graph = mmcompile.trace(nn.Conv2d(16, 16, 1, groups=16).eval(),
                            {"input": torch.randn(1, 16, 8, 8)})
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    mod, _ = TVMCudaTarget()._lower(import_relax(graph, "cuda"), target, CompileOptions())
    kernels = {gv.name_hint: f.script() for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc)}
    assert kernels and not any("T.init()" in k for k in kernels.values())
    conv = next(k for name, k in kernels.items() if "conv" in name)
    store = [line for line in conv.splitlines() if "T_add_intermediate[" in line and " = " in line]
    assert len(store) == 1 and store[0].count("param_1[") == 1, store
