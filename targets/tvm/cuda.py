"""CUDA stages: device code compiled with nvcc at build time, saved without a GPU.

TVM 0.27 turns generated CUDA source into device code only inside its CUDA runtime library
(``libtvm_runtime_cuda.so``): codegen calls ``ffi.Module.create.cuda``, which runs nvcc through
``tvm_callback_cuda_compile``. That library links the NVIDIA driver (``libcuda.so.1``). Where
the driver is missing, the library does not load, codegen falls back to a module holding CUDA
*source*, and ``export_library`` silently writes that source, which a runtime-only process
cannot load. TVM registers no other way to build a CUDA module from a fatbin.

So without the driver the build runs in a helper process (one per compiling process, reused for
every stage) whose ``LD_LIBRARY_PATH`` starts with a stub ``libcuda.so.1``: it defines the driver
symbols the CUDA runtime imports (read with ``nm``), each returning ``CUDA_ERROR_NO_DEVICE``. The
runtime loads, codegen calls nvcc, and no kernel is ever launched. The stub is built once per TVM
build into ``~/.cache/mmcompile/cuda-stub/`` and never enters the caller's process, where it
would shadow the driver for every other library. With the driver present the build runs
in-process.

Every library is checked for device code (fatbin or cubin) and for the absence of CUDA source,
and a :class:`~mmcompile.target.TargetError` says why when device code cannot be produced.

A stage is held as its library and gets a VM on its first run, so saving needs no GPU; running
or loading without one raises TargetError naming the arch. Loading also works in runtime-only
mode (``TVM_USE_RUNTIME_LIB=1``), where TVM does not load its CUDA runtime by itself.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmcompile.targets.tvm.executable import load_executable, native_log_to

from mmcompile.target import CompileOptions, Executable, TargetError

if TYPE_CHECKING:
    from mmcompile.ir import Graph

DEFAULT_ARCH = "sm_80"
DEFAULT_CUDA_HOME = "/usr/local/cuda"
_FATBIN_MAGIC = b"\x50\xed\x55\xba"  # 0xBA55ED50, little-endian
_ELF_MAGIC = b"\x7fELF"
_CUDA_SOURCE_MARKS = (b"__global__", b'extern "C" __device__')
_CUDA_ERROR_NO_DEVICE = 100


# -- the toolchain and the CUDA runtime -------------------------------------------------------

def find_nvcc() -> str:
    """Path of nvcc: on ``PATH``, else in ``$CUDA_PATH/bin`` or ``/usr/local/cuda/bin``.

    Raises:
        TargetError: no nvcc (device code cannot be built).
    """
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_PATH"), DEFAULT_CUDA_HOME):
        if root and os.access(Path(root, "bin", "nvcc"), os.X_OK):
            return str(Path(root, "bin", "nvcc"))
    raise TargetError("cuda: nvcc not found (PATH, $CUDA_PATH/bin, /usr/local/cuda/bin); it is "
                      "needed to compile the kernels to device code: install the CUDA toolkit")


def find_c_compiler() -> str:
    """The host C/C++ compiler TVM's ``export_library`` uses (``CXX``/``CC``, else g++, gcc,
    clang...).

    Raises:
        TargetError: none found.
    """
    from tvm.support.cc import get_cc
    compiler = get_cc()
    if not compiler:
        raise TargetError("cuda: no host C compiler found (set CC or install gcc/clang); it "
                          "links the stage library")
    return compiler


def runtime_loaded() -> tuple[bool, str]:
    """Whether TVM's CUDA runtime is loaded here, loading it if TVM skipped it; and why not.

    TVM loads ``libtvm_runtime_cuda.so`` at import, except in runtime-only mode
    (``TVM_USE_RUNTIME_LIB=1``), where a CUDA library would otherwise fail to load even on a GPU.
    """
    import tvm
    if tvm.runtime.enabled("cuda"):
        return True, ""
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            "tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=[_runtime_dir()])
    except (OSError, RuntimeError) as exc:
        return False, str(exc).strip().splitlines()[-1]
    return tvm.runtime.enabled("cuda"), "libtvm_runtime_cuda loaded but registers no CUDA API"


def _runtime_dir() -> Path:
    from tvm.base import _LOADED_LIBS
    return Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent


def local_arch() -> str | None:
    """``sm_XY`` of CUDA device 0, or None without a usable GPU."""
    import tvm
    if missing_device():
        return None
    return "sm_" + tvm.cuda(0).compute_version.replace(".", "")


def _runs_on(arch: str, compute_version: str) -> bool:
    """SASS for ``sm_XY`` runs on the same major version with minor >= Y (``sm_XYa``: only
    on X.Y); nvcc is asked for SASS only, so there is no PTX to JIT for newer GPUs."""
    match = re.fullmatch(r"sm_(\d+)(\d)(a?)", arch)
    have = [int(v) for v in compute_version.split(".")[:2]]
    if not match or len(have) != 2:
        return True  # unknown format: let the driver decide
    major, minor, exact = int(match.group(1)), int(match.group(2)), match.group(3)
    return have == [major, minor] if exact else have[0] == major and have[1] >= minor


def missing_device() -> str | None:
    """None where a CUDA device is usable here, else why not."""
    import tvm
    loaded, why = runtime_loaded()
    if not loaded:
        return f"no CUDA device here (no NVIDIA driver: {why})"
    return None if tvm.cuda(0).exist else "no CUDA device here"


def require_device(arch: str) -> None:
    """Raise TargetError unless a CUDA device here can run code compiled for ``arch``."""
    import tvm
    missing = missing_device()
    if missing:
        raise TargetError(f"{missing}: the stage is compiled for {arch} and needs one to run; "
                          f"without one it can be compiled (verify=False, CLI --no-verify) and "
                          f"saved")
    version = tvm.cuda(0).compute_version
    if not _runs_on(arch, version):
        raise TargetError(f"compiled for {arch}, but CUDA device 0 has compute capability "
                          f"{version}: recompile with target_config={{'arch': "
                          f"'sm_{version.replace('.', '')}'}}")


@contextlib.contextmanager
def nvcc_build(nvcc: str) -> Iterator[None]:
    """Make TVM's compile callback use nvcc (fatbin) for the duration of a build.

    TVM reads ``TVM_CUDA_COMPILE_MODE`` when it compiles; its default, NVRTC, needs the
    ``cuda-bindings`` package. nvcc is invoked by name, so its folder goes on ``PATH``.
    """
    saved = {key: os.environ.get(key) for key in ("TVM_CUDA_COMPILE_MODE", "PATH")}
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    os.environ["PATH"] = os.pathsep.join([str(Path(nvcc).parent), saved["PATH"] or ""])
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- checking a library --------------------------------------------------------------------------

def device_code_format(library: Path) -> str:
    """``"fatbin"`` or ``"cubin"``: the device code in a stage library.

    Raises:
        TargetError: the library holds CUDA source, or no device code.
    """
    with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if any(data.find(mark) >= 0 for mark in _CUDA_SOURCE_MARKS):
            raise TargetError(f"cuda: {library.name} holds CUDA source instead of device code "
                              f"(TVM compiled without its CUDA runtime); refusing to save it")
        if data.find(_FATBIN_MAGIC) >= 0:
            return "fatbin"
        if data.find(_ELF_MAGIC, 1) >= 0:  # a cubin is an ELF file inside the library's ELF
            return "cubin"
    raise TargetError(f"cuda: {library.name} holds no CUDA device code")


# -- the stub driver --------------------------------------------------------------------------------

def _driver_symbols(runtime_library: Path) -> list[str]:
    """Driver-API functions (``cuXxx``, unversioned) that TVM's CUDA runtime imports."""
    if not runtime_library.is_file():
        raise TargetError(f"cuda: this TVM build has no CUDA runtime ({runtime_library.name} "
                          f"is missing from {runtime_library.parent})")
    nm = shutil.which("nm")
    if nm is None:
        raise TargetError("cuda: 'nm' (binutils) not found; it lists the driver symbols for the "
                          "stub libcuda.so.1 used to build device code without a GPU driver")
    listing = subprocess.run([nm, "-D", "--undefined-only", str(runtime_library)],
                             capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        raise TargetError(f"cuda: nm failed on {runtime_library}: {listing.stderr.strip()}")
    names = {line.split()[-1] for line in listing.stdout.splitlines() if line.strip()}
    return sorted(name for name in names if re.fullmatch(r"cu[A-Z]\w*", name))


def _stub_source(symbols: Sequence[str]) -> str:
    lines = ["/* Stub NVIDIA driver: lets TVM's CUDA runtime load to compile kernels. */",
             '#ifdef __cplusplus\nextern "C" {\n#endif']
    lines += [f"int {name}(void) {{ return {_CUDA_ERROR_NO_DEVICE}; }}" for name in symbols]
    lines.append("#ifdef __cplusplus\n}\n#endif\n")
    return "\n".join(lines)


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmcompile" / "cuda-stub"


def stub_driver_dir() -> Path:
    """A folder holding a stub ``libcuda.so.1`` for this TVM build (built on first use).

    Raises:
        TargetError: nm or the C compiler is missing, or the stub does not build.
    """
    import tvm
    from tvm.support.cc import create_shared
    symbols = _driver_symbols(_runtime_dir() / "libtvm_runtime_cuda.so")
    source = _stub_source(symbols)
    key = hashlib.sha256(source.encode()).hexdigest()[:12]
    folder = _cache_root() / f"tvm-{tvm.__version__}-{key}"
    if (folder / "libcuda.so.1").is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
    except OSError:  # no writable cache: a private folder for this process
        build = folder = Path(tempfile.mkdtemp(prefix="mmcompile-cuda-stub-"))
    (build / "stub.c").write_text(source)
    try:
        create_shared(str(build / "libcuda.so.1"), [str(build / "stub.c")],
                      options=["-Wl,-soname,libcuda.so.1"], cc=find_c_compiler())
        if build != folder:
            with contextlib.suppress(OSError):  # another process may have won the race
                os.replace(build, folder)
    except RuntimeError as exc:
        raise TargetError(f"cuda: cannot build the stub libcuda.so.1: {exc}") from exc
    finally:
        if build != folder:
            shutil.rmtree(build, ignore_errors=True)
    return folder


# -- building in a helper process ---------------------------------------------------------------

@contextlib.contextmanager
def _removed_on_error(folder: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


class _BuildHelper:
    """A long-lived helper process with the stub driver, so TVM's import (~4 s) is paid once per
    compiling process rather than once per stage.

    Protocol: one work folder per line on its stdin, one line back on its stdout when the folder
    holds ``result.json``. Its stderr goes to a log file, quoted when a build fails. Any failure
    or interruption kills it, so a request and its reply never get out of step.
    """

    def __init__(self) -> None:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(stub_driver_dir())] + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-c",
             "from mmcompile.targets.tvm.cuda import helper_main; helper_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env, text=True)

    def build(self, work: Path) -> None:
        start = self.log.tell()
        try:
            self.process.stdin.write(f"{work}\n")
            self.process.stdin.flush()
            if self.process.stdout.readline():
                return
        except BaseException:
            self.close()
            raise
        self.close()
        self.log.seek(start)
        tail = self.log.read().decode(errors="replace").strip().splitlines()[-15:]
        raise TargetError(f"cuda: the device-code build process died (exit status "
                          f"{self.process.returncode})" + "".join(f"\n  {t}" for t in tail))

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        if self.alive:
            self.process.kill()
        self.process.wait()


_helper: _BuildHelper | None = None
_helper_lock = threading.Lock()


def _close_helper() -> None:
    if _helper is not None and _helper.alive:
        _helper.process.stdin.close()  # end of input: the helper exits
        try:
            _helper.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _helper.close()


atexit.register(_close_helper)


def compile_in_child(graph: Graph, options: CompileOptions) -> CudaExecutable:
    """Compile ``graph`` in the helper process with the stub driver (see the module docstring).

    Raises:
        TargetError: the build failed (its message, or the tail of the helper's log).
    """
    global _helper
    import onnx
    work = Path(tempfile.mkdtemp(prefix="mmcompile-cuda-"))
    with _removed_on_error(work):
        onnx.save_model(graph.to_onnx(), str(work / "stage.onnx"), save_as_external_data=True,
                        location="stage.onnx.data", size_threshold=1024)
        (work / "request.json").write_text(json.dumps(
            {"name": graph.name, "threads": options.threads, "config": dict(options.config)}))
        with _helper_lock:
            if _helper is None or not _helper.alive:
                options.progress("starting a CUDA build process (no GPU driver here)")
                _helper = _BuildHelper()
            _helper.build(work)
        result = json.loads((work / "result.json").read_text())
        if "error" in result:
            raise TargetError(result["error"])
        for name in ("stage.onnx", "stage.onnx.data"):
            (work / name).unlink(missing_ok=True)
        return CudaExecutable.from_build(work / result["library"], result["info"], owned=work)


def helper_main() -> None:
    """The helper process: for each work folder named on stdin, compile its ``stage.onnx`` and
    write the library and ``result.json`` (``library`` and ``info``, or ``error``)."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints (TVM, nvcc) go to the log, not into the replies
    for line in sys.stdin:
        _build(Path(line.strip()))
        replies.write("done\n")
        replies.flush()


def _build(work: Path) -> None:
    import onnx

    from mmcompile.errors import MMCompileError
    from mmcompile.ir import Graph
    from mmcompile.targets.tvm.target import TVMCudaTarget
    request = json.loads((work / "request.json").read_text())
    try:
        graph = Graph.from_onnx(onnx.load(str(work / "stage.onnx")), name=request["name"])
        options = CompileOptions(threads=request["threads"], config=request["config"])
        executable = TVMCudaTarget().compile_here(graph, options)
        result: dict[str, Any] = {"library": executable.save(work, "stage")["library"],
                                  "info": executable.describe()}
    except MMCompileError as exc:
        result = {"error": str(exc)}
    except Exception as exc:  # a bug or a TVM crash: report it, keep serving
        traceback.print_exc()
        result = {"error": f"cuda: the device-code build failed: {type(exc).__name__}: {exc}"}
    (work / "result.json").write_text(json.dumps(result))


# -- the executable --------------------------------------------------------------------------------

class CudaExecutable(Executable):
    """A CUDA stage held as its exported library; the VM is created on the first run.

    So a machine without a GPU can compile and save, and is told why it cannot run.

    Args:
        library: the stage library (``.so``).
        info: JSON-able facts for the manifest (``arch``, ``device_code``, ...).
        threads: host threads for the VM.
        owned: a temporary folder holding ``library``, removed with this object.
    """

    def __init__(self, library: Path, info: Mapping[str, Any], threads: int = 0,
                 owned: Path | None = None):
        self.library = Path(library)
        self.info = dict(info)
        self.threads = threads
        self._stage: Executable | None = None
        if owned is not None:
            weakref.finalize(self, shutil.rmtree, owned, True)

    @classmethod
    def from_build(cls, library: Path, info: Mapping[str, Any],
                   owned: Path | None = None) -> CudaExecutable:
        """Wrap a freshly built library after checking that it holds device code."""
        return cls(library, {**info, "device_code": device_code_format(library)}, owned=owned)

    @classmethod
    def export(cls, relax_executable: Any, info: Mapping[str, Any]) -> CudaExecutable:
        """Export a ``relax.Executable`` into a temporary library (needs the host C compiler)."""
        folder = Path(tempfile.mkdtemp(prefix="mmcompile-cuda-"))
        with _removed_on_error(folder):
            try:
                with native_log_to([]):
                    relax_executable.export_library(str(folder / "stage.so"))
            except Exception as exc:
                raise TargetError(f"cuda: exporting the stage library failed: {exc}") from exc
            return cls.from_build(folder / "stage.so", info, owned=folder)

    @classmethod
    def load(cls, directory: Path, files: Mapping[str, str], info: Mapping[str, Any],
             threads: int = 0) -> CudaExecutable:
        """Load a saved stage; fails at once (TargetError) where it cannot run."""
        executable = cls(Path(directory) / files["library"], info, threads)
        executable._loaded()
        return executable

    def _loaded(self) -> Executable:
        if self._stage is None:
            require_device(str(self.info.get("arch", "unknown arch")))
            self._stage = load_executable(self.library.parent, {"library": self.library.name},
                                          self.info, "cuda", self.threads)
        return self._stage

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        return self._loaded().run(inputs)

    def save(self, directory: Path, stem: str) -> dict[str, str]:
        name = f"{stem}.so"
        shutil.copyfile(self.library, directory / name)
        return {"library": name}

    def describe(self) -> dict[str, Any]:
        return dict(self.info)
