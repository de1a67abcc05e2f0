"""Winograd F(4x4, 3x3) convolutions (targets/tvm/winograd.py): what the rewrite takes and
leaves, the kernels it makes, and their numbers against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mmcompile


def _conv_chain(shape=(1, 8, 16, 16), out_channels=16, kernel=3, stride=1, groups=1,
                padding=1, bias=True, relu=True, pool=2, const_weight=True, extra_use=False):
    """A Relax module: conv2d [-> add(bias)] [-> relu] [-> max_pool2d]; with ``extra_use``
    the relu's output is also returned (two users: the chain must stop there)."""
    from tvm import relax
    rng = np.random.default_rng(0)
    w = rng.standard_normal((out_channels, shape[1] // groups, kernel, kernel)).astype("float32")
    b = rng.standard_normal((1, out_channels, 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    params = [x]
    if not const_weight:
        wv = relax.Var("w", relax.TensorType(w.shape, "float32"))
        params.append(wv)
    with bb.function("main", params):
        with bb.dataflow():
            weight = relax.const(w) if const_weight else wv
            y = bb.emit(relax.op.nn.conv2d(x, weight, strides=stride, padding=padding,
                                           groups=groups))
            if bias:
                y = bb.emit(relax.op.add(y, relax.const(b)))
            if relu:
                y = bb.emit(relax.op.nn.relu(y))
            z = bb.emit(relax.op.nn.max_pool2d(y, pool, pool)) if pool > 1 else y
            out = bb.emit_output(relax.Tuple([z, y]) if extra_use else z)
        bb.emit_func_output(out)
    return bb.get()


def _calls(mod) -> list[str]:
    """Names of the ops / kernels ``main`` calls, in order."""
    import tvm
    from tvm import relax
    names = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
                if value.op.name == "relax.call_tir":
                    names.append(value.args[0].name_hint)
                else:
                    names.append(value.op.name)
    return names


@pytest.mark.parametrize("kernel", [3, 5])
def test_winograd_takes_the_conv_bias_relu_pool_chain(kernel):
    from mmcompile.targets.tvm.winograd import Winograd
    calls = _calls(Winograd()(_conv_chain(kernel=kernel, padding=kernel // 2)))
    assert calls == ["winograd_data", "relax.matmul", "winograd_output"]


@pytest.mark.parametrize("case", [
    dict(stride=2), dict(groups=2), dict(kernel=1, padding=0), dict(kernel=7, padding=3),
    dict(shape=(1, 4, 16, 16)), dict(shape=(1, 8, 6, 6), pool=1), dict(out_channels=12),
    dict(const_weight=False)])
def test_winograd_leaves_other_convolutions_alone(case):
    # stride 2, grouped, 1x1, 7x7, 4 input channels, a 6x6 output (tiles of 4 waste most),
    # 12 output channels (not whole vectors), weights that are an input
    from mmcompile.targets.tvm.winograd import Winograd
    calls = _calls(Winograd()(_conv_chain(**case)))
    assert "relax.nn.conv2d" in calls
    assert not any(c.startswith("winograd") for c in calls)


def test_winograd_chain_stops_at_a_value_with_another_user():
    # relu's output is also returned: the pool must read it, not a value the chain hid
    from mmcompile.targets.tvm.winograd import Winograd
    calls = _calls(Winograd()(_conv_chain(extra_use=True)))
    assert calls == ["winograd_data", "relax.matmul", "winograd_output", "relax.nn.max_pool2d"]


def test_tile_grid_pads_the_columns_to_whole_register_tiles():
    from mmcompile.targets.tvm.winograd import ROW_TILE, tile_grid
    assert tile_grid(1, 28, 28, 4) == (7, 8)  # 49 tiles -> 56: rows of 4
    assert tile_grid(1, 16, 16, 4) == (4, 4)
    assert tile_grid(2, 14, 10, 4) == (4, 3)  # 2 x 4 x 3 = 24 tiles: already whole
    assert tile_grid(1, 10, 10, 4) == (3, 4)  # 9 -> 12
    for batch in range(1, 9):
        rows, cols = tile_grid(batch, 28, 28, 4)
        assert rows == 7 and 7 <= cols < 7 + ROW_TILE and batch * rows * cols % ROW_TILE == 0


@pytest.mark.parametrize("r", [3, 5])
def test_winograd_matrices_give_the_direct_convolution(r):
    # F(4x4, r x r) on one tile in float64: A^T [(G g G^T) * (B^T d B)] A == the correlation
    from mmcompile.targets.tvm.winograd import matrices
    a, b, g = matrices(4, r)
    rng = np.random.default_rng(1)
    d, w = rng.standard_normal((r + 3, r + 3)), rng.standard_normal((r, r))
    winograd = a.T @ ((g @ w @ g.T) * (b.T @ d @ b)) @ a
    direct = np.array([[(d[i:i + r, j:j + r] * w).sum() for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(winograd, direct, rtol=1e-9, atol=1e-9)


def _lowered_kernels(mod, mcpu="znver3"):
    """``{kernel name: (block names, parallel)}`` of ``mod`` after the CPU lowering for
    ``mcpu``."""
    import re

    import tvm

    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import lower_cpu
    lowered, _ = lower_cpu(mod, llvm_target(mcpu, 2))
    return {gv.name_hint: (set(re.findall(r'T\.sblock\("(\w+)"\)', f.script())),
                           "T.parallel" in f.script())
            for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_consecutive_winograd_convolutions_stay_separate_and_scheduled():
    # conv -> pool -> conv: FuseOps fused the first output transform into the second data
    # transform (injective into injective) and the rule scheduled only half of it (1.0 ms
    # where the two took 0.3 ms apart)
    from tvm import relax
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 32, 32), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            for cin, cout in ((8, 16), (16, 16)):
                w = rng.standard_normal((cout, cin, 3, 3)).astype("float32")
                y = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(y, relax.const(w), padding=1)))
                y = bb.emit(relax.op.nn.max_pool2d(y, 2, 2))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    kernels = _lowered_kernels(bb.get())
    outputs = [n for n, (blocks, _) in kernels.items() if "wino_output" in blocks]
    data = [n for n, (blocks, _) in kernels.items() if "wino_data" in blocks]
    assert len(outputs) == 2 and len(data) == 2 and not set(outputs) & set(data)
    # the rule applied (the generic one inlines the transform passes into the last block)
    assert all("wino_tile" in kernels[n][0] for n in outputs)
    assert all("wino_rows" in kernels[n][0] for n in data)


def test_winograd_off_keeps_the_direct_convolution():
    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import lower_cpu
    lowered, _ = lower_cpu(_conv_chain(), llvm_target("znver3", 2), winograd=False)
    assert not any("winograd" in gv.name_hint for gv, _ in lowered.functions_items())


class _Net(nn.Module):
    """Convolutions the rewrite takes: 5x5 and 3x3 with bias + relu + pool (tile-aligned and
    not: 14 and 10 wide, padding tiles), one without bias or pool whose output has two users,
    and a batch > 1."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 16, 5, padding=2)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        y = self.c3(x)
        return torch.relu(y) + y.mean((2, 3), keepdim=True)


@pytest.mark.parametrize("shape", [(1, 8, 56, 40), (3, 8, 28, 28)])
def test_winograd_convolutions_match_torch(shape):
    torch.manual_seed(0)
    module = _Net().eval()
    x = torch.randn(*shape)
    compiled = mmcompile.compile(module, (x,), verify=False)
    with torch.no_grad():
        expected = module(x).numpy()
    # float32 transforms: ~1e-6 relative to the outputs' scale (1e-7 on the suite's models)
    np.testing.assert_allclose(compiled(x.numpy()), expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected).max() > 0.5


class _Detector(nn.Module):
    """A YOLOv8-shaped neck: stride-1 3x3 convolutions with BN + SiLU (x * sigmoid(x): reads
    the conv output twice), a residual bottleneck, channel concat, nearest upsampling, an SPPF
    max-pool chain and a HardSwish (x * hardsigmoid(x)) head."""

    def __init__(self):
        super().__init__()

        def conv(cin, cout, k=3, s=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False),
                                 nn.BatchNorm2d(cout), nn.SiLU())
        self.stem = conv(3, 16, 3, 2)
        self.c1, self.c2 = conv(16, 16), conv(16, 16)
        self.down = conv(32, 32, 3, 2)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.fuse = conv(64, 16, 1)
        self.head = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.Hardswish())

    def forward(self, images):
        x = self.stem(images)
        p3 = torch.cat([x, x + self.c2(self.c1(x))], 1)
        p4 = self.down(p3)
        p4 = self.fuse(torch.cat([p4, self.pool(p4)], 1))
        return self.head(torch.cat([nn.functional.interpolate(p4, scale_factor=2.0), x], 1))


def test_detector_shaped_graph_compiles_with_silu_epilogues_fused_into_the_output_transform():
    # "Buffer wino_output_intermediate is used before its definition": the SiLU after a
    # Winograd convolution was fused into its output transform and reverse-inlined block by
    # block, leaving the multiply's own read of the conv output dangling
    torch.manual_seed(0)
    module = _Detector().eval()
    x = torch.randn(1, 3, 64, 64)
    compiled = mmcompile.compile(module, (x,), verify=False, schedule="sequential")
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(compiled(x.numpy()), expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected).max() > 0.1


def _output_transform(out_channels: int, silu: bool):
    """The fused ``winograd_output`` kernel of an 8 -> ``out_channels`` 3x3 convolution on
    16x16 (followed by a SiLU when ``silu``): ``(kernel name, PrimFunc)``."""
    from tvm import relax

    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import fuse_cpu
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 16, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = rng.standard_normal((out_channels, 8, 3, 3)).astype("float32")
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1))
            if silu:
                y = bb.emit(relax.op.multiply(y, relax.op.sigmoid(y)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    fused = fuse_cpu(bb.get(), llvm_target("znver3", 2))
    (name, func), = [(gv.name_hint, f) for gv, f in fused.functions_items()
                     if "winograd_output" in gv.name_hint]
    return name, func


def _assert_schedule_agrees(func, lanes):
    """The rule schedules ``func`` for ``lanes``-wide vectors, and the scheduled kernel builds
    (well-formed) and computes what the unscheduled one does (1e-6)."""
    import tvm

    from mmcompile.targets.tvm.winograd import WinogradTransform
    sch = WinogradTransform._schedule(func, lanes)
    assert sch is not None
    target = tvm.target.Target({"kind": "llvm"})
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal([int(d) for d in p.shape]).astype("float32")
              for p in func.params]  # TVM 0.27: params are buffers; the last is the output
    results = []
    for f in (func, sch.mod["main"]):
        lib = tvm.compile(f.with_attr("global_symbol", "main"), target=target).jit()
        args = [tvm.runtime.tensor(a) for a in arrays]
        lib["main"](*args)
        results.append(args[-1].numpy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-6, atol=1e-6)
    assert np.abs(results[0]).max() > 0.5


def test_output_transform_takes_a_silu_epilogue_in_its_store():
    name, func = _output_transform(16, silu=True)
    assert "multiply" in name  # FuseOps put the SiLU into the output transform
    _assert_schedule_agrees(func, 8)


def test_output_transform_of_channels_that_are_not_whole_vectors_keeps_its_rule():
    # 24 output channels on AVX-512 (16 lanes): the rule raised (it fused the batch and row
    # loops across the unsplit channel loop) and the generic rule that took the kernel
    # inlined both transform passes into every output element (PaddleOCR's detector:
    # 16x the work, a quarter of the model's time)
    _, func = _output_transform(24, silu=False)
    _assert_schedule_agrees(func, 16)
    kernels = _lowered_kernels(_conv_chain(out_channels=24, pool=1), mcpu="znver4")
    (blocks, _), = [v for v in kernels.values() if "wino_output" in v[0]]
    assert "wino_tile" in blocks  # the transform kept its own passes (serial: a small kernel)
