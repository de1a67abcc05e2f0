"""``mmcompile.load``: an artifact folder -> the model it holds.

One build gives a :class:`~mmcompile.runtime.CompiledModel`; several builds serving declared
dim ranges (``compile(..., dynamic=...)``) give a :class:`~mmcompile.profiles.ProfiledModel`,
which is made of the runtime's models. This dispatch sits above both, so the runtime does
not import the dispatcher built on it. Import-light like both: no compiler, no onnx.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mmcompile.artifact import read_manifest
from mmcompile.runtime import CompiledModel, model_from_entries

if TYPE_CHECKING:
    from mmcompile.profiles import ProfiledModel


def load(path: str | os.PathLike, threads: int = 0, schedule: str | None = None
         ) -> CompiledModel | ProfiledModel:
    """Load an artifact written by :meth:`CompiledModel.save`, with the schedule it was
    compiled with; each stage is loaded by its own target. No compiler is needed (nor
    imported: see :mod:`mmcompile`). An artifact compiled for dim ranges (``dynamic=``) gives
    a :class:`~mmcompile.profiles.ProfiledModel` that dispatches over its builds.

    Args:
        path: the ``.mmc`` folder.
        threads: threads for stages run on the calling thread (0: all available cores).
        schedule: ``"sequential"`` or ``"parallel"`` to override the schedule chosen at compile
            time (``"parallel"`` re-plans from the recorded stage costs).

    Raises:
        ArtifactError: missing, corrupt, tampered with, or built by an incompatible version.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if "profiles" in manifest:  # several builds serving declared dim ranges
        from mmcompile.profiles import load_profiled
        return load_profiled(path, manifest, threads, schedule)
    return model_from_entries(path, manifest, manifest["stages"], threads, schedule)
