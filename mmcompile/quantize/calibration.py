"""Calibration data: samples per model input, grouped by modality, checked before any use.

A calibration set may hold a different number of samples per modality (a multimodal dataset
often has far more images than transcribed audio); inputs of one modality are paired sample by
sample, so they must agree. Every problem is an :class:`~mmcompile.errors.InputError` naming
the input: unknown or missing names, a wrong shape or dtype kind, no samples, NaN / inf, token
ids outside an embedding table.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcompile.errors import InputError
from mmcompile.ir import Graph
from mmcompile.reference import embedding_bound, input_signature


@dataclass
class CalibrationSet:
    """Checked calibration samples.

    Attributes:
        samples: input name -> samples, each of the input's exact shape and dtype.
        modalities: modality -> the inputs tagged with it (in graph order).
    """

    samples: dict[str, list[np.ndarray]]
    modalities: dict[str, list[str]]

    def count(self, modality: str) -> int:
        """Samples of ``modality`` (its inputs all have this many)."""
        return len(self.samples[self.modalities[modality][0]])

    def counts(self) -> dict[str, int]:
        return {m: self.count(m) for m in self.modalities}

    def sha256(self) -> str:
        """A hash of the data (names, shapes, dtypes, values), recorded in artifacts."""
        digest = hashlib.sha256()
        for name in sorted(self.samples):
            for sample in self.samples[name]:
                digest.update(f"{name}|{sample.dtype}|{sample.shape}|".encode())
                digest.update(np.ascontiguousarray(sample).tobytes())
        return digest.hexdigest()

    def split(self, holdout: float) -> tuple[CalibrationSet, CalibrationSet | None]:
        """``(calibrate, held_back)``: the last ``holdout`` share of each modality's samples
        held back for measuring accuracy (at least one, when a modality has two or more);
        ``None`` when a modality has a single sample, so nothing can be held back."""
        if holdout <= 0 or min(self.counts().values()) < 2:
            return self, None
        keep: dict[str, int] = {}
        for modality, count in self.counts().items():
            keep[modality] = count - min(count - 1, max(1, round(count * holdout)))
        head, tail = {}, {}
        for modality, names in self.modalities.items():
            for name in names:
                head[name] = self.samples[name][:keep[modality]]
                tail[name] = self.samples[name][keep[modality]:]
        return CalibrationSet(head, self.modalities), CalibrationSet(tail, self.modalities)

    def feeds(self, counts: Mapping[str, int] | None = None,
              only: str | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feed dicts for the model. Default: the first ``min`` count of samples of every
        modality, paired by index. With ``only``: all of that modality's samples, the other
        inputs held at their first sample (what a branch that reads only ``only`` sees)."""
        if only is not None:
            n = self.count(only)
        else:
            n = min((counts or self.counts()).values())
        for i in range(n):
            feed = {}
            for modality, names in self.modalities.items():
                index = i if only is None or modality == only else 0
                for name in names:
                    feed[name] = self.samples[name][index]
            yield feed


def load_calibration(data: Any, graph: Graph) -> CalibrationSet:
    """Read and check calibration data for ``graph``.

    Args:
        data: a ``.npz`` path or a mapping input name -> array whose first axis indexes
            samples (counts may differ between modalities), or a sequence of feed dicts (one
            per sample; a dict may leave out a modality's inputs, which then has fewer
            samples).
        graph: the model; its inputs' shapes, dtypes and modality tags.

    Raises:
        InputError: the data does not fit the model (the input and the problem named).
    """
    if isinstance(data, (str, os.PathLike)):
        data = _read_npz(Path(data))
    signature = input_signature(graph)
    if isinstance(data, Mapping):
        samples = {name: _unstack(name, value, signature) for name, value in data.items()}
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        samples = _from_feeds(data, signature)
    else:
        raise InputError("calibration data must be a .npz path, a mapping input name -> "
                         "samples, or a sequence of feed dicts; got "
                         f"{type(data).__name__}")
    unknown = sorted(set(samples) - set(signature))
    if unknown:
        raise InputError(f"calibration data names {', '.join(map(repr, unknown))}, not inputs "
                         f"of {graph.name} (its inputs: {', '.join(signature)})")
    missing = [name for name in signature if not samples.get(name)]
    if missing:
        raise InputError(f"calibration data has no samples for input(s) "
                         f"{', '.join(map(repr, missing))} of {graph.name}")
    for name, values in samples.items():
        samples[name] = [_checked(name, i, v, signature[name], graph)
                         for i, v in enumerate(values)]
    modalities: dict[str, list[str]] = {}
    for name in signature:
        tag = graph.modalities.get(name)
        modalities.setdefault(tag.modality if tag else "other", []).append(name)
    for modality, names in modalities.items():
        counts = {name: len(samples[name]) for name in names}
        if len(set(counts.values())) > 1:
            raise InputError(f"calibration data: the {modality} inputs are paired sample by "
                             f"sample but have different counts: {counts}")
    return CalibrationSet({name: samples[name] for name in signature}, modalities)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise InputError(f"calibration file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read calibration file {path} as .npz: {exc}") from exc


def _unstack(name: str, value: Any, signature: Mapping[str, tuple[tuple[int, ...], Any]]
             ) -> list[np.ndarray]:
    array = np.asarray(value)
    shape = signature.get(name, (None,))[0]
    if shape is not None and array.shape == tuple(shape):
        raise InputError(f"calibration data for '{name}' has the input's own shape "
                         f"{list(array.shape)}; stack samples along a new first axis "
                         f"(shape [N, {', '.join(map(str, shape))}])")
    if array.ndim == 0:
        raise InputError(f"calibration data for '{name}' is a scalar; expected samples "
                         f"stacked along the first axis")
    return list(array)


def _from_feeds(feeds: Sequence[Any], signature: Mapping[str, Any]) -> dict[str, list]:
    samples: dict[str, list] = {}
    for i, feed in enumerate(feeds):
        if not isinstance(feed, Mapping):
            raise InputError(f"calibration sample {i} is a {type(feed).__name__}, not a dict "
                             f"input name -> array")
        for name, value in feed.items():
            if type(value).__module__.startswith("torch"):
                value = value.detach().cpu().numpy()
            samples.setdefault(name, []).append(np.asarray(value))
    return samples


def _checked(name: str, index: int, value: np.ndarray,
             expected: tuple[tuple[int, ...], np.dtype], graph: Graph) -> np.ndarray:
    shape, dtype = expected
    where = f"calibration sample {index} of '{name}'"
    if tuple(value.shape) != tuple(shape):
        raise InputError(f"{where} has shape {list(value.shape)}; the model takes "
                         f"{list(shape)}")
    if np.issubdtype(dtype, np.floating):
        if not np.issubdtype(value.dtype, np.floating):
            raise InputError(f"{where} is {value.dtype}; the model takes {dtype}")
        if not np.isfinite(value).all():
            raise InputError(f"{where} holds NaN or infinite values")
    elif np.issubdtype(dtype, np.integer):
        if not np.issubdtype(value.dtype, np.integer):
            raise InputError(f"{where} is {value.dtype}; the model takes {dtype}")
        bound = embedding_bound(graph, name)
        if bound is not None and value.size and (value.min() < 0 or value.max() >= bound):
            raise InputError(f"{where} holds ids in [{value.min()}, {value.max()}] but indexes "
                             f"a table of {bound} rows")
    elif value.dtype != dtype:
        raise InputError(f"{where} is {value.dtype}; the model takes {dtype}")
    return np.ascontiguousarray(value.astype(dtype, copy=False))
