"""Built-in graph passes (shipped as ``mmcompile.passes``), one per module.

Every module here is imported on first use of the pass registry, and registers its pass with
``@register_pass``; adding a pass is adding a file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
