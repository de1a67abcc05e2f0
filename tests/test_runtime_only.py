"""Deployment without the compiler: artifacts load and run in a fresh process that uses TVM's
runtime-only library (``TVM_USE_RUNTIME_LIB=1``), where ``tvm.relax`` is unavailable."""

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
