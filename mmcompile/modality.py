"""Modality tags for graph inputs.

An explicit mapping from the user always wins. Otherwise a tag is inferred first from the input's
name (the conventions of transformers / torchvision / torchaudio models), then from its shape and
dtype. Every tag records *how* it was decided, so ``mmcompile inspect`` can show it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mmcompile.errors import ModalityError

MODALITIES = ("image", "text", "audio", "video", "tabular", "other")


@dataclass(frozen=True)
class ModalityTag:
    """The modality of one graph input and the reason it was chosen."""

    modality: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"modality": self.modality, "reason": self.reason}


# Name rules, tried in order; the first match wins. Order matters: "audio_frames" is audio
# before "frames" says video, "audio_mask" is audio, not a text mask.
_NAME_RULES: tuple[tuple[str, str], ...] = (
    ("audio", r"audio|input_features|input_values|mel|spectrogram|waveform|speech|wav|fbank"),
    ("video", r"video|clip_frames|frames"),
    ("image", r"pixel|image|img|vision|visual|photo|rgb"),
    ("text", r"input_ids|token|text|word|caption|sentence|attention_mask|position_ids|\bids\b"),
    ("tabular", r"tabular|sensor|imu|accel|gyro|lidar|feature|numeric|vitals"),
)


def _infer_from_name(name: str) -> tuple[str, str] | None:
    lowered = name.lower()
    for modality, pattern in _NAME_RULES:
        match = re.search(pattern, lowered)
        if match:
            return modality, f"name '{name}' contains '{match.group(0)}'"
    return None


def _infer_from_shape(shape: Sequence[int | str | None] | None,
                      dtype: np.dtype | None) -> tuple[str, str]:
    if shape is None:
        return "other", "no rule matched (unknown rank)"
    rank = len(shape)
    try:
        is_int = dtype is not None and np.issubdtype(dtype, np.integer)
    except TypeError:  # a type numpy lacks (bfloat16: onnx-graphsurgeon keeps the ONNX enum)
        is_int = False
    channels = shape[1] if rank >= 2 else None
    if is_int and rank in (1, 2):
        return "text", f"integer tensor of rank {rank} (token ids)"
    if not is_int and rank == 4 and channels in (1, 3, 4):
        return "image", f"float tensor of rank 4 with {channels} channels (NCHW)"
    if not is_int and rank == 5:
        return "video", "float tensor of rank 5 (N, C/T, T/C, H, W)"
    if not is_int and rank in (2, 3) and channels in (40, 64, 80, 128):
        return "audio", f"float tensor of rank {rank} with {channels} bins (mel spectrogram)"
    if not is_int and rank == 2:
        return "tabular", "float tensor of rank 2 (batch, features)"
    return "other", f"no rule matched (rank {rank}, {'int' if is_int else 'float'})"


def assign_modalities(inputs: Mapping[str, tuple[Sequence[int | str | None] | None,
                                                  np.dtype | None]],
                      explicit: Mapping[str, str] | None = None,
                      model_name: str = "model") -> dict[str, ModalityTag]:
    """Tag every graph input with a modality.

    Args:
        inputs: input name -> (shape or None, numpy dtype or None), in graph order.
        explicit: user mapping input name -> modality; it wins over inference.
        model_name: used in error messages.

    Returns:
        input name -> :class:`ModalityTag`, for every input.

    Raises:
        ModalityError: the mapping names an input the model lacks, or an unknown modality.
    """
    explicit = dict(explicit or {})
    missing = sorted(set(explicit) - set(inputs))
    if missing:
        raise ModalityError(
            f"modality mapping for {model_name} names input(s) {missing} that the model does not "
            f"have; its inputs are {list(inputs)}")
    for name, modality in explicit.items():
        if modality not in MODALITIES:
            raise ModalityError(f"unknown modality '{modality}' for input '{name}'; expected one "
                                f"of {', '.join(MODALITIES)}")
    tags = {}
    for name, (shape, dtype) in inputs.items():
        if name in explicit:
            tags[name] = ModalityTag(explicit[name], "explicit mapping")
            continue
        guess = _infer_from_name(name) or _infer_from_shape(shape, dtype)
        tags[name] = ModalityTag(*guess)
    return tags


def parse_modality_args(items: Sequence[str]) -> dict[str, str]:
    """Parse CLI ``NAME=MODALITY`` items into a mapping (raises ModalityError if malformed)."""
    mapping = {}
    for item in items:
        name, sep, modality = item.partition("=")
        if not sep or not name or not modality:
            raise ModalityError(f"expected NAME=MODALITY, got '{item}'")
        mapping[name] = modality
    return mapping
