"""Modality tags: explicit mappings, name rules, shape fallbacks, errors."""

import numpy as np
import pytest

from mmcompile.errors import ModalityError
from mmcompile.modality import MODALITIES, ModalityTag, assign_modalities, parse_modality_args

F32, I64 = np.dtype(np.float32), np.dtype(np.int64)


def _tag(name, shape, dtype, explicit=None):
    return assign_modalities({name: (shape, dtype)}, explicit)[name]


def test_explicit_mapping_wins_over_name_and_shape():
    tags = assign_modalities({"pixel_values": ([1, 3, 224, 224], F32), "input_ids": ([1, 7], I64)},
                             {"pixel_values": "audio"})
    assert tags["pixel_values"] == ModalityTag("audio", "explicit mapping")
    assert tags["input_ids"].modality == "text"


@pytest.mark.parametrize("name, modality", [
    ("pixel_values", "image"),
    ("input_ids", "text"),
    ("attention_mask", "text"),
    ("input_features", "audio"),
    ("input_values", "audio"),
    ("audio_mask", "audio"),
    ("video_frames", "video"),
    ("sensor", "tabular"),
    ("sensor_readings", "tabular"),
    ("imu", "tabular"),
    ("IMU_data", "tabular"),
])
def test_name_rules(name, modality):
    # A shape that would mean something else, so only the name can decide.
    tag = _tag(name, [1, 3, 8, 8], F32)
    assert tag.modality == modality
    assert tag.reason.startswith(f"name '{name}' contains ")


@pytest.mark.parametrize("shape, dtype, modality, reason_part", [
    (["batch", 16], I64, "text", "integer tensor of rank 2"),
    ([1, 3, 32, 32], F32, "image", "3 channels"),
    (["batch", 1, 28, 28], F32, "image", "1 channels"),
    (["batch", 80, 3000], F32, "audio", "80 bins"),
    ([2, 3, 8, 16, 16], F32, "video", "rank 5"),
    ([4, 10], F32, "tabular", "rank 2"),
    ([4, 7, 5, 5], F32, "other", "no rule matched"),
    (None, F32, "other", "unknown rank"),
])
def test_shape_fallbacks(shape, dtype, modality, reason_part):
    tag = _tag("x", shape, dtype)
    assert tag.modality == modality
    assert reason_part in tag.reason


def test_every_tag_has_a_reason_and_a_known_modality():
    inputs = {"pixel_values": ([1, 3, 4, 4], F32), "x": ([2, 5], I64), "y": (None, None),
              "z": ([1], F32)}
    tags = assign_modalities(inputs, {"z": "other"})
    assert list(tags) == list(inputs)
    for tag in tags.values():
        assert tag.modality in MODALITIES
        assert isinstance(tag.reason, str) and tag.reason
    assert tags["y"].to_dict() == {"modality": "other", "reason": "no rule matched (unknown rank)"}


def test_mapping_naming_a_missing_input_lists_the_real_inputs():
    with pytest.raises(ModalityError) as info:
        assign_modalities({"pixel_values": ([1, 3, 4, 4], F32), "input_ids": ([1, 4], I64)},
                          {"pixels": "image"}, model_name="clip.onnx")
    message = str(info.value)
    assert "clip.onnx" in message and "['pixels']" in message
    assert "['pixel_values', 'input_ids']" in message


def test_unknown_modality_is_rejected():
    with pytest.raises(ModalityError, match="unknown modality 'lidar' for input 'x'") as info:
        assign_modalities({"x": ([1, 3], F32)}, {"x": "lidar"})
    for modality in MODALITIES:
        assert modality in str(info.value)


def test_parse_modality_args():
    assert parse_modality_args(["a=image", "b=text"]) == {"a": "image", "b": "text"}
    for bad in ["a", "=image", "a="]:
        with pytest.raises(ModalityError, match="expected NAME=MODALITY"):
            parse_modality_args([bad])
