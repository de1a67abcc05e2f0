"""mmcompile: an ahead-of-time compiler for multimodal neural networks.

Entry points: :func:`trace` / :func:`load_graph` (frontends), :func:`optimize` (graph passes);
the ``mmcompile`` command line mirrors them.
"""

from mmcompile.artifact import ArtifactError
from mmcompile.compiler import compile, load
from mmcompile.errors import (ExportError, InputError, MMCompileError, ModalityError,
                              ModelLoadError, PassError, PipelineError, RegistryError,
                              UnsupportedOpError, VerificationError)
from mmcompile.frontend import load_graph, trace
from mmcompile.ir import Graph
from mmcompile.modality import MODALITIES, ModalityTag
from mmcompile.optimize import OptimizeResult, optimize
from mmcompile.runtime import CompiledModel
from mmcompile.target import TargetError, get_target, registered_targets
from mmcompile.transform import (Pass, PassContext, PassManager, PassResult, parse_pipeline,
                                 register_pass, registered_passes)
from mmcompile.quantize import QuantizedModel, quantize  # the function, as for tune
from mmcompile.tune import tune  # the function; the package: ``from mmcompile.tune import ...``

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "CompiledModel", "TargetError", "compile", "get_target", "load",
    "registered_targets", "ExportError", "Graph", "InputError", "MMCompileError", "MODALITIES", "ModalityError",
    "ModalityTag", "ModelLoadError", "OptimizeResult", "Pass", "PassContext", "PassError",
    "PassManager", "PassResult", "PipelineError", "QuantizedModel", "RegistryError", "UnsupportedOpError",
    "VerificationError", "load_graph", "optimize", "parse_pipeline", "register_pass",
    "quantize", "registered_passes", "trace", "tune",
]
