"""The deployment install: two wheels that load and run ``.mmc`` artifacts without the compiler.

``mmcompile runtime-wheels -o DIR`` writes them from what is installed here:

- ``mmcompile-runtime``: the ``mmcompile`` import package cut to what loading and running
  need (:data:`RUNTIME_FILES`: the runtime, the artifact reader, the executor, the schedules,
  and the targets' loaders); ``import mmcompile; mmcompile.load(path).run(feeds)`` works as in
  the full install. It requires numpy, ``apache-tvm-runtime`` and ``apache-tvm-ffi``, and
  onnxruntime with the ``[onnxruntime]`` extra (for artifacts with an onnxruntime stage);
- ``apache-tvm-runtime``: the installed apache-tvm wheel without what only compiling needs
  (its 250 MB compiler library, bundled CUTLASS headers, C++ sources, the web runtime). TVM
  itself falls back to its runtime library when the compiler library is absent (the
  runtime-only mode of ``tvm/base.py``). Licence files are kept (Apache-2.0).

Install them instead of ``mmcompile`` (both provide the ``mmcompile`` and ``tvm`` import
packages), e.g. ``pip install --find-links DIR mmcompile-runtime``. Wheels are zip files with
a ``RECORD`` of hashes (PEP 427); they are written here, without a build backend, because the
second is a repackaging of files already built.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import zipfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from mmcompile.errors import MMCompileError

TVM_VERSION = "0.27.0.post1"
TVM_FFI_VERSION = "0.1.14.post1"
# files of the mmcompile import package the runtime needs (``targets/``: mmcompile.targets)
RUNTIME_FILES = (
    "__init__.py", "_lazy.py", "errors.py", "artifact.py", "loading.py", "runtime.py",
    "executor.py", "report.py", "schedule.py", "signature.py", "spec.py", "target.py",
    "profiles.py",  # artifacts compiled for dim ranges (dynamic=) dispatch over their builds
    "planning/__init__.py", "planning/parallel.py",  # load(..., schedule=) re-plans
    "targets/__init__.py", "targets/onnxruntime.py", "targets/tvm/__init__.py",
    "targets/tvm/target.py", "targets/tvm/executable.py", "targets/tvm/cuda.py",
    # accelerator stages load their instruction streams and run them in the simulator
    "targets/accel/__init__.py", "targets/accel/target.py", "targets/accel/spec.py",
    "targets/accel/isa.py", "targets/accel/simulator.py",
)
# what the TVM runtime wheel leaves out (prefixes of paths in the apache-tvm wheel)
TVM_COMPILER_ONLY = ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty/", "tvm/src/", "tvm/web/")


class PackagingError(MMCompileError):
    """A runtime wheel cannot be built (a file or a distribution is missing)."""


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(
        b"=").decode()


def write_wheel(path: Path, files: Iterable[tuple[str, bytes]], dist_info: str,
                meta: dict[str, bytes]) -> Path:
    """A wheel at ``path``: ``files`` (archive path, content), then ``dist_info``'s files
    (``METADATA``, ``WHEEL``, ...) and its ``RECORD``. Written to a temporary name first."""
    records = []
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in [*files, *((f"{dist_info}/{k}", v) for k, v in meta.items())]:
            wheel.writestr(name, data)
            records.append((name, _digest(data), str(len(data))))
        record = io.StringIO()
        writer = csv.writer(record, lineterminator="\n")
        writer.writerows(records)
        writer.writerow((f"{dist_info}/RECORD", "", ""))
        wheel.writestr(f"{dist_info}/RECORD", record.getvalue())
    partial.replace(path)
    return path


def _source(relative: str) -> Path:
    if relative.startswith("targets/"):
        spec = importlib.util.find_spec("mmcompile.targets")
        return Path(next(iter(spec.submodule_search_locations))) / relative[len("targets/"):]
    return Path(importlib.util.find_spec("mmcompile").origin).parent / relative


def runtime_wheel(out: Path) -> Path:
    """The ``mmcompile-runtime`` wheel in ``out``."""
    from mmcompile import __version__
    files = []
    for relative in RUNTIME_FILES:
        source = _source(relative)
        if not source.is_file():
            raise PackagingError(f"the runtime needs {relative}, not found at {source}")
        files.append((f"mmcompile/{relative}", source.read_bytes()))
    dist_info = f"mmcompile_runtime-{__version__}.dist-info"
    meta = {"METADATA": "\n".join([
        "Metadata-Version: 2.1", "Name: mmcompile-runtime", f"Version: {__version__}",
        "Summary: mmcompile's runtime: load and run compiled .mmc artifacts without the "
        "compiler", "License: Apache-2.0", "Requires-Python: >=3.10",
        "Requires-Dist: numpy>=1.26", f"Requires-Dist: apache-tvm-runtime=={TVM_VERSION}",
        f"Requires-Dist: apache-tvm-ffi=={TVM_FFI_VERSION}",
        "Requires-Dist: ml_dtypes<0.7", "Provides-Extra: onnxruntime",
        'Requires-Dist: onnxruntime>=1.20; extra == "onnxruntime"', ""]).encode(),
        "WHEEL": b"Wheel-Version: 1.0\nGenerator: mmcompile\nRoot-Is-Purelib: true\n"
                 b"Tag: py3-none-any\n"}
    return write_wheel(out / f"mmcompile_runtime-{__version__}-py3-none-any.whl", files,
                       dist_info, meta)


def tvm_runtime_wheel(out: Path) -> Path:
    """The ``apache-tvm-runtime`` wheel in ``out``, from the installed apache-tvm."""
    try:
        tvm = metadata.distribution("apache-tvm")
    except metadata.PackageNotFoundError as exc:
        raise PackagingError("apache-tvm is not installed here: the TVM runtime wheel is "
                             "made from its files") from exc
    if tvm.version != TVM_VERSION:
        raise PackagingError(f"apache-tvm {tvm.version} is installed; the runtime wheel is "
                             f"made from {TVM_VERSION}")
    old_info = f"apache_tvm-{tvm.version}.dist-info"
    files, meta = [], {}
    for entry in tvm.files or ():
        name = entry.as_posix()
        if name.startswith(TVM_COMPILER_ONLY) or name.startswith(("../", "__pycache__")) \
                or "/__pycache__/" in name:
            continue
        if name.startswith(old_info + "/"):
            rest = name[len(old_info) + 1:]
            if rest.startswith("licenses/") or rest == "WHEEL":
                meta[rest] = Path(entry.locate()).read_bytes()
            continue
        files.append((name, Path(entry.locate()).read_bytes()))
    if not any(name == "tvm/lib/libtvm_runtime.so" for name, _ in files):
        raise PackagingError("the installed apache-tvm has no tvm/lib/libtvm_runtime.so")
    header, _, body = tvm.read_text("METADATA").partition("\n\n")
    lines = [line for line in header.splitlines()
             if not line.startswith(("Requires-Dist:", "Provides-Extra:", "Name:"))]
    lines[1:1] = ["Name: apache-tvm-runtime"]
    lines += [f"Requires-Dist: apache-tvm-ffi=={TVM_FFI_VERSION}", "Requires-Dist: ml_dtypes<0.7",
              "Requires-Dist: numpy", "Requires-Dist: typing_extensions"]
    meta["METADATA"] = ("\n".join(lines) + "\n\n" + body).encode()
    tag = next(line.split(": ", 1)[1] for line in meta["WHEEL"].decode().splitlines()
               if line.startswith("Tag:"))
    return write_wheel(out / f"apache_tvm_runtime-{tvm.version}-{tag}.whl", files,
                       f"apache_tvm_runtime-{tvm.version}.dist-info", meta)


def build_runtime_wheels(out: str | Path) -> list[Path]:
    """Both wheels in ``out`` (created if needed).

    Raises:
        PackagingError: a runtime file or the apache-tvm installation is missing.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [runtime_wheel(out), tvm_runtime_wheel(out)]
