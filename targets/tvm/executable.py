"""A TVM-compiled stage: a Relax VM over an exported library.

A loaded CPU stage runs through tvm-ffi and TVM's runtime library alone (:func:`host_runtime`,
:func:`_host_vm`): a deployed process does not import the ``tvm`` package. Other devices, and
stages just compiled, use ``tvm.runtime``, which also works with TVM's runtime-only library
(``TVM_USE_RUNTIME_LIB=1``, or the ``apache-tvm-runtime`` wheel), where ``tvm.relax`` does not
exist.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmcompile.artifact import ArtifactError
from mmcompile.target import Executable
from mmcompile.schedule import available_cores

# TVM kernels may use aligned vector loads; buffers that are not 64-byte aligned are copied.
_ALIGNMENT = 64


def runtime_tvm():
    """``tvm``, imported to run compiled stages: without torch, and without the backtrace
    that TVM's runtime-only import would pay for.

    - apache-tvm-ffi imports torch whenever it is installed (to pick up its DLPack exchange
      API), which costs a process that only runs artifacts ~2 s and ~200 MB. When the caller
      has not imported torch, TVM is imported with ``sys.modules["torch"] = None`` (Python's
      documented way to make an import fail), then the entry is removed: torch stays
      importable, and torch tensors given later still pass through the DLPack protocol
      (tested). With torch already imported (the caller passes torch tensors), nothing changes.
    - With the runtime-only library, ``import tvm`` registers Python classes for type keys
      only the compiler library has. Each lookup of a missing key is a C++ exception, and
      the first one initializes libbacktrace over every loaded library: 0.23-0.27 s, 40% of
      a deployed process's cold start. The lookup is routed through the registry's list of
      type keys (``ffi.GetRegisteredTypeKeys``, re-read before a key is declared missing, so a
      library loaded meanwhile is seen) for the duration of the import.
    """
    if "tvm" in sys.modules:
        import tvm
        return tvm
    with _without_torch(), _type_keys_from_registry():
        import tvm
    return tvm


@contextlib.contextmanager
def _without_torch():
    """Imports inside see torch as not installed, unless the caller imported it already."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None
    try:
        yield
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


@contextlib.contextmanager
def _type_keys_from_registry():
    try:
        from tvm_ffi import core, get_global_func
        lookup = core._object_type_key_to_index
        listing = get_global_func("ffi.GetRegisteredTypeKeys", allow_missing=True)
    except (ImportError, AttributeError):  # another tvm-ffi: import as it is
        listing = None
    if listing is None:
        yield
        return
    known: set[str] = set()

    def key_to_index(key: str):
        if key not in known:
            known.update(str(k) for k in listing())
        return lookup(key) if key in known else None

    core._object_type_key_to_index = key_to_index
    try:
        yield
    finally:
        core._object_type_key_to_index = lookup


_HOST_LIBRARY_LOADED = False
_POOLED_ALLOCATOR = 2  # tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR


def host_runtime() -> None:
    """Load TVM's runtime library for running CPU stages through tvm-ffi alone, as
    ``tvm/base.py`` loads it (``RTLD_GLOBAL``: stage libraries call into it), without importing
    the ``tvm`` Python package: that import (``tvm.ir``, ``tvm.tirx``, ``tvm.script``, ...: ~250
    modules) was ~60 ms of a deployed process's cold start. If ``tvm`` is imported later (to
    compile), it loads the same library again, which the dynamic loader shares."""
    global _HOST_LIBRARY_LOADED
    if _HOST_LIBRARY_LOADED or "tvm" in sys.modules:
        _HOST_LIBRARY_LOADED = True
        return
    import importlib.util
    with _without_torch():  # apache-tvm-ffi imports torch when it can (see runtime_tvm)
        from tvm_ffi.libinfo import load_lib_ctypes
    spec = importlib.util.find_spec("tvm")
    if spec is None or spec.origin is None:
        raise ArtifactError("TVM is not installed: install mmcompile, or mmcompile-runtime "
                            "with apache-tvm-runtime")
    load_lib_ctypes("tvm", "tvm_runtime", "RTLD_GLOBAL",
                    extra_lib_paths=[Path(spec.origin).parent / "lib"])
    _HOST_LIBRARY_LOADED = True


# Linux's arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): a process must ask before its
# first AMX tile instruction, else that instruction faults (SIGILL). Granted per process.
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


@functools.cache
def enable_amx() -> bool:
    """Ask the kernel for AMX tile state in this process (Linux, x86-64); whether it granted
    it. False elsewhere, on a CPU without AMX, and on kernels older than 5.16."""
    import ctypes
    import platform
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def uses_amx(info: Mapping[str, Any]) -> bool:
    """Whether a stage's manifest facts say its int8 kernels use AMX tiles."""
    return bool(info.get("int8", {}).get("amx", 0))


def tvm_version() -> str:
    """The installed TVM's version, read without importing it."""
    if "tvm" in sys.modules:
        return sys.modules["tvm"].__version__
    from importlib import metadata
    for distribution in ("apache-tvm", "apache-tvm-runtime"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return runtime_tvm().__version__  # a source build


def _host_vm(library: Any) -> Any:
    """The Relax VM over a loaded CPU stage library, through tvm-ffi: what
    ``tvm.runtime.vm.VirtualMachine`` does for one CPU device with the pooled allocator."""
    vm = library["vm_load_executable"]()
    vm["vm_initialization"](1, 0, _POOLED_ALLOCATOR)  # kDLCPU, device 0
    return vm


def configure_threads(threads: int) -> None:
    """Size TVM's thread pool before its first use.

    TVM sizes each thread's pool once, from ``TVM_NUM_THREADS``; left unset it takes half the
    cores (1 of 2 here) and pins the calling thread to CPU 0. ``runtime.config_threadpool``
    cannot grow a pool later, and from a non-main thread it pins that thread to CPU 0. So the
    environment variable is set, unless the user already chose a value.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(threads or available_cores()))
    # An idle pool thread spins (sched_yield) this many times before it sleeps. TVM's default,
    # 300000, keeps each helper busy for ~0.2-1 s after every run and after a pool starts,
    # stealing a core from whatever runs next: measured on Whisper-text (2 cores), the
    # whole-graph model ran 0.55 ms alone but 0.76-0.98 ms while a parallel schedule's
    # workers existed or had just closed. 10000 (~10 ms) still covers the microsecond gaps
    # between kernels of one run (no change alone: 0.542 vs 0.545 ms).
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "10000")


def configure_worker_thread(threads: int) -> None:
    """Size the calling (worker) thread's TVM pool. Affinity mode -3 ("threads share all the
    listed cores") keeps the thread free to run on every core: the default mode pins a
    non-main thread that configures its pool to CPU 0."""
    import tvm_ffi
    _PLACEMENT.pinned = frozenset()  # its pool's threads share the cores: nothing to avoid
    cpus = [str(c) for c in sorted(os.sched_getaffinity(0))]
    tvm_ffi.get_global_func("runtime.config_threadpool")(-3, max(1, threads), cpus)


class _Placement(threading.local):
    """Per calling thread: the cores other threads are pinned to (None until the thread's
    second run: its pool starts during the first), and how many runs it has made."""

    pinned: frozenset[int] | None = None
    runs = 0


_PLACEMENT = _Placement()


@functools.cache
def _sched_getcpu():
    """libc's ``sched_getcpu`` (a vDSO read, ~0.2 us through ctypes); None off glibc."""
    import ctypes
    try:
        getcpu = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    getcpu.restype, getcpu.argtypes = ctypes.c_int, []
    return getcpu


def _cpu_list(text: str) -> set[int]:
    """``/proc``'s ``Cpus_allowed_list`` (``0-3,6``) as a set."""
    cpus = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if low:
            cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def pinned_threads_cpus() -> frozenset[int]:
    """The cores that threads of this process other than the caller are pinned to (an
    affinity of one core: TVM's pool threads, ``TVM_BIND_THREADS=1``); empty off Linux."""
    me, cpus = threading.get_native_id(), set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return frozenset()
    for task in tasks:
        if task == str(me):
            continue
        try:
            with open(f"/proc/self/task/{task}/status") as f:
                line = next((ln for ln in f if ln.startswith("Cpus_allowed_list:")), "")
        except OSError:  # the thread ended meanwhile
            continue
        allowed = _cpu_list(line.partition(":")[2])
        if len(allowed) == 1:
            cpus |= allowed
    return frozenset(cpus)


def keep_off_pinned_cores() -> None:
    """Move the calling thread off a core that one of TVM's pinned pool threads owns.

    TVM pins its pool threads (the second of two on core 1), not the thread that calls a
    kernel, which does the first share of every parallel loop. After an idle spell, Linux
    left that thread on the pool thread's core (seen in /proc during the bench; the likely
    cause, not verified: in a VM an idle virtual CPU can read as preempted, and the wake-up
    path then avoids it), and every kernel ran its two halves one after the other.
    Measured (2 cores, MOSEI-TFN at batch 1, 50 ms sleeps between groups of 12 calls):
    unpinned pool threads, 0.58 ms a call where a busy loop measured 0.33; in the bench
    (lock-step slices 200 ms apart), pinned pool threads gave whole processes of 0.69 ms
    calls (p10) with the caller found on the pool thread's core. A call now checks the core
    it runs on (~0.2 us) and, when it is a pinned one, narrows its own affinity to the other
    allowed cores and restores it (the thread stays where it was moved). Where the OS
    refuses the change (a container's policy), the call runs where it is."""
    state = _PLACEMENT
    if state.pinned is None:
        state.runs += 1
        if state.runs < 2:
            return
        state.pinned = pinned_threads_cpus() if _sched_getcpu() is not None else frozenset()
    if state.pinned and _sched_getcpu()() in state.pinned:
        allowed = os.sched_getaffinity(0)
        away = allowed - state.pinned
        if away:
            try:
                os.sched_setaffinity(0, away)
                os.sched_setaffinity(0, allowed)
            except OSError:  # not allowed here: stop trying
                state.pinned = frozenset()
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, allowed)


@contextlib.contextmanager
def native_log_to(sink: list[str]):
    """Capture what TVM's C++ logging writes to file descriptor 2 (``Warning: Scope Saving:``
    lines per function on export, index-bound warnings on compile) into ``sink``; the
    outcome is reported through exceptions and manifests instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            sink.append(capture.read().decode(errors="replace"))


def _address(value: Any) -> int:
    if hasattr(value, "data_ptr"):
        return int(value.data_ptr())
    return int(value.ctypes.data)


def _aligned_copy(array):
    """A copy of ``array`` whose data starts on an ``_ALIGNMENT`` boundary."""
    buf = np.empty(array.nbytes + _ALIGNMENT, np.uint8)
    start = (-buf.ctypes.data) % _ALIGNMENT
    out = buf[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    np.copyto(out, array)
    return out


def _unshared(result: Any, staged: Sequence[tuple[int, int]]) -> Any:
    """``result``, or a copy of it where it shares memory with a staging buffer (an output that
    is an input, or a view of one): the next call overwrites those buffers."""
    address = result.data_ptr()
    if any(start <= address < end for start, end in staged):
        return np.from_dlpack(result).copy()
    return result


def to_tvm(value: Any):
    """numpy array / torch tensor -> tvm Tensor, sharing memory when the buffer is aligned."""
    import tvm_ffi
    writable = not isinstance(value, np.ndarray) or value.flags.writeable
    empty = (value.size if isinstance(value, np.ndarray) else value.numel()) == 0
    if writable and not empty and _address(value) % _ALIGNMENT == 0:
        # DLPack refuses read-only buffers; the alignment TVM's kernels assume (as
        # tvm.runtime.from_dlpack asks)
        return tvm_ffi.from_dlpack(value, require_alignment=_ALIGNMENT, require_contiguous=True)
    array = value if isinstance(value, np.ndarray) else value.numpy()
    if empty:  # zero-size buffers come through DLPack with strides TVM rejects
        return runtime_tvm().runtime.tensor(array)
    # numpy aligns to 16 bytes, so most inputs land here. Copied by numpy and handed over
    # through DLPack: tvm.runtime.tensor's copy took 31 us for AV-MNIST's 50 KB audio input,
    # this ~3 us (MOSEI-TFN has three inputs, the whole model 0.35 ms in the VM).
    return tvm_ffi.from_dlpack(_aligned_copy(array), require_alignment=_ALIGNMENT,
                               require_contiguous=True)


class TVMExecutable(Executable):
    """Runs a compiled Relax program's ``main`` on one device.

    Args:
        module: a ``relax.Executable`` (just compiled) or a ``tvm.runtime.Module`` (loaded).
        inputs: input names in ``main``'s parameter order.
        outputs: output names in ``main``'s result order.
        device: ``"cpu"`` or ``"cuda"``.
        info: JSON-able facts for the manifest.
    """

    def __init__(self, module: Any, inputs: Sequence[str], outputs: Sequence[str],
                 device: str, info: Mapping[str, Any], library: Path | None = None):
        self.module = module
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.device = device
        self.info = dict(info)
        self.library = library  # set when loaded: a loaded library cannot be re-exported
        if library is not None and device == "cpu":
            self.vm = _host_vm(module)
        else:
            import tvm
            from tvm.runtime.vm import VirtualMachine
            self.vm = VirtualMachine(module, tvm.device(device, 0))
        self._main = self.vm["main"]  # looked up once, not on every call (~6 us each)
        # Per input: an aligned buffer (numpy array, its TVM tensor, its address) reused by
        # every call whose array is not aligned (see _argument).
        self._staging: list[tuple[np.ndarray, Any, int] | None] = [None] * len(self.inputs)
        import tvm_ffi  # loaded by now (host_runtime / runtime_tvm)
        self._from_dlpack = tvm_ffi.from_dlpack
        self._on_host = device == "cpu"  # a host call keeps off pinned pool threads' cores

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        if self._on_host:
            keep_off_pinned_cores()
        staged: list[tuple[int, int]] = []  # the staging buffers this call uses: (start, end)
        result = self._main(*(self._argument(i, inputs[name], staged)
                              for i, name in enumerate(self.inputs)))
        results = [result] if len(self.outputs) == 1 else list(result)
        if staged:
            results = [_unshared(r, staged) for r in results]
        return dict(zip(self.outputs, results))

    def _argument(self, index: int, value: Any, staged: list[tuple[int, int]]) -> Any:
        """``value`` as the VM takes it. A host numpy array that is not 64-byte aligned (numpy
        aligns to 16) or is read-only (DLPack refuses those) is copied into this input's
        staging buffer, allocated on the first such call. A fresh aligned copy per call cost
        MOSEI-LSTM at batch 1 ~25 us of its 0.45 ms call (timed between calls of the model;
        ~8 us for the three copies timed alone). The VM runs one call at a time (see
        :meth:`replica`), so one buffer per input is enough."""
        if self.device != "cpu" or type(value) is not np.ndarray or not value.size:
            return to_tvm(value)
        if value.flags.writeable and value.flags.c_contiguous:
            tensor = self._from_dlpack(value, require_contiguous=True)
            if tensor.data_ptr() % _ALIGNMENT == 0:
                return tensor
        buffer = self._staging[index]
        if buffer is None or buffer[0].shape != value.shape or buffer[0].dtype != value.dtype:
            array = _aligned_copy(value)
            buffer = self._staging[index] = (array, self._from_dlpack(
                array, require_alignment=_ALIGNMENT, require_contiguous=True),
                _address(array))
        else:
            np.copyto(buffer[0], value)
        staged.append((buffer[2], buffer[2] + value.nbytes))
        return buffer[1]

    def save(self, directory: Path, stem: str) -> dict[str, str]:
        name = f"{stem}.so"
        if self.library is not None:
            shutil.copyfile(self.library, directory / name)
            return {"library": name}
        with native_log_to([]):
            self.module.export_library(str(directory / name))
        return {"library": name}

    def describe(self) -> dict[str, Any]:
        return dict(self.info)

    def replica(self) -> TVMExecutable:
        """A second VM over the same library (one VM must not run on two threads at once)."""
        return TVMExecutable(self.module, self.inputs, self.outputs, self.device, self.info,
                             self.library)


def load_executable(directory: Path, files: Mapping[str, str], info: Mapping[str, Any],
                    device: str, threads: int) -> TVMExecutable:
    """Load a stage library written by :meth:`TVMExecutable.save`.

    Raises:
        ArtifactError: built with an incompatible TVM, or the library does not load.
    """
    built_with = str(info.get("versions", {}).get("tvm", ""))
    here = tvm_version()
    if built_with.split(".")[:2] != here.split(".")[:2]:
        raise ArtifactError(f"{directory} was built with TVM {built_with or 'unknown'}, this is "
                            f"TVM {here}: recompile the model")
    configure_threads(threads)
    if device == "cpu" and uses_amx(info) and not enable_amx():
        raise ArtifactError(f"{directory} runs int8 kernels on AMX tiles, which this machine "
                            "or its OS does not offer: recompile the model here")
    try:
        with native_log_to([]):
            if device == "cpu":
                host_runtime()
                import tvm_ffi
                module = tvm_ffi.load_module(str(directory / files["library"]))
            else:
                module = runtime_tvm().runtime.load_module(str(directory / files["library"]))
            return TVMExecutable(module, info["inputs"], info["outputs"], device, info,
                                 library=directory / files["library"])
    except Exception as exc:
        raise ArtifactError(f"cannot load {directory / files['library']}: {exc}") from exc
