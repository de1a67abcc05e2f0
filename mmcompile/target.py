"""The target interface and registry.

A target turns one stage (a :class:`~mmcompile.ir.Graph`) into an :class:`Executable` that runs
it, and loads such an executable back from an artifact folder. Targets live in ``targets/``
(shipped as ``mmcompile.targets``) and register themselves by name; the core finds them through
:func:`get_target` and never imports a target module by name, so optional dependencies (CUDA,
TensorRT) are imported only when that target is used.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mmcompile.errors import MMCompileError, RegistryError
from mmcompile.ir import Graph


class TargetError(MMCompileError):
    """Unknown target, a target unavailable here, or a stage a target cannot compile."""


@dataclass
class CompileOptions:
    """What every target's ``compile`` receives besides the stage.

    Attributes:
        threads: worker threads the executable may use (0: all available cores).
        progress: called with one-line status messages during long steps.
        config: target-specific options (documented by each target).
    """

    threads: int = 0
    progress: Callable[[str], None] = lambda message: None
    config: Mapping[str, Any] = field(default_factory=dict)


class Executable(ABC):
    """A compiled stage: runs on DLPack-capable arrays, and saves itself into a folder."""

    @abstractmethod
    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run on input name -> array (numpy / torch / DLPack); returns output name -> array
        in the executable's native type (convert with :mod:`mmcompile.runtime`)."""

    @abstractmethod
    def save(self, directory: Path, stem: str) -> dict[str, str]:
        """Write the executable's files into ``directory``; returns role -> file name."""

    def describe(self) -> dict[str, Any]:
        """JSON-able facts for the manifest and reports (target details, compile time, ...)."""
        return {}

    def replica(self) -> Executable | None:
        """Another executable over the same compiled code that may run at the same time as
        this one (on another thread), or None when the target cannot provide one."""
        return None


class Target(ABC):
    """A backend. Subclasses set ``name`` and implement the three methods."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @abstractmethod
    def check(self, graph: Graph) -> None:
        """Raise :class:`~mmcompile.errors.UnsupportedOpError` for the first node this target
        cannot lower, or TargetError if the target cannot run here at all."""

    @abstractmethod
    def compile(self, graph: Graph, options: CompileOptions) -> Executable:
        """Compile one stage."""

    @abstractmethod
    def load(self, directory: Path, files: Mapping[str, str], info: Mapping[str, Any],
             threads: int = 0) -> Executable:
        """Load an executable saved by :meth:`Executable.save` (without the compiler)."""

    def why_not_runnable(self) -> str | None:
        """Why code for this target cannot run on this machine (no GPU, say), or None. Such a
        target can still compile and save; measuring and verifying need a runnable one."""
        return None

    def configure_thread(self, threads: int) -> None:
        """Called once on each long-lived worker thread before it runs this target's stages:
        size the calling thread's compute pool to ``threads``. Default: nothing to do."""


_REGISTRY: dict[str, type[Target]] = {}


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator adding a target; two targets with one name is an error."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise RegistryError(f"target name '{cls.name}' is registered twice: by "
                            f"{existing.__module__} and {cls.__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_targets() -> None:
    # Target modules import the core; loading the package here (lazily) is what registers them.
    importlib.import_module("mmcompile.targets")


def get_target(name: str) -> Target:
    """An instance of the target registered as ``name`` (``cpu``, ``cuda``, ...)."""
    _load_builtin_targets()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise TargetError(f"unknown target '{name}'; known targets: "
                          f"{', '.join(sorted(_REGISTRY))}") from None


def registered_targets() -> dict[str, type[Target]]:
    _load_builtin_targets()
    return dict(sorted(_REGISTRY.items()))
