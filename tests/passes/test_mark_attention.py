"""mark-attention: attention chains are recorded in graph.annotations, the graph is untouched."""

import math

import numpy as np
import pytest
from helpers import FLOAT, check_pass, make_graph
from onnx import helper

import mmcompile

B, H, S, D = 2, 4, 6, 8
QKV = [(n, FLOAT, [B, H, S, D]) for n in ("q", "k", "v")]
OUT = [("y", FLOAT, [B, H, S, D])]
CONSTS = {"sqrt_d": np.array(math.sqrt(D), np.float32),
          "quarter": np.array(D ** -0.25, np.float32)}


def _attention(scores_nodes, *, inputs=QKV, softmax_axis=-1, outputs=OUT):
    """MatMul(Softmax(<scores>), v) where ``scores_nodes`` compute tensor ``s`` from q, k."""
    nodes = list(scores_nodes) + [
        helper.make_node("Softmax", ["s"], ["p"], axis=softmax_axis),
        helper.make_node("MatMul", ["p", "v"], ["y"]),
    ]
    return make_graph(nodes, inputs, outputs, CONSTS)


def _k_transpose():
    return helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])


def _units(g):
    return g.annotations.get("attention_units", [])


def _one_unit(**expected):
    def structure(g):
        units = _units(g)
        assert len(units) == 1
        unit = units[0]
        assert unit["name"] == "attention_0"
        for key, value in expected.items():
            if key == "scale":
                assert unit["scale"] == pytest.approx(value, rel=1e-6)
            else:
                assert unit[key] == value, key
        assert set(unit["nodes"]) == {n.name for n in g.gs.nodes}  # every node is in the chain
    return structure


def test_scaled_scores_with_transposed_k():
    g = _attention([_k_transpose(), helper.make_node("MatMul", ["q", "kt"], ["qk"]),
                    helper.make_node("Div", ["qk", "sqrt_d"], ["s"])])
    result = check_pass(g, "mark-attention", expect_changed=True, structure=_one_unit(
        q="q", k="k", v="v", output="y", k_transposed=False, scale=1 / math.sqrt(D), mask=None,
        num_heads=H))
    assert result.records[0].stats == {"attention_units": 1}
    assert result.ops_after == result.ops_before


def test_scale_split_over_q_and_k_with_mask():
    g = _attention([_k_transpose(), helper.make_node("Mul", ["q", "quarter"], ["qs"]),
                    helper.make_node("Mul", ["quarter", "kt"], ["ks"]),
                    helper.make_node("MatMul", ["qs", "ks"], ["qk"]),
                    helper.make_node("Add", ["mask", "qk"], ["s"])],
                   inputs=QKV + [("mask", FLOAT, [B, 1, S, S])])
    check_pass(g, "mark-attention", expect_changed=True, structure=_one_unit(
        q="q", k="k", scale=1 / math.sqrt(D), mask="mask", num_heads=H))


def test_k_given_transposed_and_no_scale():
    inputs = [("q", FLOAT, [B * H, S, D]), ("kt", FLOAT, [B * H, D, S]),
              ("v", FLOAT, [B * H, S, D])]
    g = _attention([helper.make_node("MatMul", ["q", "kt"], ["s"])], inputs=inputs,
                   outputs=[("y", FLOAT, [B * H, S, D])])
    check_pass(g, "mark-attention", expect_changed=True, structure=_one_unit(
        k="kt", k_transposed=True, scale=1.0, num_heads=None))


def test_masked_softmax_guarded_against_fully_masked_rows():
    # SDPA with a mask exports Where(IsNaN(p), 0, p) between the softmax and the second MatMul
    nodes = [_k_transpose(), helper.make_node("MatMul", ["q", "kt"], ["qk"]),
             helper.make_node("Div", ["qk", "sqrt_d"], ["sd"]),
             helper.make_node("Add", ["sd", "mask"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("IsNaN", ["p"], ["nan"]),
             helper.make_node("Where", ["nan", "zero", "p"], ["pg"]),
             helper.make_node("MatMul", ["pg", "v"], ["y"])]
    g = make_graph(nodes, QKV + [("mask", FLOAT, [B, 1, S, S])], OUT,
                   {**CONSTS, "zero": np.array(0.0, np.float32)})
    check_pass(g, "mark-attention", expect_changed=True, structure=_one_unit(
        q="q", k="k", scale=1 / math.sqrt(D), mask="mask", num_heads=H))


def test_softmax_over_another_axis_is_not_attention():
    g = _attention([_k_transpose(), helper.make_node("MatMul", ["q", "kt"], ["s"])],
                   softmax_axis=2)
    result = check_pass(g, "mark-attention", expect_changed=False)
    assert _units(result.graph) == [] and result.records[0].stats == {"attention_units": 0}


def test_chain_with_weights_used_outside_is_not_a_unit():
    g = _attention([_k_transpose(), helper.make_node("MatMul", ["q", "kt"], ["s"])],
                   outputs=OUT + [("p", FLOAT, [B, H, S, S])])
    result = check_pass(g, "mark-attention", expect_changed=False)
    assert "attention_units" not in result.graph.annotations


def test_stale_units_are_replaced():
    g = _attention([_k_transpose(), helper.make_node("MatMul", ["q", "kt"], ["s"])])
    g.annotations["attention_units"] = [{"name": "attention_0", "nodes": ["gone"]}]
    result = mmcompile.optimize(g, "mark-attention")
    assert result.records[0].changed
    assert _units(result.graph)[0]["nodes"] != ["gone"]


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def test_torch_sdpa_with_mask(torch):
    class Attention(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    shapes = [(B, H, S, D)] * 3 + [(B, 1, S, S)]
    g = mmcompile.trace(Attention(), tuple(torch.randn(*s) for s in shapes))
    check_pass(g, "mark-attention", expect_changed=True, structure=_one_unit(
        q="q", k="k", v="v", scale=1 / math.sqrt(D), mask="mask", num_heads=H))


def test_torch_multihead_attention(torch):
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    g = mmcompile.trace(Wrapper(), (torch.randn(2, 5, 16),))
    result = check_pass(g, "mark-attention", expect_changed=True)
    (unit,) = _units(result.graph)
    assert unit["num_heads"] == 4 and unit["scale"] == pytest.approx(0.5, rel=1e-6)


@pytest.fixture(scope="module")
def clip_graph(torch):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=1000, max_position_embeddings=16),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, pixel_values):
            out = self.model(input_ids=input_ids, pixel_values=pixel_values)
            return out.logits_per_image, out.text_embeds, out.image_embeds

    inputs = {"input_ids": torch.randint(0, 1000, (2, 16)),
              "pixel_values": torch.randn(2, 3, 32, 32)}
    return mmcompile.trace(Wrapper(), inputs)


def test_clip_has_one_unit_per_attention_layer(clip_graph):
    def structure(g):
        units = _units(g)
        assert [u["name"] for u in units] == [f"attention_{i}" for i in range(4)]
        assert all(u["num_heads"] == 4 and not u["k_transposed"] for u in units)
        assert all(u["scale"] == pytest.approx(16 ** -0.5, rel=1e-6) for u in units)
        # the text tower's causal mask arrives as an additive constant, the vision one has none
        assert sorted(u["mask"] is None for u in units) == [False, False, True, True]
        claimed = [n for u in units for n in u["nodes"]]
        assert len(claimed) == len(set(claimed))
        ops = {g.node(n).op for n in claimed}
        assert {"MatMul", "Softmax", "Transpose"} <= ops

    result = check_pass(clip_graph, "mark-attention", expect_changed=True, structure=structure,
                        atol=1e-4)
    assert result.records[0].stats == {"attention_units": 4}
