"""The compiled-model artifact: a folder ``<name>.mmc/`` holding ``manifest.json`` and one set of
files per stage (TVM: a shared library).

The manifest records the format version, the mmcompile and TVM versions, the target, the input
and output signature with modality tags, and each stage's files with their SHA-256. Loading
checks all of it before any native code is loaded, so a tampered, truncated or incompatible
artifact is refused with a clear error instead of crashing. Writing is atomic: everything goes
into a temporary folder beside the destination, which is renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmcompile.errors import MMCompileError

FORMAT = "mmcompile-artifact"
FORMAT_VERSION = 1
# 2: several builds serving declared dim ranges (``profiles``); a reader of 1 must refuse it
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"


class ArtifactError(MMCompileError):
    """An artifact cannot be written, or is missing, corrupt, tampered with or incompatible."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_artifact(path: str | os.PathLike, manifest: dict[str, Any],
                   write_stages: Callable[[Path], list[dict[str, Any]]]) -> Path:
    """Write an artifact folder atomically.

    Args:
        path: destination folder (replaced if it exists and is an artifact).
        manifest: everything but ``format`` and ``stages`` (``format_version`` only to
            write a later version than :data:`FORMAT_VERSION`).
        write_stages: called with the temporary folder; writes the stage files there and
            returns one dict per stage with a ``files`` mapping (role -> relative file name).

    Raises:
        ArtifactError: the destination exists and is not an artifact, or cannot be written.
    """
    path = Path(path)
    if path.exists() and not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path} exists and is not an mmcompile artifact; not overwriting it")
    parent = path.parent if str(path.parent) else Path(".")
    try:  # a folder that cannot be made or written is the user's to fix: say which
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    except OSError as exc:
        raise ArtifactError(f"cannot write artifact {path}: {exc.strerror or exc} "
                            f"({exc.filename or parent})") from exc
    try:
        stages = write_stages(tmp)
        for stage in stages:
            stage["sha256"] = {role: sha256(tmp / name) for role, name in stage["files"].items()}
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "stages": stages}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=False))
        if path.exists():  # swap: the old artifact is removed only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old / path.name, path)  # put the old artifact back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as exc:
        raise ArtifactError(f"cannot write artifact {path}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_manifest(path: str | os.PathLike, verify_hashes: bool = True) -> dict[str, Any]:
    """Read and check an artifact's manifest (and, by default, every stage file's SHA-256).

    Raises:
        ArtifactError: naming what is wrong (missing, not JSON, wrong format or version, a file
            missing, truncated or modified).
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not an mmcompile artifact (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path} is corrupt: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path} is not an mmcompile manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(f"{path} has artifact format version {version}; this mmcompile "
                            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}: "
                            f"recompile the model")
    for key in ("signature", "stages", "target", "versions"):
        if key not in manifest:
            raise ArtifactError(f"{manifest_path} lacks '{key}'")
    for index, stage in enumerate(manifest["stages"]):
        missing = [k for k in ("name", "target", "inputs", "outputs", "files", "sha256")
                   if not isinstance(stage, dict) or k not in stage]
        if missing:
            raise ArtifactError(f"{manifest_path}: stage {index} lacks {missing}")
        if set(stage["files"]) != set(stage["sha256"]):
            raise ArtifactError(f"{manifest_path}: stage '{stage['name']}' has files without "
                                f"a SHA-256")
    if verify_hashes:
        for stage in manifest["stages"]:
            for role, name in stage["files"].items():
                file = path / name
                if not file.is_file():
                    raise ArtifactError(f"{path}: stage '{stage['name']}' file {name} is missing")
                if sha256(file) != stage["sha256"][role]:
                    raise ArtifactError(f"{path}: stage '{stage['name']}' file {name} does not "
                                        f"match its SHA-256 in the manifest (truncated or "
                                        f"modified)")
    return manifest
