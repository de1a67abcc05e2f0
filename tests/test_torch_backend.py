"""``torch.compile(model, backend="mmcompile")``: found through the entry point, outputs match
eager (``max|got - ref| <= 1e-4 * max(1, max|ref|)``), a new shape recompiles, what mmcompile
cannot take runs eagerly with a logged reason, bad options are refused by name."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo

import mmcompile
from mmcompile.torch_backend import BackendOptionError, check_options, valid_options

LOGGER = "mmcompile.torch_backend"
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each test sees its own compilations, not an earlier test's cache
    yield
    torch._dynamo.reset()


def assert_close(got, ref, tolerance=TOLERANCE):
    assert isinstance(got, torch.Tensor), f"got {type(got).__name__}, not a torch tensor"
    assert got.shape == ref.shape and got.dtype == ref.dtype
    scale = max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= tolerance * scale, f"max abs err {err:.3g} > {tolerance:g} * {scale:.3g}"


def compiled_shapes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and "compiled graph" in r.getMessage()]


def eager_reasons(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING]


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(image)) * 2


def test_backend_is_found_by_name_through_the_entry_point():
    from importlib.metadata import entry_points

    from torch._dynamo.backends.registry import lookup_backend

    from mmcompile.torch_backend import mmcompile_backend
    assert "mmcompile" in entry_points(group="torch_dynamo_backends").names
    assert "mmcompile" in torch._dynamo.list_backends()
    assert lookup_backend("mmcompile") is mmcompile_backend


@pytest.mark.parametrize("name", ["av_mnist", "mosei_tfn"])
def test_suite_modules_match_eager(name, caplog):
    from mmcompile.bench.suite import build
    module, inputs = build(name, 1)
    caplog.set_level(logging.INFO, logger=LOGGER)
    compiled = torch.compile(module, backend="mmcompile", options={"threads": 2})
    with torch.inference_mode():
        ref = module(**inputs)
        got = compiled(**inputs)
        again = compiled(**inputs)  # the cached model: no second compilation
    assert_close(got, ref)
    assert_close(again, ref)
    assert eager_reasons(caplog) == []
    assert len(compiled_shapes(caplog)) == 1, caplog.text


@pytest.mark.slow
def test_late_fusion_matches_eager(caplog):
    from mmcompile.bench.suite import build
    module, inputs = build("late_fusion", 1)
    caplog.set_level(logging.INFO, logger=LOGGER)
    with torch.inference_mode():
        got = torch.compile(module, backend="mmcompile", options={"threads": 2})(**inputs)
        ref = module(**inputs)
    assert_close(got, ref)
    assert eager_reasons(caplog) == []


def test_encoder_layer_fast_path_is_decomposed(caplog):
    # Under no_grad a batch-first nn.TransformerEncoderLayer runs a fused kernel the ONNX
    # exporter cannot lower: the backend rewrites it, so the graph compiles instead of
    # falling back to eager.
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True,
                                             norm_first=True).eval()
    x = torch.randn(2, 5, 16)
    caplog.set_level(logging.INFO, logger=LOGGER)
    with torch.no_grad():
        got = torch.compile(layer, backend="mmcompile")(x)
        ref = layer(x)
    assert_close(got, ref)
    assert eager_reasons(caplog) == []
    assert len(compiled_shapes(caplog)) == 1


class Recurrent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(6, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(torch.tanh(audio))
        return self.head(out[:, -1])


def test_a_recurrent_layer_is_captured_in_one_graph_not_broken_around(caplog):
    # dynamo breaks the graph at an LSTM unless allow_rnn is on; the backend turns it on
    torch.manual_seed(0)
    module = Recurrent().eval()
    compiled = torch.compile(module, backend="mmcompile")
    caplog.set_level(logging.INFO, logger=LOGGER)
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        assert_close(compiled(x), module(x))
    assert torch._dynamo.config.allow_rnn
    assert not torch._dynamo.utils.counters["graph_break"], \
        dict(torch._dynamo.utils.counters["graph_break"])
    assert len(compiled_shapes(caplog)) == 1 and not eager_reasons(caplog)


def test_new_shape_recompiles_and_matches(caplog):
    torch.manual_seed(0)
    module = Small().eval()
    compiled = torch.compile(module, backend="mmcompile")
    caplog.set_level(logging.INFO, logger=LOGGER)
    with torch.no_grad():
        for batch in (1, 3, 3):
            x = torch.randn(batch, 8)
            assert_close(compiled(x), module(x))
    shapes = compiled_shapes(caplog)
    # batch 1, then batch 3 (dynamo's second graph, with a SymInt batch), compiled once each
    assert len(shapes) == 2, shapes
    assert "[1, 8]" in shapes[0] and "[3, 8]" in shapes[1]


def test_dynamic_graph_compiles_per_shape(caplog):
    torch.manual_seed(0)
    module = Small().eval()
    compiled = torch.compile(module, backend="mmcompile", dynamic=True)
    caplog.set_level(logging.INFO, logger=LOGGER)
    with torch.no_grad():
        for batch in (2, 5, 2):
            x = torch.randn(batch, 8)
            assert_close(compiled(x), module(x))
    assert len(compiled_shapes(caplog)) == 2  # 2 and 5; the second batch 2 is cached


def small_compiled() -> tuple[torch.nn.Module, object, torch.Tensor]:
    """A seeded :class:`Small`, its ``torch.compile(backend="mmcompile")`` and an input."""
    torch.manual_seed(0)
    module = Small().eval()
    return module, torch.compile(module, backend="mmcompile"), torch.randn(2, 8)


def test_host_tensors_take_the_numpy_call_path_and_come_back_as_torch(monkeypatch):
    # host inputs go in as numpy views (mmcompile's faster call path), outputs come back as
    # torch tensors; a dtype numpy has no view of (bfloat16) keeps the torch path
    import numpy as np

    from mmcompile.runtime import CompiledModel
    from mmcompile.runtime import host_views
    kinds = []
    real = CompiledModel._run_ready
    monkeypatch.setattr(CompiledModel, "_run_ready", lambda self, ready, torch_out: (
        kinds.append({type(v).__module__.split(".")[0] for v in ready.values()}),
        real(self, ready, torch_out))[1])
    module, compiled, x = small_compiled()
    with torch.no_grad():
        got = compiled(x)
        assert_close(got, module(x))
        assert kinds and kinds[-1] == {"numpy"}
        got.add_(1.0)  # the caller owns the tensor it gets
        assert_close(compiled(x), module(x))
    views = host_views({"x": x, "bf16": x.to(torch.bfloat16)})
    assert isinstance(views["x"], np.ndarray) and isinstance(views["bf16"], torch.Tensor)


def test_changed_parameters_are_compiled_again():
    # Dynamo does not guard on parameter values; the backend baked them in, so it must notice.
    module, compiled, x = small_compiled()
    with torch.no_grad():
        before = compiled(x)
        module.lin.weight.mul_(-2.0)
        after = compiled(x)
        assert_close(after, module(x))
    assert (after - before).abs().max().item() > 0.1


def test_op_mmcompile_cannot_take_runs_eagerly_with_the_reason(caplog):
    def fn(x):
        return torch.linalg.cholesky(x @ x.mT + torch.eye(4)) * 2

    x = torch.randn(2, 4, 4)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with torch.no_grad():
        got = torch.compile(fn, backend="mmcompile")(x)
    assert_close(got, fn(x))
    reasons = eager_reasons(caplog)
    assert len(reasons) == 1 and "eagerly" in reasons[0]
    assert "cholesky" in reasons[0]  # the op at fault is named


def test_grad_mode_runs_eagerly_and_keeps_autograd(caplog):
    torch.manual_seed(0)
    module = Small()
    x = torch.randn(2, 8)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    out = torch.compile(module, backend="mmcompile")(x)
    assert_close(out, module(x))
    out.sum().backward()  # eager: the gradient flows to the parameters
    assert module.lin.weight.grad is not None
    assert any("requires grad" in r and "no_grad" in r for r in eager_reasons(caplog))


def test_graph_writing_its_input_in_place_runs_eagerly(caplog):
    def fn(x):
        x.add_(1.0)
        return x * 2

    x = torch.zeros(3)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with torch.no_grad():
        out = torch.compile(fn, backend="mmcompile")(x)
    assert torch.equal(x, torch.ones(3))  # the caller sees the write, as in eager
    assert torch.equal(out, torch.full((3,), 2.0))
    assert any("in place" in r for r in eager_reasons(caplog))


def test_options_reach_mmcompile_compile(monkeypatch):
    seen = {}
    real = mmcompile.compile

    def spy(model, example_inputs=None, **kwargs):
        seen.update(kwargs)
        return real(model, example_inputs, **kwargs)

    monkeypatch.setattr(mmcompile, "compile", spy)
    torch.manual_seed(0)
    module = Small().eval()
    x = torch.randn(2, 8)
    options = {"target": "cpu", "schedule": "sequential", "threads": 1, "verify": False}
    with torch.no_grad():
        got = torch.compile(module, backend="mmcompile", options=options)(x)
    assert_close(got, module(x))
    assert {k: seen[k] for k in options} == options
    assert callable(seen["progress"])


def test_unknown_option_is_an_error_listing_the_valid_ones():
    with pytest.raises(BackendOptionError, match=r"unknown mmcompile backend option.*'threds'"
                                                 r".*valid options: .*threads"):
        check_options({"threds": 2})
    assert {"target", "schedule", "tuning_db", "threads", "verify"} <= set(valid_options())
    assert "progress" not in valid_options()
    with pytest.raises(BackendOptionError, match="takes no mode"):
        check_options(None, mode="max-autotune")
    compiled = torch.compile(Small().eval(), backend="mmcompile", options={"threds": 2})
    with torch.no_grad(), pytest.raises(Exception, match="threds") as info:
        compiled(torch.randn(2, 8))
    # dynamo wraps the backend's error; the cause is ours
    cause = info.value
    while cause is not None and not isinstance(cause, BackendOptionError):
        cause = cause.__cause__ or getattr(cause, "inner_exception", None)
    assert isinstance(cause, BackendOptionError)
