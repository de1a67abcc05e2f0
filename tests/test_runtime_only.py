"""Deployment without the compiler: artifacts load and run in a fresh process that uses TVM's
runtime-only library (``TVM_USE_RUNTIME_LIB=1``), where ``tvm.relax`` is unavailable, and a
process that loads and runs an artifact imports only what running needs."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_runtime import two_branch_graph

import mmcompile
from mmcompile.reference import run_onnxruntime

CHILD = """
import sys
import numpy as np
import tvm
assert tvm.base._RUNTIME_ONLY, "TVM_USE_RUNTIME_LIB=1 did not select the runtime library"
import mmcompile

artifact, inputs, expected = sys.argv[1:]
feeds, expected = dict(np.load(inputs)), dict(np.load(expected))
for schedule in (None, "sequential", "parallel"):  # as compiled, and both kinds
    model = mmcompile.load(artifact, schedule=schedule)
    assert len(model.stages) > 1
    got = model.run(feeds)
    assert sorted(got) == sorted(expected), sorted(got)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5,
                                   err_msg=f"{name} ({schedule})")
    model.close()
relax = sorted(m for m in sys.modules if m == "tvm.relax" or m.startswith("tvm.relax."))
assert not relax, f"loading and running imported {relax}"
try:
    import tvm.relax  # noqa: F401
except Exception:
    pass
else:
    raise AssertionError("tvm.relax is importable in runtime-only mode")
print("RUNTIME-ONLY OK")
"""


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """(folder, artifact, inputs.npz, expected.npz): onnxruntime's outputs are the expectation."""
    folder = tmp_path_factory.mktemp("deploy")
    graph = two_branch_graph()
    # "parallel": the artifact keeps its branch stages (auto may compile the graph whole)
    compiled = mmcompile.compile(graph, verify=False, schedule="parallel")
    path = compiled.save(folder / "model.mmc")
    compiled.close()
    feeds = compiled.signature.random_inputs(seed=5)
    np.savez(folder / "inputs.npz", **feeds)
    np.savez(folder / "expected.npz", **run_onnxruntime(graph, feeds))
    return folder, path, folder / "inputs.npz", folder / "expected.npz"


# What a deployed process must not import: the compiler side of mmcompile and its dependencies
# (torch alone costs ~2 s and ~200 MB: apache-tvm-ffi imports it whenever it is installed).
COMPILER_MODULES = ("torch", "onnx", "onnx_graphsurgeon", "onnxscript", "networkx", "tvm.relax",
                    "tvm.s_tir", "matplotlib", "mmcompile.compiler", "mmcompile.build",
                    "mmcompile.frontend", "mmcompile.ir", "mmcompile.transform", "mmcompile.passes",
                    "mmcompile.planning.plan", "mmcompile.quantize", "mmcompile.tune")

DEPLOYED = """
import sys
import numpy as np
import mmcompile

artifact, inputs, expected, forbidden = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
feeds, expected = dict(np.load(inputs)), dict(np.load(expected))
model = mmcompile.load(artifact)
for kind in ("numpy", "numpy again"):
    got = model.run(feeds)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5)
model.close()
model = mmcompile.load(artifact, schedule="sequential")  # a schedule override re-plans
model.run(feeds)
imported = sorted(m for m in sys.modules if sys.modules[m] is not None and any(
    m == f or m.startswith(f + ".") for f in forbidden))
print("IMPORTED", ",".join(imported))
import torch  # the caller turns to torch tensors after loading: DLPack still carries them
got = model.run({k: torch.from_numpy(v) for k, v in feeds.items()})
for name in expected:
    assert isinstance(got[name], torch.Tensor), type(got[name])
    np.testing.assert_allclose(got[name].numpy(), expected[name], rtol=1e-5, atol=1e-5)
print("DEPLOYED OK")
"""


@pytest.mark.parametrize("runtime_only", [False, True], ids=["full-tvm", "runtime-only-tvm"])
def test_a_deployed_process_imports_only_what_running_needs(deployed, runtime_only):
    folder, path, inputs, expected = deployed
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    if runtime_only:
        env["TVM_USE_RUNTIME_LIB"] = "1"
    # CPU stages run through tvm-ffi and TVM's runtime library: not even the tvm package is
    # imported (with its compiler library, ``import tvm`` imports tvm.relax and the rest)
    forbidden = (*COMPILER_MODULES, "tvm")
    proc = subprocess.run([sys.executable, "-c", DEPLOYED, str(path), str(inputs), str(expected),
                           *forbidden], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "DEPLOYED OK"
    imported = next(line for line in lines if line.startswith("IMPORTED")).split()[1:]
    assert not imported, f"a deployed process imported {imported}"


def _runtime_only(args, cwd):
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_load_and_run_with_runtime_only_tvm(deployed):
    folder, path, inputs, expected = deployed
    proc = _runtime_only([sys.executable, "-c", CHILD, str(path), str(inputs), str(expected)],
                         folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "RUNTIME-ONLY OK"


def test_cli_run_with_runtime_only_tvm(deployed):
    folder, path, inputs, expected = deployed
    script = Path(sys.executable).with_name("mmcompile")
    output = folder / "outputs.npz"
    proc = _runtime_only([str(script), "run", str(path), "--inputs", str(inputs), "--output",
                          str(output)], folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with np.load(output) as got, np.load(expected) as want:
        assert sorted(got.files) == sorted(want.files)
        for name in want.files:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
