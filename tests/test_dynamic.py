"""Dynamic dim ranges (``compile(..., dynamic=...)``, CLI ``--dynamic``): one artifact with a
static build per chosen size and a dispatcher that serves the whole range.

Every comparison is with onnxruntime on the model as given, within 1e-4 relative to
``max(1, max|ref|)`` (the default verification tolerance).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import FLOAT, INT64, assert_one_line_error, make_graph, run_cli
from onnx import helper

import mmcompile
from mmcompile.dynamic import (
    compile_dynamic,
    default_points,
    parse_dynamic,
    parse_dynamic_flags,
)
from mmcompile.dynamic_builds import pin
from mmcompile.profiles import plan_chunks
from mmcompile.reference import run_onnxruntime

TOLERANCE = 1e-4


def assert_matches(got, expected):
    assert sorted(got) == sorted(expected)
    for name, ref in expected.items():
        value = np.asarray(got[name])
        assert value.shape == ref.shape, name
        scale = max(1.0, float(np.abs(ref).max()))
        assert float(np.abs(value - ref).max()) <= TOLERANCE * scale, name


def rows(feeds, size, axes):
    """``feeds`` with the dim at ``axes`` (input -> axis) repeated cyclically to ``size``."""
    return {k: np.take(v, np.arange(size) % v.shape[axes[k]], axis=axes[k]) if k in axes else v
            for k, v in feeds.items()}


def token_graph(batch="batch", tokens="tokens"):
    """An image branch and a text branch whose token axis is averaged: rows along ``batch``
    are independent, positions along ``tokens`` are not (padding would change the mean)."""
    rng = np.random.default_rng(0)
    init = {"conv_w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "img_w": rng.standard_normal((4, 8)).astype(np.float32),
            "table": rng.standard_normal((10, 8)).astype(np.float32),
            "axes": np.array([1], np.int64),
            "head_w": rng.standard_normal((16, 5)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["pixel_values", "conv_w"], ["conv"], pads=[1] * 4),
        helper.make_node("Relu", ["conv"], ["conv_relu"]),
        helper.make_node("GlobalAveragePool", ["conv_relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "img_w"], ["image"]),
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
        helper.make_node("ReduceMean", ["embedded", "axes"], ["text"], keepdims=0),
        helper.make_node("Concat", ["image", "text"], ["fused"], axis=1),
        helper.make_node("MatMul", ["fused", "head_w"], ["logits"]),
    ]
    return make_graph(nodes, [("pixel_values", FLOAT, [batch, 3, 8, 8]),
                              ("input_ids", INT64, [batch, tokens])],
                      [("logits", FLOAT, [batch, 5])], init)


# -- declarations and the chunk planner (no compiling) ------------------------------------------

@pytest.mark.parametrize("spec, fragment", [
    ({"batch": (4, 1)}, "low 4 is above high 1"),
    ({"batch": (0, 8)}, "at least 1"),
    ({"batch": (1,)}, "must be (low, high)"),
    ({"batch": (1, 2.5)}, "must be (low, high)"),
    ({"batch": (2, 1, 8)}, "must lie in 2..8"),
    ({}, "dynamic must map"),
])
def test_bad_ranges_are_input_errors(spec, fragment):
    with pytest.raises(mmcompile.InputError, match=None) as info:
        parse_dynamic(spec)
    assert fragment in str(info.value)


def test_flags_parse_ranges_and_sizes():
    assert parse_dynamic_flags(["batch=1:32"]) == {"batch": (1, 32)}
    assert parse_dynamic_flags(["batch=1:8:32,sequence=1:512"]) == {
        "batch": (1, 8, 32), "sequence": (1, 512)}
    for bad in ("batch=1-32", "batch", "=1:2", "batch=1", "batch=a:b"):
        with pytest.raises(mmcompile.InputError, match="DIM=LOW:HIGH"):
            parse_dynamic_flags([bad])
    with pytest.raises(mmcompile.InputError, match="twice"):
        parse_dynamic_flags(["batch=1:2", "batch=1:4"])


def test_default_build_sizes():
    assert default_points(1, 32) == (1, 32)
    assert default_points(1, 3) == (1, 3)
    assert default_points(4, 4) == (4,)


def test_chunks_follow_the_costs():
    costs = {1: 1.0, 8: 4.0, 32: 14.0}
    assert plan_chunks(9, costs) == [(8, 8), (1, 1)]
    assert plan_chunks(7, costs) == [(8, 7)]  # one padded call beats seven
    assert plan_chunks(30, costs) == [(32, 30)]
    assert sum(r for _, r in plan_chunks(77, costs)) == 77


# -- a suite model with a dynamic batch ----------------------------------------------------------

@pytest.fixture(scope="module")
def av_mnist():
    """(graph with a symbolic batch, feeds at batch 2, model compiled for batch 1..3)."""
    from mmcompile.bench import suite
    module, inputs = suite.build("av_mnist", 2)
    graph = mmcompile.trace(module, inputs, suite.get("av_mnist").modalities,
                            dynamic_batch=True, name="av_mnist")
    feeds = {k: v.numpy() for k, v in inputs.items()}
    # sequential: the test is about dispatch, not about timing branch stages
    compiled = mmcompile.compile(graph, feeds, dynamic={"batch": (1, 3)}, schedule="sequential")
    return graph, feeds, compiled


def test_batch_range_matches_onnxruntime_at_every_size(av_mnist):
    graph, feeds, compiled = av_mnist
    (dim,) = compiled.dims
    assert (dim.name, dim.mode, dim.points) == ("batch", "split", (1, 3))
    assert [p.label for p in compiled.profiles] == ["batch=1", "batch=3"]
    assert "ok at 3 sizes" in compiled.metadata["verification"]
    axes = {"image": 0, "audio": 0}
    for size in (1, 2, 3):
        inputs = rows(feeds, size, axes)
        assert_matches(compiled.run(inputs), run_onnxruntime(graph, inputs))
    assert compiled.plan(rows(feeds, 3, axes)) == [("batch=3", 3)]
    assert sum(r for _, r in compiled.plan(feeds)) == 2
    report = compiled.report()
    assert "batch 1..3: builds at 1, 3" in report and "batch=3" in report


def test_repeated_shapes_go_straight_to_their_build(av_mnist, monkeypatch):
    graph, feeds, compiled = av_mnist
    inputs = rows(feeds, 3, {"image": 0, "audio": 0})
    build = next(p.model for p in compiled.profiles if p.sizes == {"batch": 3})
    direct = []
    run = build.run
    monkeypatch.setattr(build, "run", lambda f: direct.append(1) or run(f))
    compiled.run(inputs)  # (the first call of these shapes goes through the ranged signature)
    before = len(direct)
    got = compiled.run(inputs)
    assert len(direct) == before + 1
    assert_matches(got, run_onnxruntime(graph, inputs))
    # the build's own signature still checks what the shapes do not say
    with pytest.raises(mmcompile.InputError, match="'image'"):
        compiled.run({**inputs, "image": inputs["image"].astype(np.int32)})
    assert len(direct) == before + 2
    compiled.run(rows(feeds, 2, {"image": 0, "audio": 0}))  # split: not a build's shapes
    assert len(direct) == before + 2


def test_torch_tensors_in_torch_tensors_out(av_mnist):
    import torch
    graph, feeds, compiled = av_mnist
    got = compiled(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    assert isinstance(got, torch.Tensor)
    assert_matches({"out": got.numpy()},
                   {"out": next(iter(run_onnxruntime(graph, feeds).values()))})


def test_outside_the_range_is_a_clear_error(av_mnist):
    _, feeds, compiled = av_mnist
    with pytest.raises(mmcompile.InputError) as info:
        compiled.run(rows(feeds, 4, {"image": 0, "audio": 0}))
    message = str(info.value)
    assert "input 'image' has batch = 4" in message and "range 1..3" in message


def test_artifact_round_trip_dispatches(av_mnist, tmp_path):
    graph, feeds, compiled = av_mnist
    path = compiled.save(tmp_path / "dyn.mmc")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert [p["sizes"] for p in manifest["profiles"]] == [{"batch": 1}, {"batch": 3}]
    loaded = mmcompile.load(path)
    assert type(loaded).__name__ == "ProfiledModel"
    for size in (1, 2):
        inputs = rows(feeds, size, {"image": 0, "audio": 0})
        assert_matches(loaded.run(inputs), run_onnxruntime(graph, inputs))
    with pytest.raises(mmcompile.InputError, match="range 1..3"):
        loaded.run(rows(feeds, 5, {"image": 0, "audio": 0}))
    # A deployed process: TVM's runtime-only library, no compiler imported.
    np.savez(tmp_path / "in.npz", **feeds)
    child = ("import sys, numpy as np, mmcompile\n"
             "model = mmcompile.load(sys.argv[1])\n"
             "out = model.run(dict(np.load(sys.argv[2])))\n"
             "heavy = sorted(m for m in ('onnx', 'torch', 'tvm.relax', 'onnxruntime') "
             "if m in sys.modules)\n"
             "assert not heavy, heavy\n"
             "print('shape', list(next(iter(out.values())).shape))\n")
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    done = subprocess.run([sys.executable, "-c", child, str(path), str(tmp_path / "in.npz")],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "shape [2," in done.stdout


# -- a dim that cannot be padded -----------------------------------------------------------------

def test_dim_mixed_by_a_mean_gets_exact_builds_and_a_symbolic_one():
    graph = token_graph()
    rng = np.random.default_rng(1)
    feeds = {"pixel_values": rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
             "input_ids": rng.integers(0, 10, (1, 4)).astype(np.int64)}
    # One worker process, whatever the machine's load: the symbolic build is compiled there.
    options = {"target": "cpu", "schedule": "sequential"}
    compiled = compile_dynamic(graph, feeds, {"tokens": (2, 4, 6)}, options=options, workers=1)
    assert compiled.metadata["workers"] == 1
    (dim,) = compiled.dims
    assert (dim.mode, dim.points, dim.symbolic) == ("exact", (2, 4, 6), True)
    assert "no axis that follows the dim" in dim.reason  # logits [batch, 5] has no tokens
    assert [p.label for p in compiled.profiles] == ["tokens=2", "tokens=4", "tokens=6",
                                                    "tokens=*"]
    for size, build in ((2, "tokens=2"), (3, "tokens=*"), (4, "tokens=4"), (5, "tokens=*"),
                        (6, "tokens=6")):
        inputs = rows(feeds, size, {"input_ids": 1})
        assert compiled.plan(inputs) == [(build, 0)]
        assert_matches(compiled.run(inputs), run_onnxruntime(graph, inputs))
    with pytest.raises(mmcompile.InputError, match="tokens = 7"):
        compiled.run(rows(feeds, 7, {"input_ids": 1}))


def test_pinning_keeps_the_exporters_symbols_and_sizes_the_pinned_ones():
    # a Reshape to a computed shape: shape inference alone names its dims afresh (unk__N)
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Reshape", ["x", "shape"], ["y"]),
             helper.make_node("ReduceSum", ["y", "axes"], ["z"], keepdims=0)]
    g = make_graph(nodes, [("x", FLOAT, ["batch", "tokens"])], [("z", FLOAT, ["batch"])],
                   {"axes": np.array([1], np.int64)})
    model = g.to_onnx()
    model.graph.value_info.append(helper.make_tensor_value_info("y", FLOAT,
                                                                ["batch", "tokens"]))

    def dims(m, name):
        info = next(v for v in [*m.graph.value_info, *m.graph.output] if v.name == name)
        return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]

    assert dims(pin(model, {}), "y") == ["batch", "tokens"]
    pinned = pin(model, {"x": {1: 5}})
    assert dims(pinned, "y") == ["batch", 5] and dims(pinned, "z") == ["batch"]
    assert dims(pin(model, {"x": {0: 3}}), "z") == [3]


def test_clip_over_a_batch_range_builds_the_ends_and_a_symbolic_rest():
    # CLIP's logits compare every image with every text: rows are not independent. Its
    # end-of-text pooling (x[arange(n), argmax(ids)]) once failed TVM's importer in the
    # symbolic build.
    from mmcompile.bench import suite
    module, inputs = suite.build("clip", 1)
    graph = mmcompile.trace(module, inputs, suite.get("clip").modalities, dynamic_batch=True,
                            name="clip")
    feeds = {k: v.numpy() for k, v in inputs.items()}
    compiled = mmcompile.compile(graph, feeds, dynamic={"batch": (1, 3)}, schedule="sequential")
    (dim,) = compiled.dims
    assert (dim.mode, dim.points) == ("exact", (1, 3))
    assert [p.label for p in compiled.profiles] == ["batch=1", "batch=3", "batch=*"]
    axes = {name: 0 for name in feeds}
    for size, build in ((1, "batch=1"), (2, "batch=*"), (3, "batch=3")):
        sized = rows(feeds, size, axes)
        assert compiled.plan(sized) == [(build, 0)]
        assert_matches(compiled.run(sized), run_onnxruntime(graph, sized))


def test_unknown_dim_and_example_outside_range():
    graph = token_graph(batch=1)
    feeds = {"pixel_values": np.zeros((1, 3, 8, 8), np.float32),
             "input_ids": np.zeros((1, 4), np.int64)}
    with pytest.raises(mmcompile.InputError, match="no input of test has a dim of that name; "
                                                   "its named symbolic dims: 'tokens'"):
        mmcompile.compile(graph, feeds, dynamic={"batch": (1, 4)})
    with pytest.raises(mmcompile.InputError, match="has tokens = 4, outside the declared "
                                                   "range 1..3"):
        mmcompile.compile(graph, feeds, dynamic={"tokens": (1, 3)})


# -- the command line -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dynamic_cli")
    path = folder / "tokens.onnx"
    token_graph(tokens=4).save(path)
    return folder, path


def test_cli_compile_inspect_run(cli_model, capsys):
    folder, path = cli_model
    artifact = folder / "dyn.mmc"
    code, out, err = run_cli(capsys, "compile", path, "-o", artifact, "--dynamic", "batch=1:3")
    assert code == 0, err
    assert "dynamic: 2 builds" in out and "batch 1..3: builds at 1, 3" in out
    code, out, err = run_cli(capsys, "inspect", artifact)
    assert code == 0, err
    assert "dynamic dims" in out and "batch=3" in out
    code, out, err = run_cli(capsys, "run", artifact, "--random", "--json")
    assert code == 0, err
    assert json.loads(out)["outputs"]["logits"]["shape"] == [1, 5]


@pytest.mark.parametrize("flag, fragment", [
    ("batch=1-3", "expected DIM=LOW:HIGH"),
    ("batch=3:1", "low 3 is above high 1"),
    ("sequence=1:8", "no input of tokens.onnx has a dim of that name"),
])
def test_cli_dynamic_errors_exit_1(cli_model, capsys, flag, fragment):
    folder, path = cli_model
    code, _, err = run_cli(capsys, "compile", path, "-o", folder / "bad.mmc", "--dynamic", flag)
    assert code == 1
    assert_one_line_error(err, fragment)
    assert not (folder / "bad.mmc").exists()
