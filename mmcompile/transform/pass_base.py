"""What a pass is, and the registry that finds passes by name.

A pass is a class with a ``name``, the passes it ``requires`` to have run earlier in the
pipeline, the ``opt_level`` from which it runs, typed ``options`` with defaults, and a
``run(graph, ctx)`` that edits the graph in place and returns a :class:`PassResult`. Passes never
print: the pass manager and instruments report.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from mmcompile.errors import PipelineError, RegistryError

if TYPE_CHECKING:
    from mmcompile.ir import Graph
    from mmcompile.transform.context import PassContext


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, and named counters (``nodes_folded=12``)."""

    changed: bool
    stats: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_stats(cls, **stats: int) -> PassResult:
        """A result that is ``changed`` exactly when some counter is non-zero."""
        return cls(changed=any(v for v in stats.values()), stats=dict(stats))


class Pass:
    """Base class of graph passes. Subclasses set the class attributes and implement ``run``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    opt_level: ClassVar[int] = 1
    options: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise PipelineError(f"pass '{self.name}' has no option(s) {unknown}; "
                                f"its options are: {known}")
        self.config = {k: _coerce(self.name, k, options.get(k, default), default)
                       for k, default in self.options.items()}

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.config.items() if v != self.options[k]}
        opts = ",".join(f"{k}={v}" for k, v in changed.items())
        return self.name + (f"{{{opts}}}" if opts else "")


def _coerce(pass_name: str, key: str, value: Any, default: Any) -> Any:
    """Options arrive as strings from pipeline text; convert to the default's type."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return type(default)(value)
    except ValueError:
        raise PipelineError(f"option '{key}' of pass '{pass_name}' expects "
                            f"{type(default).__name__}, got '{value}'") from None


_REGISTRY: dict[str, type[Pass]] = {}
# passes/ (shipped as mmcompile.passes), and the targets, which register the legalization
# passes their stages need (see Target.pipeline)
_BUILTIN_PACKAGES = ("mmcompile.passes", "mmcompile.targets")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry. Two passes with one name is an error."""
    if not cls.name:
        raise RegistryError(f"pass class {cls.__qualname__} has no name")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise RegistryError(f"pass name '{cls.name}' is registered twice: by "
                            f"{existing.__module__}.{existing.__qualname__} and "
                            f"{cls.__module__}.{cls.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_passes() -> None:
    # The built-in passes import the core, so the core loads them lazily, at first lookup,
    # rather than importing them at module level.
    for package in _BUILTIN_PACKAGES:
        module = importlib.import_module(package)
        if hasattr(module, "register_passes"):  # mmcompile.targets: their pass modules
            module.register_passes()


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``. Raises PipelineError listing known names."""
    _load_builtin_passes()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PipelineError(f"unknown pass '{name}'; known passes: "
                            f"{', '.join(sorted(_REGISTRY))}") from None


def registered_passes() -> dict[str, type[Pass]]:
    """All registered passes, by name."""
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))
