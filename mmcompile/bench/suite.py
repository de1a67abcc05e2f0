"""The ``multimodal`` benchmark suite: nine small models, seven modelled on the MMBench
workloads, two on deployed vision architectures.

Every model is built from code and configs with seeded random weights (nothing is downloaded)
and is small enough that the whole suite at batch 1 and 8 against four engines runs in minutes
on two cores. ``build(name, batch)`` gives the same module and inputs in any process, which is
how the torch engines rebuild a model in their own process.

| name           | workload        | branches -> fusion                                         |
|----------------|-----------------|------------------------------------------------------------|
| av_mnist       | AV-MNIST        | LeNet image CNN + audio-spectrogram CNN -> concat, MLP     |
| mm_imdb        | MM-IMDb         | image CNN + BERT encoder (BertConfig) -> concat, MLP       |
| mosei_tfn      | CMU-MOSEI (TFN) | text/audio/vision encoders over [B, T, F] -> tensor fusion |
| mosei_lstm     | CMU-MOSEI (TFN) | the same with LSTM sub-networks, as the original TFN       |
| clip           | CLIP            | ViT + text transformer (CLIPConfig), examples/clip         |
| whisper_text   | Whisper + text  | Whisper encoder + text transformer -> pool, concat, MLP    |
| late_fusion    | late fusion     | image CNN + text transformer + audio CNN, examples/        |
| mobilenet_text | mobile VQA      | MobileNetV3-Small + text transformer -> concat, MLP        |
| yolo_audio     | AV events       | YOLOv8-style detector + audio LSTM -> detections, events   |

``mosei_tfn`` gives each modality a transformer encoder, ``mosei_lstm`` the LSTMs of the
original TFN (the CPU target lowers LSTMs itself: :mod:`mmcompile.targets.tvm.recurrent`).
``mobilenet_text`` and ``yolo_audio`` carry the layer kinds of deployed vision models that the
MMBench-style ones lack (depthwise convolutions, squeeze-excitation, hard activations, SiLU,
upsampling, YOLOv8's DFL head), so that the suite does not flatter the compiler.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcompile.bench import BenchError

SEED = 0
_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@dataclass(frozen=True)
class SuiteModel:
    """One suite entry: how to build the module and its inputs at a batch size.

    Attributes:
        name: the name used by ``--models`` and in results.
        description: one line for tables.
        modalities: input name -> modality (for ``mmcompile.trace``).
        make_module: returns the module (the caller seeds torch first).
        make_inputs: batch -> dict of torch tensors keyed by forward() argument name.
    """

    name: str
    description: str
    modalities: dict[str, str]
    make_module: Callable[[], Any]
    make_inputs: Callable[[int], dict[str, Any]]


_MODELS: dict[str, SuiteModel] = {}
SUITES: dict[str, list[str]] = {"multimodal": []}


def register(model: SuiteModel, suite: str = "multimodal") -> SuiteModel:
    """Add a model to the registry (and to ``suite``); a second model with one name is an error."""
    if model.name in _MODELS:
        raise BenchError(f"suite model '{model.name}' is registered twice")
    _MODELS[model.name] = model
    SUITES.setdefault(suite, []).append(model.name)
    return model


def get(name: str) -> SuiteModel:
    """The suite entry called ``name``.

    Raises:
        BenchError: no such model (the message lists the known ones).
    """
    try:
        return _MODELS[name]
    except KeyError:
        raise BenchError(f"unknown suite model '{name}'; known models: "
                         f"{', '.join(_MODELS)}") from None


def build(name: str, batch: int) -> tuple[Any, dict[str, Any]]:
    """(module in eval mode, inputs at ``batch``) for suite model ``name``; deterministic.

    Raises:
        BenchError: unknown model, or an example model whose source folder is missing.
    """
    import torch
    entry = get(name)
    torch.manual_seed(SEED)
    module = entry.make_module().eval()
    return module, entry.make_inputs(batch)


def num_parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def export(name: str, batch: int, path: Path):
    """Export suite model ``name`` at a static ``batch`` to ONNX at ``path``; returns
    ``(graph, module, inputs)`` so the caller can run the torch reference on the same objects.

    Raises:
        ExportError: torch.onnx.export failed.
    """
    import mmcompile
    module, inputs = build(name, batch)
    graph = mmcompile.trace(module, inputs, get(name).modalities, name=name)
    graph.save(path)
    return graph, module, inputs


# -- shared pieces ---------------------------------------------------------------------------

def _inputs(spec: dict[str, tuple[tuple[int, ...], int | None]], salt: int) -> Callable:
    """An inputs factory: name -> (shape after the batch dim, integer upper bound or None for
    standard-normal floats)."""
    def make(batch: int) -> dict[str, Any]:
        import torch
        gen = torch.Generator().manual_seed(SEED + salt)
        out = {}
        for input_name, (shape, high) in spec.items():
            if high is None:
                out[input_name] = torch.randn((batch, *shape), generator=gen)
            else:
                out[input_name] = torch.randint(0, high, (batch, *shape), generator=gen)
        return out
    return make


def _randomize_batchnorm(module: Any) -> Any:
    # Non-trivial statistics, so batch-norm folding changes numbers and is checked.
    import torch
    gen = torch.Generator().manual_seed(SEED + 1)
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return module


def _example(name: str):
    """examples/<name>/model.py, loaded by path (the examples are not an installed package)."""
    module_name = f"_mmcompile_example_{name}_model"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = _EXAMPLES / name / "model.py"
    if not path.is_file():
        raise BenchError(f"suite model '{name}' is examples/{name}/model.py, which is not here "
                         f"({path}); run the benchmark from a source checkout")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _models():
    """The torch module classes, defined on first use so importing this file stays cheap."""
    import mmcompile.bench.models as models
    return models


# -- the suite ---------------------------------------------------------------------------------

register(SuiteModel(
    "av_mnist", "AV-MNIST: LeNet image CNN [1x28x28] + audio spectrogram CNN [1x112x112], concat",
    {"image": "image", "audio": "audio"},
    lambda: _randomize_batchnorm(_models().AVMnist()),
    _inputs({"image": ((1, 28, 28), None), "audio": ((1, 112, 112), None)}, salt=10)))

register(SuiteModel(
    "mm_imdb", "MM-IMDb: image CNN [3x96x96] + BERT (2x128) over 32 tokens, concat, 23 genres",
    {"pixel_values": "image", "input_ids": "text"},
    lambda: _randomize_batchnorm(_models().MMImdb()),
    _inputs({"pixel_values": ((3, 96, 96), None), "input_ids": ((32,), 2000)}, salt=20)))

register(SuiteModel(
    "mosei_tfn", "CMU-MOSEI: text/audio/vision encoders over 50 steps, tensor fusion (TFN)",
    {"text": "text", "audio": "audio", "vision": "video"},
    lambda: _models().MoseiTFN(),
    _inputs({"text": ((50, 300), None), "audio": ((50, 74), None), "vision": ((50, 35), None)},
            salt=30)))

register(SuiteModel(
    "mosei_lstm", "CMU-MOSEI: text/audio/vision LSTMs over 50 steps, tensor fusion (TFN)",
    {"text": "text", "audio": "audio", "vision": "video"},
    lambda: _models().MoseiLSTM(),
    _inputs({"text": ((50, 300), None), "audio": ((50, 74), None), "vision": ((50, 35), None)},
            salt=35)))

register(SuiteModel(
    "clip", "CLIP: ViT (2x128, 64px, patch 8) + text transformer (2x128, 16 tokens)",
    {"input_ids": "text", "pixel_values": "image"},
    lambda: _example("clip").build_model(),
    lambda batch: _example("clip").example_inputs(batch)))

register(SuiteModel(
    "whisper_text", "Whisper encoder (2x128, 80 mels x 100 frames) + text transformer, concat",
    {"input_features": "audio", "input_ids": "text"},
    lambda: _models().WhisperText(),
    _inputs({"input_features": ((80, 100), None), "input_ids": ((16,), 1000)}, salt=50)))

register(SuiteModel(
    "late_fusion", "late fusion: image CNN + text transformer + audio CNN, concat (examples/)",
    {"pixel_values": "image", "input_ids": "text", "input_features": "audio"},
    lambda: _example("late_fusion").build_model(),
    lambda batch: _example("late_fusion").example_inputs(batch)))

register(SuiteModel(
    "mobilenet_text", "MobileNetV3-Small [3x160x160] (depthwise, SE, HardSwish) + text "
    "transformer over 16 tokens, concat, 100 answers",
    {"pixel_values": "image", "input_ids": "text"},
    lambda: _randomize_batchnorm(_models().MobileNetText()),
    _inputs({"pixel_values": ((3, 160, 160), None), "input_ids": ((16,), 2000)}, salt=60)))

register(SuiteModel(
    "yolo_audio", "YOLOv8-style detector [3x160x160] (C2f, SiLU, upsample neck, DFL head) + "
    "audio LSTM over 50 frames, event classifier",
    {"pixel_values": "image", "input_features": "audio"},
    lambda: _randomize_batchnorm(_models().YoloAudio()),
    _inputs({"pixel_values": ((3, 160, 160), None), "input_features": ((50, 64), None)},
            salt=70)))
