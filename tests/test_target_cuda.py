"""The cuda target: device code compiled at build time, on machines without a GPU too.

Compile-only tests need nvcc, a host C compiler and nm (skipped otherwise); the ``gpu`` test
runs the compiled model against onnxruntime and in a fresh runtime-only process.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import FLOAT, make_graph
from onnx import helper

import mmcompile
from mmcompile.reference import random_inputs, run_onnxruntime

cuda = pytest.importorskip("mmcompile.targets.tvm.cuda")

FATBIN_MAGIC = b"\x50\xed\x55\xba"


def _toolchain_missing() -> str | None:
    try:
        cuda.find_nvcc()
        cuda.find_c_compiler()
    except mmcompile.TargetError as exc:
        return str(exc)
    return None if shutil.which("nm") else "nm (binutils) not found"


needs_toolchain = pytest.mark.skipif(_toolchain_missing() is not None,
                                     reason=str(_toolchain_missing()))


def conv_matmul_layernorm_softmax(channels: int = 16, size: int = 16, dim: int = 64):
    """x[1,3,s,s] -> Conv -> [1, s*s, C] -> MatMul -> LayerNorm -> MatMul -> Softmax."""
    rng = np.random.default_rng(0)
    weights = {
        "wc": rng.standard_normal((channels, 3, 3, 3)).astype(np.float32) * 0.1,
        "bc": rng.standard_normal(channels).astype(np.float32) * 0.1,
        "shape": np.array([1, channels, size * size], np.int64),
        "w1": rng.standard_normal((channels, dim)).astype(np.float32) * 0.1,
        "gamma": np.ones(dim, np.float32), "beta": np.zeros(dim, np.float32),
        "w2": rng.standard_normal((dim, dim)).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "wc", "bc"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "w1"], ["m1"]),
        helper.make_node("LayerNormalization", ["m1", "gamma", "beta"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "w2"], ["m2"]),
        helper.make_node("Softmax", ["m2"], ["y"], axis=-1),
    ]
    return make_graph(nodes, [("x", FLOAT, [1, 3, size, size])],
                      [("y", FLOAT, [1, size * size, dim])], weights)


def softmax_only():
    return make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
                      [("x", FLOAT, [4, 32])], [("y", FLOAT, [4, 32])])


def fatbin_archs(blob: bytes) -> set[int]:
    """SM versions of the entries of the first fatbin in ``blob``.

    Layout as written by nvcc 12/13: a 16-byte header (magic, version, header size, payload
    size), then entries of (kind u16, version u16, header size u32, payload size u64, ...,
    arch u32 at offset 28).
    """
    start = blob.find(FATBIN_MAGIC)
    _, _, header, size = struct.unpack_from("<IHHQ", blob, start)
    archs, offset = set(), start + header
    while offset < start + header + size:
        _, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, offset)
        archs.add(struct.unpack_from("<I", blob, offset + 28)[0])
        offset += entry_header + payload
    return archs


@pytest.fixture(scope="module")
def graph():
    return conv_matmul_layernorm_softmax()


@pytest.fixture(scope="module")
def compiled(graph):
    return mmcompile.compile(graph, target="cuda", verify=False)


@pytest.fixture(scope="module")
def artifact(compiled, tmp_path_factory) -> Path:
    return compiled.save(tmp_path_factory.mktemp("cuda") / "model.mmc")


@needs_toolchain
def test_artifact_holds_device_code_not_source(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["target"] == "cuda"
    (stage,) = manifest["stages"]
    assert stage["info"]["arch"] == "sm_80"
    assert stage["info"]["device_code"] == "fatbin"
    assert '"arch":"sm_80"' in stage["info"]["tvm_target"]
    blob = (artifact / stage["files"]["library"]).read_bytes()
    assert FATBIN_MAGIC in blob
    assert fatbin_archs(blob) == {80}
    assert b"__global__" not in blob and b'extern "C"' not in blob


@needs_toolchain
def test_without_gpu_save_works_but_run_and_load_say_why(compiled, artifact, graph):
    if cuda.local_arch() is not None:
        pytest.skip("a CUDA device is present")
    assert mmcompile.get_target("cuda").why_not_runnable().startswith("no CUDA device here")
    # run() reports the stage's TargetError wrapped in the runtime's StageError
    with pytest.raises(mmcompile.MMCompileError, match=r"no CUDA device here.*sm_80"):
        compiled.run(random_inputs(graph, seed=0))
    with pytest.raises(mmcompile.TargetError, match=r"no CUDA device here.*sm_80"):
        mmcompile.load(artifact)


@needs_toolchain
def test_arch_option_and_errors_from_the_build(tmp_path):
    compiled = mmcompile.compile(softmax_only(), target="cuda", verify=False,
                                 target_config={"arch": "sm_86"})
    library = compiled.save(tmp_path / "m.mmc") / "main.so"
    assert fatbin_archs(library.read_bytes()) == {86}
    with pytest.raises(mmcompile.TargetError, match="bad arch 'compute_86'"):
        mmcompile.compile(softmax_only(), target="cuda", verify=False,
                          target_config={"arch": "compute_86"})


def test_missing_nvcc_is_an_error_not_source(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(cuda, "DEFAULT_CUDA_HOME", str(tmp_path))
    with pytest.raises(mmcompile.TargetError, match="nvcc not found"):
        mmcompile.compile(softmax_only(), target="cuda", verify=False)


def test_library_check_refuses_source_and_empty(tmp_path):
    source = tmp_path / "source.so"
    source.write_bytes(b'\x7fELF...extern "C" __global__ void __launch_bounds__(256) k() {}')
    with pytest.raises(mmcompile.TargetError, match="holds CUDA source"):
        cuda.device_code_format(source)
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"\x7fELF" + bytes(64))
    with pytest.raises(mmcompile.TargetError, match="no CUDA device code"):
        cuda.device_code_format(empty)


@pytest.mark.parametrize("arch, version, runs", [
    ("sm_80", "8.0", True), ("sm_80", "8.6", True), ("sm_86", "8.0", False),
    ("sm_80", "9.0", False), ("sm_90a", "9.0", True), ("sm_90a", "10.0", False)])
def test_which_gpus_run_an_arch(arch, version, runs):
    assert cuda._runs_on(arch, version) is runs


@pytest.mark.gpu
@needs_toolchain
def test_gpu_matches_onnxruntime_and_loads_runtime_only(graph, tmp_path):
    compiled = mmcompile.compile(graph, target="cuda", verify=True, tolerance=1e-4)
    assert compiled.metadata["verification"].startswith("ok")
    artifact = compiled.save(tmp_path / "model.mmc")
    inputs = random_inputs(graph, seed=1)
    expected = run_onnxruntime(graph, inputs)["y"]
    np.save(tmp_path / "x.npy", inputs["x"])
    script = textwrap.dedent(f"""
        import numpy as np, mmcompile, tvm
        assert tvm.base._RUNTIME_ONLY
        model = mmcompile.load({str(artifact)!r})
        np.save({str(tmp_path / "y.npy")!r}, model(x=np.load({str(tmp_path / "x.npy")!r})))
    """)
    subprocess.run([sys.executable, "-c", script], check=True,
                   env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"})
    got = np.load(tmp_path / "y.npy")
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
