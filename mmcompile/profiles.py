"""Dynamic dim ranges at run time: one artifact, several static builds ("profiles"), and a
dispatcher that serves every size of a declared range with them.

A declared dim (``dynamic={"batch": (1, 8, 32)}``) is served in one of three ways, decided at
compile time (:mod:`mmcompile.dynamic`) and recorded in the artifact:

- ``split``: rows along the dim are independent (checked numerically on the reference graph), so
  a call is cut into calls of the built sizes and the last one padded (by repeating its last
  row, so every padded value is one the model has seen); the outputs are cut back and joined.
  Which sizes to use is a small knapsack over the builds' measured costs: batch 9 with builds at
  1 and 8 runs 8 + 1, not 32 padded. Only the first independent dim is split.
- ``pad``: a further independent dim is padded up to the next built size.
- ``exact``: padding would change the results (a sequence under attention without a mask, a mean
  over the dim), so sizes with a static build use it and every other size of the range runs on a
  build with that dim left symbolic (correct, but much slower: TVM's kernels for symbolic shapes
  are generic).

Static builds and not TVM's symbolic shapes for the rest: on the suite's av_mnist and mm_imdb on
the CPU target a build with the batch left symbolic ran 26-46x slower than builds pinned to the
call's batch (see the README). This module needs numpy only, as the rest of the runtime.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcompile.errors import InputError
from mmcompile.report import format_table
from mmcompile.runtime import ModelCalls, host_array, host_views, wants_torch
from mmcompile.signature import Signature, TensorSpec

MODES = ("split", "pad", "exact")
_MAX_SHAPE_KEYS = 64  # bounds ProfiledModel._by_shapes (one key per input order and build)
PROFILES_FORMAT_VERSION = 2  # an artifact with profiles: older readers must refuse it


@dataclass(frozen=True)
class DynamicDim:
    """One declared dim: its range, the sizes with a static build, how other sizes are served,
    and where it sits in each input and (``split``/``pad``) output."""

    name: str
    low: int
    high: int
    points: tuple[int, ...]
    mode: str
    inputs: Mapping[str, int] = field(default_factory=dict)
    outputs: Mapping[str, int] = field(default_factory=dict)
    reason: str = ""  # why the mode: the exactness check's finding

    @property
    def symbolic(self) -> bool:
        """Whether some size of the range needs the build with this dim left symbolic."""
        return self.mode == "exact" and len(self.points) < self.high - self.low + 1

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "range": [self.low, self.high], "points": list(self.points),
                "mode": self.mode, "inputs": dict(self.inputs), "outputs": dict(self.outputs),
                "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DynamicDim:
        low, high = data["range"]
        return cls(data["name"], int(low), int(high), tuple(int(p) for p in data["points"]),
                   data["mode"], dict(data.get("inputs", {})), dict(data.get("outputs", {})),
                   data.get("reason", ""))

    def describe(self) -> str:
        """One line for reports: the range and how sizes between the builds are served."""
        points = ", ".join(map(str, self.points))
        how = {"split": "other sizes split into calls of those, the last padded",
               "pad": "other sizes padded to the next build",
               "exact": "other sizes on a build with the dim left symbolic" if self.symbolic
               else "every size has its build"}[self.mode]
        return f"{self.name} {self.low}..{self.high}: builds at {points}; {how} ({self.reason})"


@dataclass(frozen=True)
class RangedSignature(Signature):
    """A signature whose named dims may only take sizes inside declared ranges."""

    ranges: tuple[tuple[str, int, int], ...] = ()

    def validate(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """As :meth:`Signature.validate`, and every ranged dim inside its range.

        Raises:
            InputError: naming the input, the dim and the range it is outside of.
        """
        ready = super().validate(feeds)
        bounds = {name: (low, high) for name, low, high in self.ranges}
        for spec in self.inputs:
            shape = tuple(ready[spec.name].shape)
            for axis, dim in enumerate(spec.shape):
                if dim in bounds and not bounds[dim][0] <= shape[axis] <= bounds[dim][1]:
                    low, high = bounds[dim]
                    raise InputError(
                        f"input '{spec.name}' has {dim} = {shape[axis]} (dim {axis} of shape "
                        f"{list(shape)}), outside the range {low}..{high} the model was "
                        f"compiled for; recompile with a wider dynamic range "
                        f"(dynamic={{'{dim}': ({min(low, shape[axis])}, "
                        f"{max(high, shape[axis])})}}, CLI --dynamic {dim}="
                        f"{min(low, shape[axis])}:{max(high, shape[axis])})")
        return ready

    def random_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs with every ranged dim at the low end of its range."""
        low = {name: lo for name, lo, _ in self.ranges}
        pinned = tuple(TensorSpec(s.name, tuple(low.get(d, d) for d in s.shape), s.dtype,
                                  s.modality, s.index_bound) for s in self.inputs)
        return Signature(pinned, self.outputs).random_inputs(seed)

    def sizes(self, ready: Mapping[str, Any]) -> dict[str, int]:
        """Ranged dim -> its size in ``ready`` (validated inputs)."""
        found = {}
        ranged = {name for name, _, _ in self.ranges}
        for spec in self.inputs:
            for axis, dim in enumerate(spec.shape):
                if dim in ranged:
                    found.setdefault(dim, int(ready[spec.name].shape[axis]))
        return found


@dataclass
class Profile:
    """One static (or partly symbolic) build: the size of each declared dim (None: symbolic)."""

    sizes: dict[str, int | None]
    model: Any  # a CompiledModel
    cost_ms: float | None = None  # one call, measured at compile time

    @property
    def label(self) -> str:
        return build_label(self.sizes)


def build_label(sizes: Mapping[str, int | None]) -> str:
    """``batch=8, tokens=*`` (``*``: the build with that dim symbolic)."""
    return ", ".join(f"{k}={'*' if v is None else v}" for k, v in sizes.items())


def plan_chunks(rows: int, costs: Mapping[int, float]) -> list[tuple[int, int]]:
    """The cheapest way to run ``rows`` rows on builds of the sizes in ``costs`` (size -> cost
    of one call): a list of (build size, rows it takes), the last one possibly padded.

    An unbounded knapsack over at most ``rows`` steps: rows are a few hundred at most.
    """
    sizes = sorted(costs)
    best = [0.0] + [float("inf")] * rows
    choice = [0] * (rows + 1)
    for m in range(1, rows + 1):
        for size in sizes:
            cost = costs[size] + best[max(0, m - size)]
            if cost < best[m]:
                best[m], choice[m] = cost, size
    chunks, m = [], rows
    while m > 0:
        chunks.append((choice[m], min(m, choice[m])))
        m -= choice[m]
    return chunks[::-1]


def _take_rows(value: np.ndarray, axis: int, start: int, rows: int, size: int) -> np.ndarray:
    """Rows ``start:start+rows`` along ``axis``, padded to ``size`` by repeating the last row."""
    index = np.minimum(np.arange(start, start + size), start + rows - 1)
    return np.take(value, index, axis=axis)


class ProfiledModel(ModelCalls):
    """A compiled model for declared dim ranges: several builds and a dispatcher. Called and
    saved like a :class:`~mmcompile.runtime.CompiledModel` (``mmcompile.load`` returns one for
    an artifact with profiles)."""

    def __init__(self, signature: RangedSignature, dims: Sequence[DynamicDim],
                 profiles: Sequence[Profile], target: str,
                 metadata: Mapping[str, Any] | None = None):
        self.signature = signature
        self.dims = list(dims)
        self.profiles = list(profiles)
        self.target = target
        self.metadata = dict(metadata or {})
        self._by_key = {tuple(p.sizes[d.name] for d in self.dims): p for p in self.profiles}
        self._split = next((d for d in self.dims if d.mode == "split"), None)
        self._chunk_plans: dict[tuple, list[tuple[int, int]]] = {}  # per instance, bounded
        # sizes -> (calls, whether one call at exactly a build's sizes): dispatch is a lookup
        self._dispatch: dict[tuple, tuple[list[tuple[Profile, int, int]], bool]] = {}
        # (name, shape) of each input -> the build whose sizes those shapes are exactly: such a
        # call of numpy arrays goes straight to the build (see run)
        self._by_shapes: dict[tuple, Any] = {}

    @property
    def stages(self) -> list:
        """The stages of every build."""
        return [s for p in self.profiles for s in p.model.stages]

    @property
    def schedule(self):
        """The first build's schedule (each build keeps its own)."""
        return self.profiles[0].model.schedule

    def close(self) -> None:
        """Stop every build's worker threads."""
        for profile in self.profiles:
            profile.model.close()

    # -- dispatch -------------------------------------------------------------------------------

    def _target_sizes(self, sizes: Mapping[str, int]) -> dict[str, int | None]:
        """The build size of every dim but the split one (None: the symbolic build)."""
        key: dict[str, int | None] = {}
        for dim in self.dims:
            n = sizes[dim.name]
            if dim.mode == "exact":
                key[dim.name] = n if n in dim.points else None
            elif dim.mode == "pad":
                key[dim.name] = min(p for p in dim.points if p >= n)
        return key

    def _chunks(self, dim: DynamicDim, rows: int, key: Mapping[str, int | None]
                ) -> list[tuple[int, int]]:
        if rows in dim.points:  # a build of exactly this size: one call, whatever the costs
            return [(rows, rows)]
        cache_key = (rows, *key.values())
        if cache_key not in self._chunk_plans:
            builds = {p: self._by_key[tuple({**key, dim.name: p}[d.name] for d in self.dims)]
                      for p in dim.points}
            measured = all(b.cost_ms for b in builds.values())
            # Without measured times, a call costs its rows plus one row's worth of overhead.
            costs = {p: b.cost_ms if measured else p + 1.0 for p, b in builds.items()}
            self._chunk_plans[cache_key] = plan_chunks(rows, costs)
        return self._chunk_plans[cache_key]

    def _calls(self, sizes: Mapping[str, int]) -> list[tuple[Profile, int, int]]:
        """(build, first row, rows) per call; rows along the split dim (one call without one)."""
        key = self._target_sizes(sizes)
        split = self._split
        if split is None:
            return [(self._by_key[tuple(key[d.name] for d in self.dims)], 0, 0)]
        calls, start = [], 0
        for size, rows in self._chunks(split, sizes[split.name], key):
            key_here = {**key, split.name: size}
            calls.append((self._by_key[tuple(key_here[d.name] for d in self.dims)], start, rows))
            start += rows
        return calls

    def plan(self, feeds: Mapping[str, Any]) -> list[tuple[str, int]]:
        """How a call with ``feeds`` would run: (build label, rows it takes) per call."""
        ready = self.signature.validate(feeds)
        return [(p.label, rows) for p, _, rows in self._calls(self.signature.sizes(ready))]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on input name -> array; returns output name -> array (same kind as the inputs).

        Raises:
            InputError: a missing/unknown input, wrong rank, shape or dtype, an index outside
                its table, or a dim outside its declared range (named, with the range).
        """
        shapes = _numpy_shapes(feeds)
        build = self._by_shapes.get(shapes)
        if build is not None:
            # Arrays of the shapes a call already dispatched to one build whole: that build's
            # own signature checks them (dtypes, ids; ~1 us with its static shapes, where the
            # ranged one takes ~7: 5% of a 0.13 ms model).
            return build.run(feeds)
        torch_out = wants_torch(feeds)
        ready = self.signature.validate(host_views(feeds) if torch_out else feeds)
        sizes = self.signature.sizes(ready)
        key = tuple(sizes.values())
        if key not in self._dispatch:
            calls = self._calls(sizes)
            exact = len(calls) == 1 and all(calls[0][0].sizes[d] in (None, n)
                                            for d, n in sizes.items())
            self._dispatch[key] = calls, exact
        calls, exact = self._dispatch[key]
        if exact:  # exactly a build's sizes: no copies
            if shapes is not None and len(self._by_shapes) < _MAX_SHAPE_KEYS:
                self._by_shapes[shapes] = calls[0][0].model
            return calls[0][0].model._run_ready(ready, torch_out)
        split = self._split
        host = {k: host_array(v) for k, v in ready.items()}
        pieces: list[dict[str, np.ndarray]] = []
        for profile, start, rows in calls:
            chunk = {}
            for name, value in host.items():
                for dim in self.dims:
                    if name not in dim.inputs or profile.sizes[dim.name] is None:
                        continue
                    axis, size = dim.inputs[name], profile.sizes[dim.name]
                    if dim is split:
                        value = _take_rows(value, axis, start, rows, size)
                    elif value.shape[axis] != size:
                        value = _take_rows(value, axis, 0, value.shape[axis], size)
                chunk[name] = value
            out = profile.model._run_ready(chunk, False)
            pieces.append(self._unpad(out, sizes, rows if split else 0, split))
        if len(pieces) == 1:
            joined = pieces[0]
        else:
            joined = {name: np.concatenate([p[name] for p in pieces], axis=split.outputs[name])
                      for name in self.output_names}
        if torch_out:
            import torch
            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in joined.items()}
        return joined

    def _unpad(self, outputs: Mapping[str, Any], sizes: Mapping[str, int], rows: int,
               split: DynamicDim | None) -> dict[str, np.ndarray]:
        cut = {}
        for name in self.output_names:
            value = np.asarray(outputs[name])
            index = [slice(None)] * value.ndim
            for dim in self.dims:
                if name in dim.outputs and dim.mode in ("split", "pad"):
                    keep = rows if dim is split else sizes[dim.name]
                    index[dim.outputs[name]] = slice(0, keep)
            cut[name] = value[tuple(index)]
        return cut

    def profile(self, feeds: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Per-stage timings of the build that serves ``feeds`` (of its first call: on random
        inputs of the build's sizes when the call is split or padded)."""
        ready = self.signature.validate(feeds)
        sizes = self.signature.sizes(ready)
        build = self._calls(sizes)[0][0]
        if all(build.sizes[d] in (None, n) for d, n in sizes.items()):
            return build.model.profile(ready)
        return build.model.profile(build.model.signature.random_inputs())

    # -- reports and artifacts -----------------------------------------------------------------

    def report(self) -> str:
        """The declared ranges, the builds (sizes, cost, compile time, schedule), verification."""
        lines = [f"target: {self.target}"]
        if self.metadata.get("pipeline"):
            lines.append(f"passes: {self.metadata['pipeline']}")
        lines.append(f"dynamic: {len(self.profiles)} builds serve the declared ranges")
        lines += [f"  {dim.describe()}" for dim in self.dims]
        if self.metadata.get("specialized"):
            lines.append("shapes: other symbolic dims fixed to the example inputs (" + ", ".join(
                f"{k} {v['declared']} -> {v['shape']}"
                for k, v in self.metadata["specialized"].items()) + ")")
        rows = [(p.label, len(p.model.stages),
                 f"{p.cost_ms:.3f}" if p.cost_ms is not None else "-",
                 f"{sum(s.compile_seconds for s in p.model.stages):.2f}",
                 p.model.schedule.kind) for p in self.profiles]
        lines.append(format_table(["build", "stages", "ms/call", "compile s", "schedule"], rows))
        if self.metadata.get("compile_seconds") is not None:
            lines.append(f"compiled in {self.metadata['compile_seconds']:.1f}s "
                         f"({self.metadata.get('workers', 0)} worker process(es) beside this one)")
        if self.metadata.get("verification"):
            lines.append("verification: " + self.metadata["verification"])
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> Path:
        """Write one artifact folder holding every build (atomically). Returns its path."""
        from mmcompile.artifact import write_artifact
        from mmcompile.runtime import manifest_head

        def write_stages(folder: Path) -> list[dict[str, Any]]:
            entries = []
            for index, profile in enumerate(self.profiles):
                for entry in profile.model._stage_entries(folder, f"p{index}_"):
                    entries.append({**entry, "profile": index})
            return entries

        profiles = [{"sizes": p.sizes, "cost_ms": p.cost_ms,
                     "signature": p.model.signature.to_dict(),
                     "schedule": p.model.schedule.to_dict(),
                     "metadata": {k: v for k, v in p.model.metadata.items() if k != "versions"}}
                    for p in self.profiles]
        manifest = {"format_version": PROFILES_FORMAT_VERSION,
                    **manifest_head(self.stages, self.metadata, self.target, self.signature,
                                    self.schedule),
                    "dynamic": [d.to_dict() for d in self.dims], "profiles": profiles}
        return write_artifact(path, manifest, write_stages)


def load_profiled(path: Path, manifest: Mapping[str, Any], threads: int = 0,
                  schedule: str | None = None) -> ProfiledModel:
    """The :class:`ProfiledModel` of an artifact whose manifest has ``profiles`` (its files
    already checked by :func:`~mmcompile.artifact.read_manifest`).

    Raises:
        ArtifactError: a malformed profile, dim or signature entry.
    """
    from mmcompile.artifact import ArtifactError
    from mmcompile.runtime import model_from_entries
    try:
        dims = [DynamicDim.from_dict(d) for d in manifest["dynamic"]]
        base = Signature.from_dict(manifest["signature"])
        entries = manifest["profiles"]
        signature = RangedSignature(base.inputs, base.outputs,
                                    tuple((d.name, d.low, d.high) for d in dims))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: malformed dynamic-range entries in the manifest: "
                            f"{exc}") from exc
    profiles = []
    for index, entry in enumerate(entries):
        stages = [s for s in manifest["stages"] if s.get("profile") == index]
        if not stages:
            raise ArtifactError(f"{path}: build {index} has no stages in the manifest")
        model = model_from_entries(path, {**manifest, "signature": entry["signature"],
                                          "schedule": entry["schedule"],
                                          "metadata": entry.get("metadata", {})},
                                   stages, threads, schedule)
        profiles.append(Profile(dict(entry["sizes"]), model, entry.get("cost_ms")))
    metadata = {**manifest.get("metadata", {}), "versions": manifest["versions"]}
    return ProfiledModel(signature, dims, profiles, manifest["target"], metadata)


def _numpy_shapes(feeds: Mapping[str, Any]) -> tuple | None:
    """``((name, shape), ...)`` in the caller's order when every input is a numpy array, else
    None."""
    key = []
    for name, value in feeds.items():
        if type(value) is not np.ndarray:
            return None
        key.append((name, value.shape))
    return tuple(key)
