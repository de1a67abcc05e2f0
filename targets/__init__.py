"""Backends (shipped as ``mmcompile.targets``). Each subpackage or module registers its targets
with ``@register_target`` when imported; the core imports this package lazily, at the first
target lookup, and never names a target module itself.

Importing a target module must stay cheap: loading an artifact imports every built-in target
to find the one that loads each stage, so the compiler side of a target (TVM's Relax, onnx,
graph passes) is imported inside the methods that compile. The graph passes a target needs in
front of its stages (``Target.pipeline``) are registered by the modules a target package lists
in ``PASS_MODULES``; the pass registry imports them through :func:`register_passes`.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")


def register_passes() -> None:
    """Import the pass modules every target package lists (``PASS_MODULES``)."""
    for _info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{_info.name}")
        for name in getattr(module, "PASS_MODULES", ()):
            importlib.import_module(name)
