"""``mmcompile.compile`` and CompiledModel on the cpu target: calling conventions, input checks
before native code, thread safety, verification and the errors compile raises.

The small two-branch model here is also used by the artifact, runtime-only and CLI tests.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers import FLOAT, INT64, make_graph
from mmcompile.targets.tvm.executable import TVMExecutable
from onnx import helper

import mmcompile
from mmcompile.build import verify_compiled
from mmcompile.errors import InputError, UnsupportedOpError, VerificationError
from mmcompile.reference import run_onnxruntime
from mmcompile.planning.parallel import replan
from mmcompile.target import TargetError

VOCAB = 10
OUTPUTS = ["logits", "features"]


def two_branch_graph(batch: int | str = 1) -> mmcompile.Graph:
    """Image branch (Conv+Relu+GlobalAveragePool+Gemm on ``pixel_values`` [B,3,8,8]) and text
    branch (Gather of int64 ``input_ids`` [B,4] from a constant [10,8] table, mean over tokens),
    concatenated; outputs ``logits`` (a Gemm, [B,5]) and ``features`` (Relu of the concat,
    [B,16])."""
    rng = np.random.default_rng(0)

    def weight(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    init = {"conv_w": weight(4, 3, 3, 3), "conv_b": weight(4), "img_w": weight(4, 8),
            "img_b": weight(8), "table": weight(VOCAB, 8), "axes": np.array([1], np.int64),
            "head_w": weight(16, 5), "head_b": weight(5)}
    nodes = [
        helper.make_node("Conv", ["pixel_values", "conv_w", "conv_b"], ["conv"], pads=[1] * 4),
        helper.make_node("Relu", ["conv"], ["conv_relu"]),
        helper.make_node("GlobalAveragePool", ["conv_relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "img_w", "img_b"], ["image"]),
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
        helper.make_node("ReduceMean", ["embedded", "axes"], ["text"], keepdims=0),
        helper.make_node("Concat", ["image", "text"], ["fused"], axis=1),
        helper.make_node("Gemm", ["fused", "head_w", "head_b"], ["logits"]),
        helper.make_node("Relu", ["fused"], ["features"]),
    ]
    return make_graph(nodes, [("pixel_values", FLOAT, [batch, 3, 8, 8]),
                              ("input_ids", INT64, [batch, 4])],
                      [("logits", FLOAT, [batch, 5]), ("features", FLOAT, [batch, 16])], init)


def one_output_graph() -> mmcompile.Graph:
    """``y = sigmoid(x * w)`` on x [2,3]."""
    nodes = [helper.make_node("Mul", ["x", "w"], ["xw"]),
             helper.make_node("Sigmoid", ["xw"], ["y"])]
    return make_graph(nodes, [("x", FLOAT, [2, 3])], [("y", FLOAT, [2, 3])],
                      {"w": np.linspace(-2, 2, 3, dtype=np.float32)})


def assert_close(got, expected):
    """Compiled vs onnxruntime: within 1e-5 (absolute, plus 1e-5 relative to the value)."""
    for name in expected:
        np.testing.assert_allclose(np.asarray(got[name]), expected[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)


@pytest.fixture(scope="module")
def graph():
    return two_branch_graph()


@pytest.fixture(scope="module")
def compiled(graph):
    # verify=True on random inputs; "parallel" keeps the branches as stages ("auto" may
    # choose the whole graph as one stage)
    model = mmcompile.compile(graph, schedule="parallel")
    yield model
    model.close()


@pytest.fixture(params=["sequential", "parallel"])
def scheduled(request, compiled):
    """The compiled model with its stages run one after another, or the modality branches on
    worker threads."""
    original = compiled.schedule
    compiled.schedule = replan(compiled, request.param)
    assert compiled.schedule.kind == request.param
    yield compiled
    compiled.schedule = original


@pytest.fixture(scope="module")
def single():
    return mmcompile.compile(one_output_graph(), example_inputs=(torch.randn(2, 3),))


@pytest.fixture(scope="module")
def feeds(compiled):
    return compiled.signature.random_inputs(seed=1)


@pytest.fixture(scope="module")
def expected(graph, feeds):
    return run_onnxruntime(graph, feeds)


def test_branches_are_compiled_as_stages(compiled):
    """The image and text branches and the fusion are separate stages (the parallel schedule
    tests below rely on it)."""
    assert len(compiled.stages) == 3
    image = next(s for s in compiled.stages if s.inputs == ["pixel_values"])
    text = next(s for s in compiled.stages if s.inputs == ["input_ids"])
    fusion = compiled.stages[-1]
    assert sorted(fusion.depends_on) == sorted([image.name, text.name])
    assert sorted(fusion.outputs) == sorted(OUTPUTS)


def test_numpy_in_numpy_out_matches_onnxruntime(scheduled, feeds, expected):
    logits, features = scheduled(**feeds)
    assert isinstance(logits, np.ndarray) and isinstance(features, np.ndarray)
    assert (logits.shape, logits.dtype) == ((1, 5), np.float32)
    assert_close({"logits": logits, "features": features}, expected)


def test_torch_in_torch_out_matches_onnxruntime(scheduled, feeds, expected):
    outputs = scheduled(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    assert all(isinstance(o, torch.Tensor) and o.dtype == torch.float32 for o in outputs)
    assert_close(dict(zip(OUTPUTS, (o.numpy() for o in outputs))), expected)


def test_torch_int32_ids_are_cast(compiled, feeds, expected):
    logits, _ = compiled(torch.from_numpy(feeds["pixel_values"]),
                         torch.from_numpy(feeds["input_ids"]).int())
    assert_close({"logits": logits.numpy()}, {"logits": expected["logits"]})


def test_positional_and_mixed_calls(compiled, feeds, expected):
    pixels, ids = feeds["pixel_values"], feeds["input_ids"]
    assert_close(dict(zip(OUTPUTS, compiled(pixels, ids))), expected)
    assert_close(dict(zip(OUTPUTS, compiled(pixels, input_ids=ids))), expected)
    with pytest.raises(InputError, match="3 positional inputs given, the model takes 2"):
        compiled(pixels, ids, ids)


def test_single_output_is_an_array_and_several_a_tuple(compiled, single, feeds):
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    y = single(x)
    assert isinstance(y, np.ndarray) and y.shape == (2, 3)
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-x * np.linspace(-2, 2, 3))), rtol=1e-5)
    outputs = compiled(**feeds)
    assert isinstance(outputs, tuple) and len(outputs) == 2
    assert compiled.output_names == OUTPUTS
    assert [o.shape for o in outputs] == [(1, 5), (1, 16)]


def test_run_returns_dict_by_output_name(compiled, feeds, expected):
    result = compiled.run(feeds)
    assert list(result) == OUTPUTS
    assert_close(result, expected)


def test_outputs_of_earlier_calls_are_not_overwritten(compiled, feeds):
    first = compiled(**feeds)[0]
    kept = first.copy()
    compiled(**compiled.signature.random_inputs(seed=7))
    np.testing.assert_array_equal(first, kept)


@pytest.mark.parametrize("bad", [VOCAB, -1, 2**40])
def test_out_of_range_token_id_is_refused_before_native_code(compiled, feeds, expected,
                                                             monkeypatch, bad):
    calls = []
    monkeypatch.setattr(TVMExecutable, "run", lambda self, inputs: calls.append(inputs))
    ids = feeds["input_ids"].copy()
    ids[0, 2] = bad
    with pytest.raises(InputError) as info:
        compiled(pixel_values=feeds["pixel_values"], input_ids=ids)
    assert "'input_ids'" in str(info.value) and f"[0, {VOCAB})" in str(info.value)
    assert calls == []
    monkeypatch.undo()
    assert_close(compiled.run(feeds), expected)  # still usable afterwards


def test_report_lists_target_stage_passes_and_verification(compiled):
    report = compiled.report()
    lines = report.splitlines()
    assert lines[0] == "target: cpu"
    assert lines[1].startswith("passes: ") and "fold-constants" in lines[1]
    for stage in compiled.stages:
        assert any(line.split()[:2] == [stage.name, "cpu"] for line in lines)
    assert any(line.startswith("schedule: ") for line in lines)
    assert lines[-1].startswith("verification: ok")


def test_unaligned_inputs_give_correct_results(scheduled, feeds, expected):
    compiled = scheduled
    size = feeds["pixel_values"].size
    buffer = np.empty(size + 1, np.float32)
    pixels = buffer[1:].reshape(feeds["pixel_values"].shape)  # a view 4 bytes into the buffer
    pixels[...] = feeds["pixel_values"]
    assert pixels.ctypes.data % 64 != 0 and pixels.flags.c_contiguous
    assert_close(compiled.run({"pixel_values": pixels, "input_ids": feeds["input_ids"]}),
                 expected)
    tensor = torch.empty(size + 1)[1:].view(feeds["pixel_values"].shape)
    tensor.copy_(torch.from_numpy(feeds["pixel_values"]))
    assert tensor.data_ptr() % 64 != 0
    result = compiled.run({"pixel_values": tensor,
                           "input_ids": torch.from_numpy(feeds["input_ids"])})
    assert_close({k: v.numpy() for k, v in result.items()}, expected)


def _read_only(value, aligned):
    """A read-only copy of ``value`` whose data is (or is not) 64-byte aligned."""
    buffer = np.empty(value.size + 64, value.dtype)
    start = (-buffer.ctypes.data % 64) // value.itemsize + (0 if aligned else 1)
    copy = buffer[start:start + value.size].reshape(value.shape)
    copy[...] = value
    copy.flags.writeable = False
    assert (copy.ctypes.data % 64 == 0) == aligned
    return copy


@pytest.mark.parametrize("aligned", [False, True])
def test_read_only_inputs(compiled, feeds, expected, aligned):
    frozen = {k: _read_only(v, aligned) for k, v in feeds.items()}
    assert_close(compiled.run(frozen), expected)


def test_memory_mapped_inputs(compiled, feeds, expected, tmp_path):
    mapped = {}
    for name, value in feeds.items():
        np.save(tmp_path / f"{name}.npy", value)
        mapped[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")  # read-only, aligned
    assert_close(compiled.run(mapped), expected)


def test_concurrent_calls_from_four_threads(graph, scheduled):
    compiled = scheduled
    cases = [compiled.signature.random_inputs(seed=100 + i) for i in range(4)]
    references = [run_onnxruntime(graph, case) for case in cases]
    start = threading.Barrier(4)

    def worker(i):
        start.wait()
        results = [compiled.run(cases[i]) for _ in range(20)]
        return [{k: np.array(v) for k, v in r.items()} for r in results]

    with ThreadPoolExecutor(4) as pool:
        per_thread = list(pool.map(worker, range(4)))
    for results, reference in zip(per_thread, references):
        assert len(results) == 20
        for result in results:
            assert_close(result, reference)


def test_compile_with_verify_records_verification(compiled, single):
    for model in (compiled, single):  # random inputs, and torch example inputs
        assert model.metadata["verification"].startswith("ok, max abs err ")
        assert "vs onnxruntime" in model.metadata["verification"]
    assert "over 2 output(s)" in compiled.metadata["verification"]


def test_verification_failure_names_each_output_and_its_error(graph, compiled, feeds,
                                                              monkeypatch):
    real_run = TVMExecutable.run

    def perturbed(self, inputs):
        out = {k: np.from_dlpack(v) for k, v in real_run(self, inputs).items()}
        if "logits" in out:
            out["logits"] = out["logits"] + np.float32(0.5)
        return out

    monkeypatch.setattr(TVMExecutable, "run", perturbed)
    with pytest.raises(VerificationError) as info:
        verify_compiled(compiled, graph, feeds, tolerance=1e-4)
    lines = str(info.value).splitlines()
    assert "tolerance 0.0001" in lines[0]
    assert len(lines) == 3
    logits = next(line.strip() for line in lines if line.strip().startswith("logits:"))
    features = next(line.strip() for line in lines if line.strip().startswith("features:"))
    assert float(logits.split("max abs err ")[1].split()[0]) == pytest.approx(0.5, abs=1e-3)
    assert float(features.split("max abs err ")[1].split()[0]) < 1e-4


def test_compile_raises_verification_error(monkeypatch):
    real_run = TVMExecutable.run

    def perturbed(self, inputs):
        return {k: np.from_dlpack(v) * np.float32(1.01) + np.float32(0.1)
                for k, v in real_run(self, inputs).items()}

    monkeypatch.setattr(TVMExecutable, "run", perturbed)
    with pytest.raises(VerificationError, match=r"y: max abs err 0\.1\d* at \[\d+, \d+\]"):
        mmcompile.compile(one_output_graph())


def test_op_without_tvm_converter_is_unsupported_without_a_fallback():
    from tvm.relax.frontend.onnx import onnx_frontend
    assert "Det" not in onnx_frontend._get_convert_map()
    graph = make_graph([helper.make_node("Det", ["x"], ["d"], name="det0")],
                       [("x", FLOAT, [2, 3, 3])], [("d", FLOAT, [2])])
    with pytest.raises(UnsupportedOpError) as info:
        mmcompile.compile(graph, fallback=None)
    error = info.value
    assert (error.op_type, error.node) == ("Det", "det0")
    assert "target 'cpu'" in error.rejected_by
    assert "'Det'" in str(error) and "'det0'" in str(error) and "no converter for Det" in str(error)
    assert "no fallback target" in str(error)
    # the default: onnxruntime runs it, and the report says so
    compiled = mmcompile.compile(graph)
    assert [s.target for s in compiled.stages] == ["onnxruntime"]
    assert "det0: cpu: TVM" in compiled.report()


def test_unknown_target_lists_known_targets(graph):
    with pytest.raises(TargetError, match=r"unknown target 'tpu'; known targets: .*cpu.*cuda"):
        mmcompile.compile(graph, target="tpu")


@pytest.mark.parametrize("dtype", ["float32", "int64", "bool"])
def test_unaligned_buffers_are_copied_to_aligned_ones(dtype):
    from mmcompile.targets.tvm.executable import to_tvm
    source = np.arange(1, 1 + 7 * 9).reshape(7, 9).astype(dtype)
    view = _unaligned(source)
    tensor = to_tvm(view)
    view[...] = 0  # a copy, not a view of the caller's memory
    assert np.array_equal(tensor.numpy(), source)
    assert np.from_dlpack(tensor).ctypes.data % 64 == 0


def _unaligned(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` whose data is not 64-byte aligned (as numpy's often is not)."""
    buffer = np.empty(array.size + 1, array.dtype)
    view = buffer[1:].reshape(array.shape)
    view[...] = array
    assert view.ctypes.data % 64 != 0
    return view


def test_unaligned_inputs_reuse_a_staging_buffer_and_outputs_never_share_it():
    # y = sigmoid(x); r = reshape(x): the VM's reshape is a view of its input, here of the
    # staging buffer an unaligned x is copied into, which the next call overwrites.
    nodes = [helper.make_node("Sigmoid", ["x"], ["y"]),
             helper.make_node("Reshape", ["x", "shape"], ["r"])]
    graph = make_graph(nodes, [("x", FLOAT, [4, 6])], [("y", FLOAT, [4, 6]), ("r", FLOAT, [6, 4])],
                       {"shape": np.array([6, 4], np.int64)})
    compiled = mmcompile.compile(graph, verify=False)
    rng = np.random.default_rng(0)
    first, second = (rng.standard_normal((4, 6)).astype(np.float32) for _ in range(2))
    out1 = compiled.run({"x": _unaligned(first)})
    executable = compiled.stages[0].executable
    staging = executable._staging[0]
    assert staging is not None  # the unaligned input went through the staging buffer
    out2 = compiled.run({"x": _unaligned(second)})
    assert executable._staging[0] is staging  # reused, not reallocated per call
    for out, x in ((out1, first), (out2, second)):
        np.testing.assert_array_equal(out["r"], x.reshape(6, 4))
        np.testing.assert_allclose(out["y"], 1 / (1 + np.exp(-x)), rtol=1e-6, atol=1e-6)
    # an aligned input is passed without a copy and leaves the staging buffer alone
    aligned = np.empty(4 * 6 + 16, np.float32)
    aligned = aligned[(-aligned.ctypes.data % 64) // 4:][:24].reshape(4, 6)
    aligned[...] = first
    np.testing.assert_array_equal(compiled.run({"x": aligned})["r"], first.reshape(6, 4))
    np.testing.assert_array_equal(executable._staging[0][0], second)
    # read-only and strided arrays (which DLPack cannot hand over) are staged too
    frozen = first.copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(compiled.run({"x": frozen})["r"], first.reshape(6, 4))
    strided = np.repeat(second, 2, axis=1)[:, ::2]
    np.testing.assert_array_equal(np.asarray(executable.run({"x": strided})["r"]),
                                  second.reshape(6, 4))


def test_a_failing_single_stage_is_reported_like_any_stage(monkeypatch):
    from mmcompile.executor import StageError
    compiled = mmcompile.compile(one_output_graph(), verify=False)
    (stage,) = compiled.stages
    feeds = {"x": np.ones((2, 3), np.float32)}
    expected = compiled.run(feeds)["y"]

    def boom(inputs):
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(stage.executable, "run", boom)
        with pytest.raises(StageError, match=rf"^stage '{stage.name}' failed: RuntimeError: boom$"):
            compiled.run(feeds)
    np.testing.assert_array_equal(compiled.run(feeds)["y"], expected)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two allowed cores")
def test_a_call_moves_its_thread_off_a_core_a_pool_thread_is_pinned_to():
    # TVM pins its pool threads, not the caller; after idle spells Linux woke the caller on
    # the pool thread's core and left both there (every parallel kernel ran its halves in
    # turn). A pinned thread stands in for TVM's pool thread; the caller is put on its core.
    from mmcompile.targets.tvm import executable
    if executable._sched_getcpu() is None:
        pytest.skip("no sched_getcpu in this libc")
    allowed = os.sched_getaffinity(0)
    core = max(allowed)
    ready, done = threading.Event(), threading.Event()

    def pool_thread():
        os.sched_setaffinity(0, {core})
        ready.set()
        done.wait(30)

    found = {}

    def caller():  # a fresh thread: its own placement state
        ready.wait(30)
        executable.keep_off_pinned_cores()  # first call: the pool starts, nothing checked
        found["pinned"] = executable.pinned_threads_cpus()
        os.sched_setaffinity(0, {core})  # on the pinned core, as Linux left it
        os.sched_setaffinity(0, allowed)
        found["before"] = executable._sched_getcpu()()
        executable.keep_off_pinned_cores()
        found["after"] = executable._sched_getcpu()()
        found["affinity"] = os.sched_getaffinity(0)

    helper = threading.Thread(target=pool_thread)
    helper.start()
    try:
        worker = threading.Thread(target=caller)
        worker.start()
        worker.join(30)
    finally:
        done.set()
        helper.join(30)
    assert core in found["pinned"]
    assert found["before"] == core
    assert found["after"] != core and found["after"] in allowed
    assert found["affinity"] == allowed  # moved, and its own affinity given back


def test_the_placement_check_gives_up_quietly_where_the_os_refuses(monkeypatch):
    # a container may forbid changing affinity: the call runs where it is, once warned by
    # the refusal it stops trying
    from mmcompile.targets.tvm import executable
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and two allowed cores")
    core = min(os.sched_getaffinity(0))

    def refuse(*_args):
        raise PermissionError("not permitted")
    found = {}

    def caller():
        executable._PLACEMENT.pinned = frozenset({core})  # on a pinned core, as it reads
        executable._PLACEMENT.runs = 2
        executable.keep_off_pinned_cores()
        found["pinned"] = executable._PLACEMENT.pinned
    monkeypatch.setattr(executable, "_sched_getcpu", lambda: (lambda: core))
    monkeypatch.setattr(executable.os, "sched_setaffinity", refuse)
    worker = threading.Thread(target=caller)
    worker.start()
    worker.join(30)
    assert found["pinned"] == frozenset()


def test_configure_threads_leaves_the_users_thread_settings(monkeypatch):
    from mmcompile.targets.tvm.executable import configure_threads
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    monkeypatch.setenv("TVM_THREAD_POOL_SPIN_COUNT", "5")
    configure_threads(2)
    assert os.environ["TVM_NUM_THREADS"] == "1"
    assert os.environ["TVM_THREAD_POOL_SPIN_COUNT"] == "5"
