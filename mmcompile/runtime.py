"""CompiledModel: runs compiled stages, validates inputs, saves and loads artifacts.

A model is a list of stages in dependency order; each stage reads named tensors produced by the
graph inputs or by earlier stages. Tensors pass between stages as whatever the executables
return (DLPack-capable arrays), without copies. The caller gets back the kind it gave: torch
tensors in -> torch tensors out, numpy in -> numpy out.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmcompile.artifact import ArtifactError, read_manifest, write_artifact
from mmcompile.errors import InputError
from mmcompile.report import format_table
from mmcompile.signature import Signature
from mmcompile.target import Executable, get_target


@dataclass
class Stage:
    """One compiled stage: what it reads and writes, its target and its executable."""

    name: str
    target: str
    inputs: list[str]
    outputs: list[str]
    executable: Executable
    compile_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def _wants_torch(feeds: Mapping[str, Any]) -> bool:
    return any(type(v).__module__.startswith("torch") for v in feeds.values())


def _to_caller(value: Any, torch_out: bool) -> Any:
    if torch_out:
        import torch
        return torch.from_dlpack(value)
    if isinstance(value, np.ndarray):
        return value
    # Zero-copy: the VM allocates fresh output buffers on every call (checked on TVM 0.27).
    return np.from_dlpack(value)


class CompiledModel:
    """A compiled multimodal model. Call it with keyword inputs (numpy arrays or torch tensors).

    ``cm(**inputs)`` returns one array for single-output models and a tuple otherwise;
    ``cm.run(inputs)`` returns a dict keyed by output name.
    """

    def __init__(self, signature: Signature, stages: list[Stage], target: str,
                 metadata: Mapping[str, Any] | None = None):
        self.signature = signature
        self.stages = stages
        self.target = target
        self.metadata = dict(metadata or {})
        # One VM must never be called from two threads at once; calls are serialised per model.
        self._lock = threading.Lock()

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.signature.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.signature.outputs]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on input name -> array; returns output name -> array (same kind as the inputs).

        Raises:
            InputError: a missing/unknown input, wrong rank, shape or dtype, or an index
                outside the table it indexes.
        """
        torch_out = _wants_torch(feeds)
        env: dict[str, Any] = dict(self.signature.validate(feeds))
        with self._lock:
            for stage in self.stages:
                outputs = stage.executable.run({name: env[name] for name in stage.inputs})
                env.update(outputs)
        return {name: _to_caller(env[name], torch_out) for name in self.output_names}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            if len(args) > len(self.input_names):
                raise InputError(f"{len(args)} positional inputs given, the model takes "
                                 f"{len(self.input_names)}: {self.input_names}")
            kwargs = {**dict(zip(self.input_names, args)), **kwargs}
        outputs = list(self.run(kwargs).values())
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def report(self) -> str:
        """Passes, stages and per-stage compile time, as text."""
        lines = [f"target: {self.target}"]
        if self.metadata.get("pipeline"):
            lines.append(f"passes: {self.metadata['pipeline']}")
        if "nodes_before" in self.metadata:
            lines.append(f"graph: {self.metadata['nodes_before']} -> "
                         f"{self.metadata['nodes_after']} nodes after optimization")
        rows = [(s.name, s.target, len(s.inputs), len(s.outputs), f"{s.compile_seconds:.2f}",
                 s.info.get("detail", "")) for s in self.stages]
        lines.append(format_table(["stage", "target", "inputs", "outputs", "compile s", "detail"],
                                  rows))
        if self.metadata.get("verification"):
            lines.append("verification: " + self.metadata["verification"])
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact folder (atomically). Returns its path."""
        from mmcompile import __version__

        def write_stages(folder: Path) -> list[dict[str, Any]]:
            entries = []
            for stage in self.stages:
                files = stage.executable.save(folder, stage.name)
                entries.append({"name": stage.name, "target": stage.target,
                                "inputs": stage.inputs, "outputs": stage.outputs,
                                "files": files, "compile_seconds": stage.compile_seconds,
                                "info": {**stage.info, **stage.executable.describe()}})
            return entries

        manifest = {"versions": {"mmcompile": __version__, **self.metadata.get("versions", {})},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "target": self.target, "signature": self.signature.to_dict(),
                    "metadata": {k: v for k, v in self.metadata.items() if k != "versions"}}
        return write_artifact(path, manifest, write_stages)


def load(path: str | os.PathLike, threads: int = 0) -> CompiledModel:
    """Load an artifact written by :meth:`CompiledModel.save`; no compiler is needed.

    Args:
        path: the ``.mmc`` folder.
        threads: worker threads per stage (0: all available cores).

    Raises:
        ArtifactError: missing, corrupt, tampered with, or built by an incompatible version.
    """
    path = Path(path)
    manifest = read_manifest(path)
    try:
        signature = Signature.from_dict(manifest["signature"])
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: malformed signature in the manifest: {exc}") from exc
    stages = []
    for entry in manifest["stages"]:
        target = get_target(entry["target"])
        executable = target.load(path, entry["files"], {**entry.get("info", {}),
                                                        "versions": manifest["versions"]},
                                 threads=threads)
        stages.append(Stage(entry["name"], entry["target"], list(entry["inputs"]),
                            list(entry["outputs"]), executable, entry.get("compile_seconds", 0.0),
                            entry.get("info", {})))
    metadata = {**manifest.get("metadata", {}), "versions": manifest["versions"]}
    return CompiledModel(signature, stages, manifest["target"], metadata)
