"""Apache TVM targets: ``cpu`` (LLVM) and ``cuda``.

Importing this package registers the targets but does not import TVM; the compiler parts of TVM
are imported only when compiling, so loading an artifact works with TVM's runtime-only library
(``TVM_USE_RUNTIME_LIB=1``).
"""

from mmcompile.targets.tvm.target import TVMCpuTarget, TVMCudaTarget

__all__ = ["TVMCpuTarget", "TVMCudaTarget"]

# the legalize-for-tvm pass (see mmcompile.targets.register_passes)
PASS_MODULES = ("mmcompile.targets.tvm.legalize",)
