"""The deployment install (``mmcompile runtime-wheels``): the two wheels' contents, and a fresh
virtual environment with only them (and numpy, apache-tvm-ffi, ml_dtypes from the registry)
that loads and runs an artifact compiled by the full install."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_runtime import two_branch_graph

import mmcompile
from mmcompile.packaging import RUNTIME_FILES, TVM_COMPILER_ONLY, build_runtime_wheels
from mmcompile.reference import run_onnxruntime


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheels")
    runtime, tvm = build_runtime_wheels(folder)
    return folder, runtime, tvm


def _records_match(wheel: Path) -> list[str]:
    """Names whose RECORD hash or size does not match the archive (PEP 427)."""
    bad = []
    with zipfile.ZipFile(wheel) as archive:
        record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        rows = list(csv.reader(io.StringIO(archive.read(record).decode())))
        listed = {row[0] for row in rows}
        if listed != set(archive.namelist()):
            bad.append(f"RECORD lists {sorted(listed ^ set(archive.namelist()))[:3]}")
        for name, digest, size in rows:
            if name == record:
                continue
            data = archive.read(name)
            want = "sha256=" + base64.urlsafe_b64encode(
                hashlib.sha256(data).digest()).rstrip(b"=").decode()
            if digest != want or int(size) != len(data):
                bad.append(name)
    return bad


def test_the_runtime_wheel_holds_the_runtime_files_and_a_valid_record(wheels):
    _, runtime, _ = wheels
    with zipfile.ZipFile(runtime) as archive:
        names = set(archive.namelist())
        metadata = archive.read("mmcompile_runtime-0.1.0.dist-info/METADATA").decode()
    assert {f"mmcompile/{f}" for f in RUNTIME_FILES} <= names
    assert not any(n.startswith(("mmcompile/compiler", "mmcompile/build", "mmcompile/frontend",
                                 "mmcompile/passes", "mmcompile/targets/tvm/lowering"))
                   for n in names)
    assert "Requires-Dist: apache-tvm-runtime==0.27.0.post1" in metadata
    assert "torch" not in metadata and "onnx>" not in metadata
    assert _records_match(runtime) == []


def test_the_tvm_runtime_wheel_leaves_out_the_compiler_library(wheels):
    _, _, tvm = wheels
    with zipfile.ZipFile(tvm) as archive:
        names = set(archive.namelist())
        metadata = archive.read("apache_tvm_runtime-0.27.0.post1.dist-info/METADATA").decode()
        size = sum(i.file_size for i in archive.infolist())
    assert "tvm/lib/libtvm_runtime.so" in names
    assert not any(n.startswith(TVM_COMPILER_ONLY) for n in names)
    assert any(n.endswith("licenses/LICENSE") for n in names)  # Apache-2.0 wants it kept
    assert "Name: apache-tvm-runtime" in metadata.splitlines()
    assert not any(line.startswith("Requires-Dist: torch") for line in metadata.splitlines())
    assert size < 40 * 2**20  # against ~300 MB for apache-tvm
    assert _records_match(tvm) == []


DEPLOYED = """
import sys
import numpy as np
import mmcompile
artifact, inputs, expected = sys.argv[1:]
model = mmcompile.load(artifact)
feeds, expected = dict(np.load(inputs)), dict(np.load(expected))
got = model.run(feeds)
for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)
import tvm
assert tvm.base._RUNTIME_ONLY, "the TVM runtime wheel loaded a compiler library"
for name in ("torch", "onnx", "networkx", "onnx_graphsurgeon"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise AssertionError(f"{name} is installed in the deployment environment")
try:
    mmcompile.compile
except ImportError as exc:
    assert "mmcompile-runtime install" in str(exc), exc
else:
    raise AssertionError("mmcompile.compile resolved in the runtime install")
print("RUNTIME INSTALL OK")
"""


def _installed_mib(site: Path) -> float:
    """Installed size without pip/setuptools and bytecode caches."""
    skip = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth")
    total = 0
    for path in site.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and \
                not path.relative_to(site).parts[0].split("-")[0] in skip:
            total += path.stat().st_size
    return total / 2**20


@pytest.mark.slow
def test_a_fresh_environment_with_the_runtime_wheels_runs_an_artifact(wheels, tmp_path):
    folder, _, _ = wheels
    graph = two_branch_graph()
    compiled = mmcompile.compile(graph, verify=False, schedule="parallel")
    artifact = compiled.save(tmp_path / "model.mmc")
    feeds = compiled.signature.random_inputs(seed=3)
    compiled.close()
    np.savez(tmp_path / "inputs.npz", **feeds)
    np.savez(tmp_path / "expected.npz", **run_onnxruntime(graph, feeds))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                              "--disable-pip-version-check", "--find-links", str(folder),
                              "mmcompile-runtime"], capture_output=True, text=True,
                             timeout=600, check=False)
    if install.returncode != 0:
        text = install.stdout + install.stderr
        if any(s in text for s in ("No matching distribution", "Could not find a version",
                                   "NewConnectionError", "Max retries exceeded")):
            pytest.skip(f"the package registry cannot be reached: {text.strip()[-200:]}")
        raise AssertionError(text)
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_USE_RUNTIME_LIB", "PYTHONPATH")}
    run = subprocess.run([str(python), "-c", DEPLOYED, str(artifact), str(tmp_path / "inputs.npz"),
                          str(tmp_path / "expected.npz")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == "RUNTIME INSTALL OK"
    site = next((venv / "lib").glob("python3*/site-packages"))
    # numpy alone is ~73 MiB of it; the full install (torch, TVM, onnx...) is over 1.5 GB
    assert _installed_mib(site) < 120, f"{_installed_mib(site):.0f} MiB"
