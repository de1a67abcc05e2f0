"""Names of a package imported on first use (PEP 562), shared by :mod:`mmcompile` and
:mod:`mmcompile.planning`: a deployed process that only loads artifacts must not import the
compiler behind them."""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Mapping
from typing import Any


def resolve(module: str, name: str) -> Any:
    """``module.name``; in the mmcompile-runtime install, a compiler module is missing and the
    error says so."""
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("mmcompile"):
            raise
        raise ImportError(f"{module}.{name} is part of the compiler, and this is the "
                          f"mmcompile-runtime install (load and run artifacts only): install "
                          f"mmcompile to compile") from exc


def lazy_getattr(package: str, names: Mapping[str, str],
                 namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving ``names`` (public name -> defining module) on first
    use and keeping the value in the package's ``namespace``."""
    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = namespace[name] = resolve(names[name], name)
        return value
    return __getattr__


def functions_over_modules(package: str, functions: Mapping[str, str]) -> None:
    """Make ``package.name`` the function ``name`` of module ``functions[name]`` although a
    submodule ``package.name`` exists: importing a submodule binds it on its parent whenever
    it is first imported, and the properties of the package's module class ignore that."""
    def function(module: str, name: str) -> property:
        return property(lambda self: resolve(module, name), lambda self, value: None)

    import sys
    cls = type("Package", (types.ModuleType,),
               {name: function(module, name) for name, module in functions.items()})
    sys.modules[package].__class__ = cls
