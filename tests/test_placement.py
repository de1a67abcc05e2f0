"""Heterogeneous plans: placement node by node, stages cut by (branch, target) and merged while
acyclic, the onnxruntime fallback target, mixed-target artifacts, typed target options."""

from __future__ import annotations

import json
import subprocess
import sys

import networkx as nx
import numpy as np
import pytest
from helpers import FLOAT, assert_one_line_error, make_graph, run_cli
from onnx import TensorProto, helper

import mmcompile
from mmcompile.artifact import ArtifactError
from mmcompile.errors import UnsupportedOpError
from mmcompile.planning import plan
from mmcompile.planning.partition import group_nodes
from mmcompile.reference import random_inputs, run_onnxruntime
from mmcompile.target import TargetError, get_target, parse_target_spec

IMAGE = ("pixel_values", FLOAT, [1, 8])
TEXT = ("input_features", FLOAT, [1, 8])


def two_branches():
    """image: relu -> neg -> abs; text: sigmoid; fusion: add -> mul(2) -> tanh."""
    nodes = [
        helper.make_node("Relu", ["pixel_values"], ["i1"], name="img_relu"),
        helper.make_node("Neg", ["i1"], ["i2"], name="img_neg"),
        helper.make_node("Abs", ["i2"], ["img_feat"], name="img_abs"),
        helper.make_node("Sigmoid", ["input_features"], ["txt_feat"], name="txt_sigmoid"),
        helper.make_node("Add", ["img_feat", "txt_feat"], ["f1"], name="fuse_add"),
        helper.make_node("Mul", ["f1", "two"], ["f2"], name="fuse_mul"),
        helper.make_node("Tanh", ["f2"], ["out"], name="fuse_tanh"),
    ]
    return make_graph(nodes, [IMAGE, TEXT], [("out", FLOAT, [1, 8])],
                      {"two": np.full([1, 8], 2.0, np.float32)},
                      modalities={"pixel_values": "image", "input_features": "text"})


def two_towers():
    """Two independent towers over one image input (sub-branches image.0 / image.1)."""
    nodes = [
        helper.make_node("Relu", ["pixel_values"], ["a1"], name="a_relu"),
        helper.make_node("Exp", ["a1"], ["a2"], name="a_exp"),
        helper.make_node("Neg", ["pixel_values"], ["b1"], name="b_neg"),
        helper.make_node("Sigmoid", ["b1"], ["b2"], name="b_sigmoid"),
    ]
    return make_graph(nodes, [IMAGE], [("a2", FLOAT, [1, 8]), ("b2", FLOAT, [1, 8])],
                      modalities={"pixel_values": "image"})


def _stages(p):
    return [(s.name, s.target, sorted(s.nodes)) for s in p]


def _assert_acyclic_and_ordered(stages):
    dag = nx.DiGraph()
    seen = set()
    for stage in stages:
        assert set(stage.depends_on) <= seen, f"{stage.name} runs before its inputs"
        seen.add(stage.name)
        dag.add_edges_from((d, stage.name) for d in stage.depends_on)
    assert nx.is_directed_acyclic_graph(dag)


def _matches_single_target(graph, **kwargs):
    """Compiled with the placement in ``kwargs``, outputs equal the cpu-only build's (and
    onnxruntime's within 1e-6)."""
    feeds = random_inputs(graph, seed=1)
    mixed = mmcompile.compile(graph, feeds, verify=True, tolerance=1e-5, **kwargs)
    single = mmcompile.compile(graph, feeds, verify=False, schedule=kwargs.get("schedule",
                                                                                "auto"))
    for name, value in single.run(feeds).items():
        np.testing.assert_allclose(mixed.run(feeds)[name], value, rtol=1e-6, atol=1e-6)
    return mixed


# -- placement and partition on hand-built graphs --------------------------------------------

def test_fallback_in_the_middle_of_a_branch_cuts_it_in_three():
    p = plan(two_branches(), placement={"img_neg": "onnxruntime"}, schedule="parallel")
    assert _stages(p.whole) == [
        ("main", "cpu", ["img_relu", "txt_sigmoid"]),
        ("main@onnxruntime", "onnxruntime", ["img_neg"]),
        ("main-2", "cpu", ["fuse_add", "fuse_mul", "fuse_tanh", "img_abs"]),
    ]
    assert _stages(p.staged) == [
        ("image", "cpu", ["img_relu"]),
        ("image@onnxruntime", "onnxruntime", ["img_neg"]),
        ("image-2", "cpu", ["img_abs"]),
        ("text", "cpu", ["txt_sigmoid"]),
        ("fusion", "cpu", ["fuse_add", "fuse_mul", "fuse_tanh"]),
    ]
    for stages in (p.whole, p.staged):
        _assert_acyclic_and_ordered(stages)
    assert p.placement.placed_by_user == {"img_neg": "img_neg"}


def test_fallback_at_the_fusion_point():
    p = plan(two_branches(), placement={"fuse_add": "onnxruntime"}, schedule="sequential")
    assert _stages(p.whole) == [
        ("main", "cpu", ["img_abs", "img_neg", "img_relu", "txt_sigmoid"]),
        ("main@onnxruntime", "onnxruntime", ["fuse_add"]),
        ("main-2", "cpu", ["fuse_mul", "fuse_tanh"]),
    ]
    assert p.staged is p.whole  # sequential: no branch stages
    assert p.whole[1].inputs == ["img_feat", "txt_feat"] and p.whole[1].outputs == ["f1"]


def test_fallback_inside_a_sub_branch_keeps_the_other_tower_whole():
    p = plan(two_towers(), placement={"b_sigmoid": "onnxruntime"}, schedule="parallel")
    names = [s.name for s in p.staged]
    assert "image.0" in names and "image.1" in names and "image.1@onnxruntime" in names
    tower = next(s for s in p.staged if s.name == "image.0")
    assert sorted(tower.nodes) == ["a_exp", "a_relu"]
    _assert_acyclic_and_ordered(p.staged)


def test_two_fallback_nodes_in_a_row_share_one_stage():
    p = plan(two_branches(), placement={"img_relu": "onnxruntime", "img_neg": "onnxruntime"},
             schedule="sequential")
    fallback = [s for s in p.whole if s.target == "onnxruntime"]
    assert [sorted(s.nodes) for s in fallback] == [["img_neg", "img_relu"]]


def test_side_by_side_fallback_nodes_in_two_branches_share_one_stage():
    p = plan(two_branches(), placement={"img_relu": "onnxruntime",
                                        "txt_sigmoid": "onnxruntime"}, schedule="sequential")
    assert _stages(p.whole) == [
        ("main@onnxruntime", "onnxruntime", ["img_relu", "txt_sigmoid"]),
        ("main", "cpu", ["fuse_add", "fuse_mul", "fuse_tanh", "img_abs", "img_neg"]),
    ]


def test_a_graph_of_only_unsupported_ops_is_one_fallback_stage():
    graph = make_graph([helper.make_node("Det", ["x"], ["d"], name="det0"),
                        helper.make_node("Det", ["y"], ["e"], name="det1")],
                       [("x", FLOAT, [2, 3, 3]), ("y", FLOAT, [2, 3, 3])],
                       [("d", FLOAT, [2]), ("e", FLOAT, [2])])
    p = plan(graph)
    assert _stages(p.whole) == [("main@onnxruntime", "onnxruntime", ["det0", "det1"])]
    assert set(p.fell_back()) == {"det0", "det1"}
    assert "no converter for Det" in p.fell_back()["det0"]


def test_placing_a_whole_branch_on_another_target():
    p = plan(two_branches(), placement={"text": "onnxruntime"}, schedule="sequential")
    assert ("main@onnxruntime", "onnxruntime", ["txt_sigmoid"]) in _stages(p.whole)
    assert p.placement.placed_by_user == {"txt_sigmoid": "text"}


def test_bad_placements_are_clear_errors():
    with pytest.raises(mmcompile.MMCompileError, match=r"'speech', neither a node nor a "
                                                      r"branch.*branches: .*image.*text"):
        plan(two_branches(), placement={"speech": "onnxruntime"})
    graph = make_graph([helper.make_node("Det", ["x"], ["d"], name="det0")],
                       [("x", FLOAT, [2, 3, 3])], [("d", FLOAT, [2])])
    with pytest.raises(UnsupportedOpError, match=r"'det0'.*placed there by name.*no converter"):
        plan(graph, placement={"det0": "cpu"})
    with pytest.raises(TargetError, match="unknown target 'tpu'"):
        plan(two_branches(), placement={"text": "tpu"})


def test_group_nodes_merges_every_boundary_the_dependencies_allow():
    graph = two_branches()
    labels = {n.name: ("main", "cpu") for n in graph.gs.nodes}
    labels["img_neg"] = ("main", "onnxruntime")
    groups = group_nodes(graph, labels)
    # relu and sigmoid before the fallback node, the rest after it: no third cpu group
    assert [(label[1], nodes) for label, nodes in groups] == [
        ("cpu", ["img_relu", "txt_sigmoid"]), ("onnxruntime", ["img_neg"]),
        ("cpu", ["img_abs", "fuse_add", "fuse_mul", "fuse_tanh"])]


# -- compiled: numbers, report, runtime ---------------------------------------------------------

@pytest.mark.parametrize("where", [{"img_neg": "onnxruntime"}, {"fuse_add": "onnxruntime"},
                                   {"text": "onnxruntime"}])
@pytest.mark.parametrize("schedule", ["sequential", "parallel"])
def test_mixed_targets_give_the_single_target_numbers(where, schedule):
    mixed = _matches_single_target(two_branches(), placement=where, schedule=schedule)
    assert {s.target for s in mixed.stages} == {"cpu", "onnxruntime"}
    report = mixed.report()
    assert "onnxruntime" in report and "placed by the user" in report


def test_report_names_the_fallback_nodes_and_their_share_of_the_run():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
             helper.make_node("Det", ["r"], ["d"], name="det0"),
             helper.make_node("Unsqueeze", ["d", "axes"], ["du"], name="unsqueeze0"),
             helper.make_node("Mul", ["r", "du"], ["y"], name="mul0")]
    graph = make_graph(nodes, [("x", FLOAT, [2, 3, 3])], [("y", FLOAT, [2, 3, 3])],
                       {"axes": np.array([1, 2], np.int64)})
    compiled = mmcompile.compile(graph, verify=True, tolerance=1e-5)
    assert [s.target for s in compiled.stages] == ["cpu", "onnxruntime", "cpu"]
    report = compiled.report()
    assert "det0: cpu: TVM" in report and "no converter for Det" in report
    assert "fallback: 1 node(s) in 1 stage(s)" in report and "% of the run time" in report
    shares = compiled.time_shares()
    assert shares is not None and abs(sum(shares.values()) - 1.0) < 1e-6
    # host memory on both sides: no copies between the stages
    entries = compiled.profile(random_inputs(graph, seed=0))
    assert {e["lane"] for e in entries} == {"caller"}
    assert {e["target"] for e in entries} == {"cpu", "onnxruntime"}


def test_the_default_refuses_nothing_and_fallback_none_refuses():
    graph = make_graph([helper.make_node("Det", ["x"], ["d"], name="det0")],
                       [("x", FLOAT, [2, 3, 3])], [("d", FLOAT, [2])])
    with pytest.raises(UnsupportedOpError, match="no fallback target"):
        mmcompile.compile(graph, fallback=None)
    compiled = mmcompile.compile(graph)
    x = random_inputs(graph, seed=0)
    np.testing.assert_allclose(compiled.run(x)["d"], run_onnxruntime(graph, x)["d"], rtol=1e-6)


class _FarMemory:
    """An executable whose inputs must live on another device (DLPack type 99): the runtime
    copies every input in and records the copy."""

    memory_device_type = 99

    def __init__(self, inner):
        self.inner, self.copies = inner, 0

    def copy_in(self, value):
        self.copies += 1
        return np.from_dlpack(value).copy()

    def run(self, inputs):
        return self.inner.run(inputs)


def test_a_memory_boundary_is_an_explicit_recorded_copy():
    compiled = mmcompile.compile(two_branches(), placement={"fuse_add": "onnxruntime"},
                                 schedule="sequential", verify=False)
    stage = compiled.stages[1]
    far = _FarMemory(stage.executable)
    stage.executable = far
    feeds = random_inputs(two_branches(), seed=0)
    entries = compiled.profile(feeds)
    copies = [e for e in entries if e["lane"] == "copies"]
    assert far.copies == 2 and len(copies) == 2  # img_feat and txt_feat crossed into it
    assert all(e["target"] == "copy" and e["stage"].endswith("-> main@onnxruntime")
               for e in copies)


# -- artifacts ------------------------------------------------------------------------------

def test_mixed_target_artifact_loads_in_a_fresh_process_and_refuses_tampering(tmp_path):
    graph = two_branches()
    compiled = mmcompile.compile(graph, placement={"img_neg": "onnxruntime"}, verify=False)
    path = compiled.save(tmp_path / "mixed.mmc")
    manifest = json.loads((path / "manifest.json").read_text())
    stage = next(s for s in manifest["stages"] if s["target"] == "onnxruntime")
    assert stage["files"] == {"model": "main@onnxruntime.onnx"} and stage["sha256"]["model"]
    assert stage["info"]["placement"]["reason"].startswith("placed by the user")
    feeds = random_inputs(graph, seed=2)
    np.savez(tmp_path / "in.npz", **feeds)
    script = (f"import numpy as np, mmcompile; m = mmcompile.load({str(path)!r}); "
              f"f = dict(np.load({str(tmp_path / 'in.npz')!r})); "
              f"np.save({str(tmp_path / 'out.npy')!r}, m.run(f)['out']); "
              f"print(sorted(s.target for s in m.stages))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['cpu', 'cpu', 'onnxruntime']"
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), compiled.run(feeds)["out"],
                               rtol=1e-6)
    model_file = path / "main@onnxruntime.onnx"
    model_file.write_bytes(model_file.read_bytes()[:-8])
    with pytest.raises(ArtifactError, match="main@onnxruntime.onnx does not match its SHA-256"):
        mmcompile.load(path)


def test_inspect_shows_the_placement_of_an_artifact(tmp_path, capsys):
    compiled = mmcompile.compile(two_branches(), placement={"img_neg": "onnxruntime"},
                                 schedule="sequential", verify=False)
    path = compiled.save(tmp_path / "m.mmc")
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0
    assert "main@onnxruntime" in out and "placed by the user (img_neg)" in out
    assert "schedule: sequential" in out


# -- typed target options ---------------------------------------------------------------------

def test_unknown_and_mistyped_options_are_errors_naming_the_valid_ones():
    with pytest.raises(TargetError, match=r"target 'cpu' has no option 'winagrad'; its "
                                          r"options: mcpu, winograd, fast_math, tuning_db"):
        mmcompile.compile(two_branches(), target_config={"winagrad": False})
    with pytest.raises(TargetError, match=r"option 'winograd' expects true or false, got "
                                          r"'maybe'"):
        plan(two_branches(), target="cpu{winograd=maybe}")
    with pytest.raises(TargetError, match=r"option 'winograd' expects a bool, got 3"):
        plan(two_branches(), target_config={"winograd": 3})
    with pytest.raises(TargetError, match="malformed option 'winograd' in target"):
        parse_target_spec("cpu{winograd}")


def test_options_are_typed_and_one_configuration_is_one_key():
    cpu = get_target("cpu")
    assert cpu.check_options({"winograd": "false", "mcpu": "znver4"}) == {
        "mcpu": "znver4", "winograd": False, "fast_math": True, "tuning_db": None}
    a = plan(two_branches(), target="cpu{winograd=false}", schedule="sequential")
    b = plan(two_branches(), target="cpu", target_config={"winograd": False},
             schedule="sequential")
    assert a.placement.primary == b.placement.primary == "cpu{winograd=false}"
    assert a.placement.choices[a.placement.primary].options["winograd"] is False


def test_cli_takes_target_options_in_one_form(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    two_branches().save(model)
    code, _, err = run_cli(capsys, "compile", model, "-o", tmp_path / "a.mmc",
                           "--target", "cpu{winagrad=false}")
    assert code == 1
    assert_one_line_error(err, "no option 'winagrad'", "winograd")
    code, out, _ = run_cli(capsys, "compile", model, "-o", tmp_path / "b.mmc",
                           "--target-option", "winograd=false", "--placement",
                           "text=onnxruntime", "--schedule", "sequential")
    assert code == 0, out
    assert "cpu{winograd=false}" in out and "main@onnxruntime" in out
    code, out, _ = run_cli(capsys, "targets")
    assert code == 0
    assert "winograd" in out and "bool" in out and "onnxruntime" in out
    assert "graph_optimizations" in out and "legalize-for-tvm" in out


def test_cli_fallback_none_refuses_with_one_line(tmp_path, capsys):
    model = tmp_path / "det.onnx"
    make_graph([helper.make_node("Det", ["x"], ["d"], name="det0")],
               [("x", FLOAT, [2, 3, 3])], [("d", FLOAT, [2])]).save(model)
    code, _, err = run_cli(capsys, "compile", model, "-o", tmp_path / "x.mmc", "--fallback",
                           "none")
    assert code == 1
    assert_one_line_error(err, "unsupported op 'Det'", "det0")
    assert not (tmp_path / "x.mmc").exists()


# -- control flow and recurrence on the fallback, end to end ------------------------------------

def _lstm_if_model():
    """audio: an LSTM over [T=6, B=1, 4] -> last hidden state; image: MatMul + Relu;
    fusion: an If on the sign of the summed features whose branches read outer-scope
    tensors. The CPU target lowers LSTMs and Ifs itself, but not these: the LSTM has a
    ``clip`` and the If's else branch a ``Celu`` (no TVM converter), so both fall back."""
    rng = np.random.default_rng(0)
    hidden = 5
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["img", "aud"], ["then_out"], name="then_add")], "then", [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [1, hidden])])
    else_graph = helper.make_graph(
        [helper.make_node("Sub", ["img", "aud"], ["else_diff"], name="else_sub"),
         helper.make_node("Celu", ["else_diff"], ["else_out"], name="else_celu")], "else", [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [1, hidden])])
    nodes = [
        helper.make_node("LSTM", ["audio_values", "W", "R", "B"], ["", "h_last"],
                         hidden_size=hidden, clip=50.0, name="lstm0"),
        helper.make_node("Squeeze", ["h_last", "axis0"], ["aud"], name="aud_squeeze"),
        helper.make_node("MatMul", ["pixel_values", "Wi"], ["im"], name="img_matmul"),
        helper.make_node("Relu", ["im"], ["img"], name="img_relu"),
        helper.make_node("Add", ["img", "aud"], ["both"], name="fuse_add"),
        helper.make_node("ReduceSum", ["both"], ["total"], keepdims=0, name="fuse_sum"),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="fuse_greater"),
        helper.make_node("If", ["positive"], ["chosen"], then_branch=then_graph,
                         else_branch=else_graph, name="fuse_if"),
        helper.make_node("Tanh", ["chosen"], ["out"], name="fuse_tanh"),
    ]
    weights = {"W": rng.standard_normal((1, 4 * hidden, 4)).astype(np.float32) * 0.5,
               "R": rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * 0.5,
               "B": rng.standard_normal((1, 8 * hidden)).astype(np.float32) * 0.1,
               "Wi": rng.standard_normal((6, hidden)).astype(np.float32),
               "axis0": np.array([0, 1], np.int64), "zero": np.array(0.0, np.float32)}
    return make_graph(nodes, [("audio_values", FLOAT, [6, 1, 4]), ("pixel_values", FLOAT, [1, 6])],
                      [("out", FLOAT, [1, hidden])], weights,
                      modalities={"audio_values": "audio", "pixel_values": "image"})


@pytest.mark.parametrize("schedule", ["sequential", "auto"])
def test_a_model_with_an_lstm_and_an_if_compiles_with_them_on_the_fallback(schedule):
    graph = _lstm_if_model()
    for seed in range(3):  # both branches of the If are taken across seeds
        feeds = random_inputs(graph, seed=seed)
        compiled = mmcompile.compile(graph, feeds, verify=True, tolerance=1e-5,
                                     schedule=schedule)
        fell_back = compiled.fallback_nodes()
        assert set(fell_back) == {"lstm0", "fuse_if"}
        assert "clip" in fell_back["lstm0"] and "Celu" in fell_back["fuse_if"]
        assert {s.target for s in compiled.stages} == {"cpu", "onnxruntime"}
    # the If stage takes the outer-scope tensors its branches read as inputs
    p = plan(graph, schedule="sequential")
    if_stage = next(s for s in p.whole if "fuse_if" in s.nodes)
    assert {"img", "aud"} <= set(if_stage.inputs)


@pytest.mark.parametrize("flags, exact", [({"avx2", "avx512_vnni"}, True),
                                          ({"avx2", "avx_vnni"}, True),
                                          ({"avx2", "fma"}, False), ({"avx512f"}, False)])
def test_fallback_stages_keep_qdq_ops_unfused_where_onnxruntimes_int8_kernels_saturate(
        monkeypatch, flags, exact):
    # Without VNNI onnxruntime's u8 x s8 kernels saturate pair sums at int16 (up to 163
    # quantization steps off the QDQ graph on znver3): a fallback stage there runs the QDQ
    # graph unfused, as the reference evaluates it.
    import onnxruntime as ort

    from mmcompile.targets import onnxruntime as target
    monkeypatch.setattr(target, "cpu_info", lambda: {"model": "", "flags": flags})
    assert target.int8_exact() is exact
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = target._session(model.SerializeToString(), 1, optimize=True)
    assert isinstance(session, ort.InferenceSession)
    try:
        unfused = session.get_session_options().get_session_config_entry(
            "session.disable_quant_qdq") == "1"
    except RuntimeError:  # never set
        unfused = False
    assert unfused is not exact
