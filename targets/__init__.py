"""Backends (shipped as ``mmcompile.targets``). Each subpackage or module registers its targets
with ``@register_target`` when imported; the core imports this package lazily, at the first
target lookup, and never names a target module itself."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
