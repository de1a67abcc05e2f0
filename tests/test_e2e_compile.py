"""End to end on real models: compile for the CPU, run, compare, save, load in a fresh process.

The examples (late fusion, CLIP) are compared with torch eager; transformers' CLIP, BLIP and
Whisper encoder and a ResNet-style CNN with onnxruntime on the exported graph. Tolerance: 1e-4
absolute (relative to max(1, max|ref|)).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_models import build

import mmcompile
from mmcompile.reference import compare_outputs, random_inputs, run_onnxruntime

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}",
                                                  ROOT / "examples" / name / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def close(got, ref) -> float:
    got, ref = np.asarray(got), np.asarray(ref)
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


FRESH_PROCESS = """
import sys, numpy as np, mmcompile
model = mmcompile.load(sys.argv[1])
feeds = dict(np.load(sys.argv[2]))
out = model.run(feeds)
np.savez(sys.argv[3], **{k: np.asarray(v) for k, v in out.items()})
"""


@pytest.mark.parametrize("name", ["late_fusion", "clip"])
def test_example_compile_run_save_load(name, tmp_path):
    ex = example(name)
    module, inputs = ex.build_model(), ex.example_inputs(1)
    compiled = mmcompile.compile(module, inputs, target="cpu", modalities=ex.MODALITIES)
    assert "ok" in compiled.metadata["verification"]

    got = compiled(**inputs)  # torch in -> torch out
    got = got if isinstance(got, tuple) else (got,)
    assert all(isinstance(t, torch.Tensor) for t in got)
    with torch.no_grad():
        ref = module(**inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for g, r in zip(got, ref):
        assert close(g, r) <= TOL

    path = compiled.save(tmp_path / f"{name}.mmc")
    feeds = {k: v.numpy() for k, v in inputs.items()}
    np.savez(tmp_path / "in.npz", **feeds)
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(path), str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    reloaded = np.load(tmp_path / "out.npz")
    for out_name, r in zip(compiled.output_names, ref):
        assert close(reloaded[out_name], r) <= TOL
    assert set(compiled.signature.inputs[i].modality for i in range(len(inputs))) == \
        set(ex.MODALITIES.values())


@pytest.mark.parametrize("name", ["clip", "blip", "whisper_encoder", "resnet"])
def test_transformers_and_cnn_exports_match_onnxruntime(name, tmp_path):
    module, inputs = build(name)
    graph = mmcompile.trace(module, inputs)
    path = graph.save(tmp_path / f"{name}.onnx")
    compiled = mmcompile.compile(path, target="cpu")  # verifies on random inputs
    feeds = random_inputs(graph, seed=3)
    for diff in compare_outputs(run_onnxruntime(graph, feeds), compiled.run(feeds)):
        assert diff.ok(TOL, TOL), str(diff)


def test_late_fusion_with_its_audio_branch_on_the_fallback_target(tmp_path):
    # a real multimodal model, placed on two targets: the audio branch in onnxruntime, the rest
    # through TVM; the outputs are torch's, the artifact reloads with both
    ex = example("late_fusion")
    module, inputs = ex.build_model(), ex.example_inputs(1)
    compiled = mmcompile.compile(module, inputs, modalities=ex.MODALITIES,
                                 placement={"audio": "onnxruntime"}, schedule="sequential")
    targets = {s.name: s.target for s in compiled.stages}
    assert "onnxruntime" in targets.values() and "cpu" in targets.values()
    with torch.no_grad():
        ref = module(**inputs)
    assert close(compiled(**inputs), ref) <= TOL
    assert "placed by the user (audio)" in compiled.report()
    reloaded = mmcompile.load(compiled.save(tmp_path / "mixed.mmc"))
    assert close(reloaded(**inputs), ref) <= TOL
