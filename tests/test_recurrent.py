"""LSTM, GRU and RNN lowered natively on the CPU target (targets/tvm/recurrent.py): every
direction, layout and state combination against onnx's reference, the capability query, and a
multimodal model with an LSTM branch compiled without any fallback stage."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import mmcompile
from mmcompile.reference import run_onnxruntime

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_model(op, steps=7, batch=2, width=5, hidden=6, direction="forward", layout=0,
                    initial=False, linear_before_reset=0, activation=None, bias=True,
                    sequence_lens=None, opset=14):
    """One recurrent layer over ``x`` (and a Relu on its output sequence, so the kernel's
    output feeds another kernel), weights scaled like a trained layer (1 / sqrt(hidden))."""
    rng = np.random.default_rng(0)
    gates, dirs = GATES[op], 2 if direction == "bidirectional" else 1
    scale = 1 / np.sqrt(hidden)
    inits = {"W": (rng.standard_normal((dirs, gates * hidden, width)) * scale),
             "R": (rng.standard_normal((dirs, gates * hidden, hidden)) * scale)}
    inputs = ["x", "W", "R", ""]
    if bias:
        inits["B"] = rng.standard_normal((dirs, 2 * gates * hidden)) * 0.1
        inputs[3] = "B"
    if sequence_lens is not None:
        inits["lens"] = np.full([batch], sequence_lens, np.int32)
    inputs.append("lens" if sequence_lens is not None else "")
    if initial:
        shape = [batch, dirs, hidden] if layout else [dirs, batch, hidden]
        inits["h0"] = rng.standard_normal(shape)
        inputs.append("h0")
        if op == "LSTM":
            inits["c0"] = rng.standard_normal(shape)
            inputs.append("c0")
    attrs = {"hidden_size": hidden, "direction": direction}
    if layout:
        attrs["layout"] = 1
    if op == "GRU":
        attrs["linear_before_reset"] = linear_before_reset
    if activation:
        attrs["activations"] = [activation] * dirs
    outs = ["y", "y_h"] + (["y_c"] if op == "LSTM" else [])
    graph = helper.make_graph(
        [helper.make_node(op, inputs, outs, name="recurrent", **attrs),
         helper.make_node("Relu", ["y"], ["out"], name="relu")], "recurrent",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                       [batch, steps, width] if layout else [steps, batch, width])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ["out"] + outs[1:]],
        [onnx.numpy_helper.from_array(v if v.dtype == np.int32 else v.astype(np.float32), k)
         for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _check(model, tolerance=1e-5):
    """Compiled without a fallback (so natively), against onnx's reference evaluator (which,
    unlike onnxruntime, runs layout 1), within ``tolerance`` of max(1, max|ref|)."""
    compiled = mmcompile.compile(model, verify=False, fallback=None, schedule="sequential")
    assert [s.target for s in compiled.stages] == ["cpu"]
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    got = compiled.run({"x": x})
    expected = dict(zip([o.name for o in model.graph.output],
                        ReferenceEvaluator(model).run(None, {"x": x})))
    for name, ref in expected.items():
        scale = max(1.0, float(np.abs(ref).max()))
        assert np.abs(np.asarray(got[name]) - ref).max() <= tolerance * scale, name
    return compiled


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction, layout, initial", [
    ("forward", 0, False), ("reverse", 1, True), ("bidirectional", 0, True),
    ("bidirectional", 1, False)])
def test_recurrent_layers_match_the_reference(op, direction, layout, initial):
    _check(recurrent_model(op, direction=direction, layout=layout, initial=initial))


@pytest.mark.parametrize("case", [
    dict(op="GRU", linear_before_reset=1),
    dict(op="GRU", linear_before_reset=1, direction="bidirectional", initial=True),
    dict(op="LSTM", bias=False),
    dict(op="LSTM", sequence_lens=7),  # constant and equal to the sequence length
    dict(op="LSTM", hidden=40, steps=20, batch=1),  # gates not a multiple of a tile
    dict(op="LSTM", opset=7),
    dict(op="LSTM", batch=8, direction="bidirectional"),  # batch blocks run in parallel
    dict(op="GRU", batch=6, initial=True),
    dict(op="RNN", batch=8, layout=1),
    # 1 MB of recurrent weights, one row of states: each thread owns chunks of hidden units
    dict(op="LSTM", hidden=256, steps=6, batch=1, direction="bidirectional", initial=True),
    dict(op="LSTM", hidden=256, steps=5, batch=3, layout=1),  # three rows in one tile
    # ... units that are not whole chunks: the product split over the threads per step
    dict(op="LSTM", hidden=232, steps=5, batch=1, initial=True),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_recurrent_variants_match_the_reference(case):
    _check(recurrent_model(**case))


def test_large_lstms_split_their_hidden_units_into_thread_chunks():
    from mmcompile.targets.tvm.recurrent import _unit_chunk, split_columns
    # one row of states, 1 MB of R^T: chunks of one register tile (8 vectors)
    assert _unit_chunk(1, 256, 1024, 16) == 128 and _unit_chunk(1, 256, 1024, 8) == 64
    assert _unit_chunk(2, 256, 1024, 16) == 64  # several rows: 4-vector tiles
    assert _unit_chunk(1, 128, 512, 16) is None  # 256 KB: one thread, no region
    assert _unit_chunk(1, 232, 1024, 16) is None  # not whole chunks
    assert _unit_chunk(8, 256, 1024, 16) is None  # batch blocks run in parallel instead
    order = split_columns(256, 128)
    assert sorted(order) == list(range(1024))
    # chunk 1, gate f (2): units 128..255 of ONNX's f columns
    assert list(order[6 * 128:7 * 128]) == list(range(2 * 256 + 128, 3 * 256))


@pytest.mark.parametrize("activation", ["Relu", "Sigmoid"])
def test_rnn_activations_match_onnxruntime(activation):
    # (onnx's reference evaluator has only Tanh)
    model = recurrent_model("RNN", activation=activation)
    compiled = mmcompile.compile(model, verify=True, tolerance=1e-5, fallback=None)
    assert "ok" in compiled.metadata["verification"]


@pytest.mark.parametrize("case, reason", [
    (dict(op="LSTM", sequence_lens=3), "sequence_lens"),
    (dict(op="RNN", activation="LeakyRelu"), "activation"),
])
def test_what_the_kernels_do_not_cover_falls_back_with_a_reason(case, reason):
    model = recurrent_model(**case)
    compiled = mmcompile.compile(model, verify=True, tolerance=1e-5)
    fallback = compiled.fallback_nodes()
    assert list(fallback) == ["recurrent"] and reason in fallback["recurrent"]


def test_cuda_does_not_claim_recurrent_ops():
    from mmcompile.planning import plan
    placed = plan(recurrent_model("LSTM"), target="cuda", schedule="sequential")
    assert "recurrent" in placed.fell_back()
    assert "no converter for LSTM" in placed.fell_back()["recurrent"]


def test_one_fused_kernel_per_direction():
    import tvm

    from mmcompile.targets.tvm.host import llvm_target
    from mmcompile.targets.tvm.lowering import lower_cpu
    from mmcompile.targets.tvm.recurrent import converters
    from mmcompile.frontend import from_onnx_model
    from mmcompile.targets.tvm.target import import_relax
    graph = from_onnx_model(recurrent_model("LSTM", direction="bidirectional"))
    target = llvm_target(None, 2)
    mod, _ = lower_cpu(import_relax(graph, "cpu", converters(16)), target)
    names = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert [n for n in names if n.startswith("lstm")] == ["lstm_bidirectional"]


def test_a_multimodal_model_with_an_lstm_audio_branch_compiles_natively():
    torch = pytest.importorskip("torch")
    from torch import nn

    class AudioText(nn.Module):
        """MOSEI-style: an LSTM over audio frames, a bag of token embeddings, late fusion."""

        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(74, 64, batch_first=True, bidirectional=True)
            self.embed = nn.Embedding(100, 32)
            self.head = nn.Linear(128 + 32, 3)

        def forward(self, audio, input_ids):
            _, (h, _) = self.lstm(audio)
            text = self.embed(input_ids).mean(1)
            return self.head(torch.cat([h[0], h[1], text], 1))

    torch.manual_seed(0)
    module = AudioText().eval()
    inputs = {"audio": torch.randn(2, 50, 74), "input_ids": torch.randint(0, 100, (2, 16))}
    compiled = mmcompile.compile(module, inputs, fallback=None, tolerance=1e-4)
    assert "ok" in compiled.metadata["verification"]
    with torch.no_grad():
        expected = module(**inputs).numpy()
    np.testing.assert_allclose(compiled(**{k: v.numpy() for k, v in inputs.items()}), expected,
                               rtol=1e-4, atol=1e-4)
    assert not compiled.fallback_nodes()


def test_onnxruntime_reference_agrees_on_layout_zero():
    model = recurrent_model("LSTM", direction="bidirectional", initial=True)
    x = np.random.default_rng(3).standard_normal((7, 2, 5)).astype(np.float32)
    compiled = mmcompile.compile(model, verify=False, fallback=None)
    expected = run_onnxruntime(model, {"x": x})
    for name, ref in expected.items():
        np.testing.assert_allclose(np.asarray(compiled.run({"x": x})[name]), ref, rtol=1e-5,
                                   atol=1e-5)
