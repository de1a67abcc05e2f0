"""CPU target schedules: the blocked rule really applies, and epilogues it cannot cover decline."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import mmcompile


def _matmul_relu_func(m: int, n: int, k: int):
    from tvm import te
    a = te.placeholder((m, k), name="A")
    b = te.placeholder((k, n), name="B")
    r = te.reduce_axis((0, k), "r")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r] * b[r, j], axis=r), name="C")
    d = te.compute((m, n), lambda i, j: te.max(c[i, j], 0.0), name="D")
    return te.create_prim_func([a, b, d])


def test_blocked_matmul_rule_schedules_a_matmul_with_epilogue():
    # The rules swallow exceptions as "does not apply": a bug inside one silently sends every
    # matmul to the generic fallback (10x+ slower), so check the rule applies on its own.
    from mmcompile.targets.tvm.cpu_matmul import BlockedMatmul
    sch = BlockedMatmul._schedule(_matmul_relu_func(64, 128, 96), lanes=16)
    assert sch is not None
    assert any(inst.kind.name == "Parallel" for inst in sch.trace.insts)


def test_pad_after_linear_is_not_left_uninitialised():
    class LinearPad(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 32)

        def forward(self, x):
            return nn.functional.pad(self.linear(x), (0, 1), value=1.0)

    torch.manual_seed(0)
    module, x = LinearPad().eval(), torch.randn(8, 64)
    compiled = mmcompile.compile(module, (x,), verify=False)
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(compiled(x.numpy()), expected, atol=1e-5)
