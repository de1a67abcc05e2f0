"""mmcompile: an ahead-of-time compiler for multimodal neural networks.

Entry points: :func:`trace` / :func:`load_graph` (frontends), :func:`optimize` (graph passes),
:func:`compile`, :func:`quantize`, :func:`tune`, and :func:`load` (a compiled artifact); the
``mmcompile`` command line mirrors them.

Names are imported on first use (PEP 562): a deployed process that only calls :func:`load`
imports the runtime (numpy, TVM's runtime, the artifact's targets), not the compiler (onnx,
onnx-graphsurgeon, networkx, torch, ``tvm.relax``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmcompile._lazy import functions_over_modules, lazy_getattr
from mmcompile.errors import (ExportError, InputError, MMCompileError, ModalityError,
                              ModelLoadError, PassError, PipelineError, RegistryError,
                              UnsupportedOpError, VerificationError)

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "ArtifactError": "mmcompile.artifact",
    "CompiledModel": "mmcompile.runtime",
    "load": "mmcompile.loading",
    "compile": "mmcompile.compiler",
    "load_graph": "mmcompile.frontend",
    "trace": "mmcompile.frontend",
    "Graph": "mmcompile.ir",
    "MODALITIES": "mmcompile.modality",
    "ModalityTag": "mmcompile.modality",
    "OptimizeResult": "mmcompile.optimize",
    "TargetError": "mmcompile.target",
    "get_target": "mmcompile.target",
    "registered_targets": "mmcompile.target",
    "Pass": "mmcompile.transform",
    "PassContext": "mmcompile.transform",
    "PassManager": "mmcompile.transform",
    "PassResult": "mmcompile.transform",
    "parse_pipeline": "mmcompile.transform",
    "register_pass": "mmcompile.transform",
    "registered_passes": "mmcompile.transform",
    "QuantizedModel": "mmcompile.quantize",
}

__all__ = [
    "ArtifactError", "CompiledModel", "ExportError", "Graph", "InputError", "MMCompileError",
    "MODALITIES", "ModalityError", "ModalityTag", "ModelLoadError", "OptimizeResult", "Pass",
    "PassContext", "PassError", "PassManager", "PassResult", "PipelineError", "QuantizedModel",
    "RegistryError", "TargetError", "UnsupportedOpError", "VerificationError", "compile",
    "get_target", "load", "load_graph", "optimize", "parse_pipeline", "quantize",
    "register_pass", "registered_passes", "registered_targets", "trace", "tune",
]

if TYPE_CHECKING:
    from mmcompile.artifact import ArtifactError
    from mmcompile.compiler import compile
    from mmcompile.frontend import load_graph, trace
    from mmcompile.ir import Graph
    from mmcompile.modality import MODALITIES, ModalityTag
    from mmcompile.optimize import OptimizeResult, optimize
    from mmcompile.quantize import QuantizedModel, quantize
    from mmcompile.loading import load
    from mmcompile.runtime import CompiledModel
    from mmcompile.target import TargetError, get_target, registered_targets
    from mmcompile.transform import (Pass, PassContext, PassManager, PassResult,
                                     parse_pipeline, register_pass, registered_passes)
    from mmcompile.tune import tune


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_FUNCTIONS})


# functions with modules of the same names (``from mmcompile.tune import TuningDB``)
_FUNCTIONS = {"optimize": "mmcompile.optimize", "quantize": "mmcompile.quantize",
              "tune": "mmcompile.tune"}
functions_over_modules(__name__, _FUNCTIONS)
