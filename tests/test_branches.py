"""annotate-branches and partition: modality branches, sub-branches, fusion frontier, stages.

Every graph here is built by hand so the expected stages can be read off the node names. The
partition tests run each stage subgraph under onnxruntime in plan order, passing tensors by
name, and require the whole graph's outputs bit for bit: a partition only moves nodes between
subgraphs, it never changes an op.
"""

import numpy as np
import pytest
from helpers import FLOAT, INT64, check_pass, make_graph
from onnx import helper

import mmcompile
from mmcompile.analysis import FUSION, branch_summary, describe, node_modalities
from mmcompile.cli import main
from mmcompile.planning.partition import partition
from mmcompile.reference import random_inputs, run_onnxruntime

RNG = np.random.default_rng(0)
IMAGE = ("pixel_values", FLOAT, [1, 3, 8, 8])
TEXT = ("input_ids", INT64, [1, 5])
AUDIO = ("audio_values", FLOAT, [1, 16])
VOCAB, EMBED = 10, 6


def _weights(**shapes):
    return {name: RNG.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _image_tower(prefix, source="pixel_values"):
    """Conv -> Relu -> GlobalAveragePool -> Flatten: ``<prefix>_feat`` of shape [1, 4]."""
    return [
        helper.make_node("Conv", [source, f"{prefix}_w"], [f"{prefix}_c"], pads=[1, 1, 1, 1],
                         name=f"{prefix}_conv"),
        helper.make_node("Relu", [f"{prefix}_c"], [f"{prefix}_r"], name=f"{prefix}_relu"),
        helper.make_node("GlobalAveragePool", [f"{prefix}_r"], [f"{prefix}_g"],
                         name=f"{prefix}_gap"),
        helper.make_node("Flatten", [f"{prefix}_g"], [f"{prefix}_feat"], name=f"{prefix}_flat"),
    ]


TEXT_TOWER = [
    helper.make_node("Gather", ["table", "input_ids"], ["emb"], name="txt_gather"),
    helper.make_node("ReduceMean", ["emb", "axis1"], ["txt_feat"], keepdims=0, name="txt_mean"),
]
AUDIO_TOWER = [helper.make_node("MatMul", ["audio_values", "audio_w"], ["aud_feat"],
                                name="aud_matmul")]
TEXT_WEIGHTS = {**_weights(table=(VOCAB, EMBED)), "axis1": np.array([1], np.int64)}


def two_branch():
    """image + text -> Concat -> Gemm."""
    nodes = _image_tower("img") + TEXT_TOWER + [
        helper.make_node("Concat", ["img_feat", "txt_feat"], ["joint"], axis=1, name="fuse_cat"),
        helper.make_node("Gemm", ["joint", "head_w", "head_b"], ["logits"], name="fuse_gemm"),
    ]
    return make_graph(nodes, [IMAGE, TEXT], [("logits", FLOAT, [1, 3])],
                      {**_weights(img_w=(4, 3, 3, 3), head_w=(4 + EMBED, 3), head_b=(3,)),
                       **TEXT_WEIGHTS})


def three_branch():
    """image + text + audio -> Concat -> Gemm."""
    nodes = _image_tower("img") + TEXT_TOWER + AUDIO_TOWER + [
        helper.make_node("Concat", ["img_feat", "txt_feat", "aud_feat"], ["joint"], axis=1,
                         name="fuse_cat"),
        helper.make_node("Gemm", ["joint", "head_w", "head_b"], ["logits"], name="fuse_gemm"),
    ]
    return make_graph(nodes, [IMAGE, TEXT, AUDIO], [("logits", FLOAT, [1, 3])],
                      {**_weights(img_w=(4, 3, 3, 3), audio_w=(16, 5), head_w=(4 + EMBED + 5, 3),
                                  head_b=(3,)), **TEXT_WEIGHTS})


def two_fusion_points():
    """The image feature feeds two fusion nodes (a Concat and a later Mul) and is also a graph
    output; the fusion also reads a raw (tabular) input directly."""
    nodes = _image_tower("img") + TEXT_TOWER + [
        helper.make_node("Concat", ["img_feat", "txt_feat"], ["joint"], axis=1, name="fuse_cat"),
        helper.make_node("MatMul", ["joint", "proj_w"], ["proj"], name="fuse_proj"),
        helper.make_node("Mul", ["proj", "img_feat"], ["gated"], name="fuse_gate"),
        helper.make_node("Add", ["gated", "tabular_features"], ["out"], name="fuse_add"),
    ]
    return make_graph(nodes, [IMAGE, TEXT, ("tabular_features", FLOAT, [1, 4])],
                      [("out", FLOAT, [1, 4]), ("img_feat", FLOAT, [1, 4])],
                      {**_weights(img_w=(4, 3, 3, 3), proj_w=(4 + EMBED, 4)), **TEXT_WEIGHTS})


def two_image_towers():
    """Two towers over the same image input that meet only in the fusion with text."""
    nodes = _image_tower("left") + _image_tower("right") + TEXT_TOWER + [
        helper.make_node("Concat", ["left_feat", "right_feat", "txt_feat"], ["out"], axis=1,
                         name="fuse_cat"),
    ]
    return make_graph(nodes, [IMAGE, TEXT], [("out", FLOAT, [1, 8 + EMBED])],
                      {**_weights(left_w=(4, 3, 3, 3), right_w=(4, 3, 3, 3)), **TEXT_WEIGHTS})


def shared_constants():
    """A weight initializer read by both branches, and an unfolded constant subgraph
    (Constant -> Add(k, k)) whose nodes depend on no input, feeding both branches."""
    nodes = [
        helper.make_node("Constant", [], ["k"], name="const_k",
                         value=helper.make_tensor("k_value", FLOAT, [1], [0.5])),
        helper.make_node("Add", ["k", "k"], ["k2"], name="const_add"),
        helper.make_node("MatMul", ["audio_values", "shared_w"], ["a0"], name="aud_matmul"),
        helper.make_node("Mul", ["a0", "k2"], ["aud_feat"], name="aud_scale"),
        helper.make_node("ReduceMean", ["tabular_features", "axis1"], ["t0"], keepdims=1,
                         name="tab_mean"),
        helper.make_node("Mul", ["t0", "shared_w"], ["t1"], name="tab_weight"),
        helper.make_node("Mul", ["t1", "k"], ["tab_feat"], name="tab_scale"),
        helper.make_node("Add", ["aud_feat", "tab_feat"], ["out"], name="fuse_add"),
    ]
    return make_graph(nodes, [AUDIO, ("tabular_features", FLOAT, [1, 16])],
                      [("out", FLOAT, [16, 4])],
                      {**_weights(shared_w=(16, 4)), "axis1": np.array([1], np.int64)})


def image_only():
    nodes = _image_tower("img") + [
        helper.make_node("Gemm", ["img_feat", "head_w"], ["logits"], name="head")]
    return make_graph(nodes, [IMAGE], [("logits", FLOAT, [1, 3])],
                      _weights(img_w=(4, 3, 3, 3), head_w=(4, 3)))


def annotate(graph):
    return mmcompile.optimize(graph, "annotate-branches").graph


def stages_of(graph):
    """stage -> sorted node names, from the annotations."""
    out = {}
    for node, stage in graph.annotations["stages"].items():
        out.setdefault(stage, []).append(node)
    return {k: sorted(v) for k, v in out.items()}


def run_plans(plans, inputs):
    """Run each stage subgraph under onnxruntime in order; every tensor by name."""
    env = dict(inputs)
    for plan in plans:
        assert set(plan.inputs) <= set(env), f"{plan.name} runs before its inputs exist"
        got = run_onnxruntime(plan.graph, {name: env[name] for name in plan.inputs})
        assert sorted(got) == sorted(plan.outputs)
        env.update(got)
    return env


def assert_partition_reproduces(graph, seed=0):
    plans = partition(annotate(graph))
    for plan in plans:
        plan.graph.verify()
    inputs = random_inputs(graph, seed=seed)
    env = run_plans(plans, inputs)
    for name, ref in run_onnxruntime(graph, inputs).items():
        assert np.array_equal(env[name], ref), name
    return plans


# -- annotate-branches as a pass ---------------------------------------------------------------

def test_three_branches_as_a_pass():
    def structure(g):
        assert stages_of(g) == {
            "image": ["img_conv", "img_flat", "img_gap", "img_relu"],
            "text": ["txt_gather", "txt_mean"],
            "audio": ["aud_matmul"],
            FUSION: ["fuse_cat", "fuse_gemm"],
        }
        assert g.annotations["stage_dag"] == {"audio": [], FUSION: ["audio", "image", "text"],
                                              "image": [], "text": []}
        assert g.annotations["fusion_frontier"] == ["aud_feat", "img_feat", "txt_feat"]

    # Only annotations change: check_pass also checks the op counts, a no-op second run and
    # equal outputs.
    result = check_pass(three_branch(), "annotate-branches", expect_changed=True,
                        structure=structure)
    assert result.ops_after == result.ops_before
    assert result.records[0].stats == {"stages": 4, "branches": 3, "frontier_tensors": 3}


def test_second_run_reports_unchanged_and_stale_annotations_are_replaced():
    graph = annotate(two_branch())
    again = mmcompile.optimize(graph, "annotate-branches")
    assert not again.records[0].changed
    assert again.graph.annotations == graph.annotations
    graph.annotations["stages"]["img_conv"] = "text"  # stale, e.g. left by an earlier version
    fixed = mmcompile.optimize(graph, "annotate-branches")
    assert fixed.records[0].changed
    assert fixed.graph.annotations["stages"]["img_conv"] == "image"


def test_two_branches():
    graph = annotate(two_branch())
    assert set(stages_of(graph)) == {"image", "text", FUSION}
    assert graph.annotations["stage_dag"][FUSION] == ["image", "text"]
    assert graph.annotations["fusion_frontier"] == ["img_feat", "txt_feat"]


def test_branch_feeding_two_fusion_points():
    graph = annotate(two_fusion_points())
    assert stages_of(graph) == {
        "image": ["img_conv", "img_flat", "img_gap", "img_relu"],
        "text": ["txt_gather", "txt_mean"],
        FUSION: ["fuse_add", "fuse_cat", "fuse_gate", "fuse_proj"],
    }
    # img_feat crosses once however many fusion nodes read it; the tabular input goes straight
    # into the fusion, so tabular has no branch of its own.
    assert graph.annotations["fusion_frontier"] == ["img_feat", "txt_feat"]
    assert graph.annotations["stage_dag"] == {FUSION: ["image", "text"], "image": [], "text": []}


def test_independent_towers_over_one_input_become_sub_branches():
    result = mmcompile.optimize(two_image_towers(), "annotate-branches")
    graph = result.graph
    assert stages_of(graph) == {
        "image.0": ["left_conv", "left_flat", "left_gap", "left_relu"],
        "image.1": ["right_conv", "right_flat", "right_gap", "right_relu"],
        "text": ["txt_gather", "txt_mean"],
        FUSION: ["fuse_cat"],
    }
    assert graph.annotations["stage_dag"][FUSION] == ["image.0", "image.1", "text"]
    assert result.records[0].stats == {"stages": 4, "branches": 3, "frontier_tensors": 3}


def test_towers_that_meet_before_the_fusion_stay_one_branch():
    nodes = _image_tower("left") + _image_tower("right") + TEXT_TOWER + [
        helper.make_node("Add", ["left_feat", "right_feat"], ["img_feat"], name="img_merge"),
        helper.make_node("Concat", ["img_feat", "txt_feat"], ["out"], axis=1, name="fuse_cat"),
    ]
    graph = annotate(make_graph(nodes, [IMAGE, TEXT], [("out", FLOAT, [1, 4 + EMBED])],
                                {**_weights(left_w=(4, 3, 3, 3), right_w=(4, 3, 3, 3)),
                                 **TEXT_WEIGHTS}))
    assert set(stages_of(graph)) == {"image", "text", FUSION}
    assert len(stages_of(graph)["image"]) == 9


def test_constant_only_nodes_get_no_stage_and_shared_weights_do_not_join_branches():
    graph = annotate(shared_constants())
    stages = graph.annotations["stages"]
    assert "const_k" not in stages and "const_add" not in stages
    assert node_modalities(graph)["const_add"] == frozenset()
    assert set(stages.values()) == {"audio", "tabular", FUSION}
    assert graph.annotations["stage_dag"][FUSION] == ["audio", "tabular"]
    # the shared weight is read by both branches: the summary books it to the fusion
    summary = branch_summary(graph)
    assert summary[FUSION].parameters == 16 * 4
    assert summary["audio"].parameters == 0 and summary["tabular"].parameters == 0
    assert summary["constant"].nodes == 2


def test_one_modality_is_one_stage():
    result = mmcompile.optimize(image_only(), "annotate-branches")
    graph = result.graph
    assert set(graph.annotations["stages"].values()) == {"image"}
    assert graph.annotations["stage_dag"] == {"image": []}
    assert graph.annotations["fusion_frontier"] == []
    assert result.records[0].stats == {"stages": 1, "branches": 1, "frontier_tensors": 0}
    plans = partition(graph)
    assert [(p.name, p.inputs, p.outputs) for p in plans] == [
        ("main", ["pixel_values"], ["logits"])]
    assert plans[0].graph is graph


def test_branch_summary_and_describe_of_three_branches():
    graph = annotate(three_branch())
    summary = branch_summary(graph)
    assert {k: v.nodes for k, v in summary.items()} == {"image": 4, "text": 2, "audio": 1,
                                                        FUSION: 2}
    assert summary["image"].parameters == 4 * 3 * 3 * 3
    assert summary["text"].parameters == VOCAB * EMBED
    assert summary["audio"].flops == 2 * 5 * 16
    conv_flops = 2 * (4 * 8 * 8) * (3 * 3 * 3)
    assert summary["image"].flops == conv_flops  # MatMul/Gemm/Conv only (mmcompile.flops)
    info = describe(graph)
    assert info["stage_dag"] == graph.annotations["stage_dag"]
    assert [i["modality"] for i in info["inputs"]] == ["image", "text", "audio"]


# -- partition ---------------------------------------------------------------------------------

def test_partition_of_three_branches():
    plans = assert_partition_reproduces(three_branch())
    assert [(p.name, p.inputs, p.outputs, p.depends_on) for p in plans] == [
        ("audio", ["audio_values"], ["aud_feat"], []),
        ("image", ["pixel_values"], ["img_feat"], []),
        ("text", ["input_ids"], ["txt_feat"], []),
        (FUSION, ["img_feat", "txt_feat", "aud_feat"], ["logits"], ["audio", "image", "text"]),
    ]
    by_name = {p.name: p for p in plans}
    assert by_name["image"].graph.op_counts() == {"Conv": 1, "Relu": 1, "GlobalAveragePool": 1,
                                                  "Flatten": 1}
    assert by_name["image"].graph.modalities["pixel_values"].modality == "image"
    assert by_name[FUSION].graph.modalities == {}  # reads stage tensors only


@pytest.mark.parametrize("build", [two_branch, two_fusion_points, two_image_towers,
                                   shared_constants],
                         ids=["two-branch", "two-fusion-points", "sub-branches",
                              "shared-constants"])
def test_stage_subgraphs_reproduce_the_whole_graph(build):
    assert_partition_reproduces(build(), seed=3)


def test_partition_details_of_the_harder_graphs():
    plans = {p.name: p for p in partition(annotate(two_fusion_points()))}
    # a branch tensor that is also a graph output is written once, the raw input is read by
    # the fusion directly
    assert plans["image"].outputs == ["img_feat"]
    assert plans[FUSION].inputs == ["tabular_features", "img_feat", "txt_feat"]
    plans = {p.name: p for p in partition(annotate(shared_constants()))}
    # the constant subgraph is recomputed inside every stage that needs it
    assert plans["audio"].graph.op_counts()["Constant"] == 1
    assert plans["audio"].graph.op_counts()["Add"] == 1
    assert plans["tabular"].graph.op_counts()["Constant"] == 1
    assert "Add" not in plans["tabular"].graph.op_counts()


def test_output_computed_from_constants_alone_keeps_the_model_whole():
    nodes = [
        helper.make_node("Relu", ["audio_values"], ["a"], name="aud_relu"),
        helper.make_node("ReduceSum", ["tabular_features"], ["t"], keepdims=1, name="tab_sum"),
        helper.make_node("Add", ["a", "t"], ["out"], name="fuse_add"),
        helper.make_node("Constant", [], ["k"], name="const_k",
                         value=helper.make_tensor("k_value", FLOAT, [1], [2.0])),
    ]
    graph = make_graph(nodes, [AUDIO, ("tabular_features", FLOAT, [1, 16])],
                       [("out", FLOAT, [1, 16]), ("k", FLOAT, [1])])
    plans = assert_partition_reproduces(graph)
    assert [p.name for p in plans] == ["main"]


def test_unannotated_graph_is_one_stage():
    graph = three_branch()
    assert [p.name for p in partition(graph)] == ["main"]


def test_dead_nodes_form_no_stage():
    nodes = _image_tower("img") + TEXT_TOWER + [
        helper.make_node("Neg", ["pixel_values"], ["unused"], name="img_dead"),
        helper.make_node("Concat", ["img_feat", "txt_feat"], ["out"], axis=1, name="fuse_cat"),
    ]
    graph = make_graph(nodes, [IMAGE, TEXT], [("out", FLOAT, [1, 4 + EMBED])],
                       {**_weights(img_w=(4, 3, 3, 3)), **TEXT_WEIGHTS})
    plans = partition(annotate(graph))
    assert all(p.outputs and p.graph.num_nodes for p in plans), \
        [(p.name, p.outputs) for p in plans]


# -- mmcompile inspect ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_branch_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("branches") / "three.onnx"
    three_branch().save(path)
    return path


def test_inspect_prints_the_stages(three_branch_path, capsys):
    assert main(["inspect", str(three_branch_path)]) == 0
    out = capsys.readouterr().out
    stages = out.split("\nstages (")[1].split("\n\n")[0].splitlines()[1:]
    assert sorted(stages) == ["  audio", "  audio + image + text -> fusion", "  image", "  text"]


def test_inspect_draws_a_png(three_branch_path, tmp_path, capsys):
    drawing = tmp_path / "branches.png"
    assert main(["inspect", str(three_branch_path), "--draw", str(drawing)]) == 0
    assert f"drew the graph coloured by branch to {drawing}" in capsys.readouterr().out
    assert drawing.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
