"""Input validation by a compiled model's Signature: the checks that run before native code.

No compilation here: signatures are built by hand or from small graphs.
"""

import json

import numpy as np
import pytest
import torch
from helpers import FLOAT, INT64, make_graph
from onnx import helper

from mmcompile.errors import InputError
from mmcompile.signature import Signature, TensorSpec

VOCAB = 10

SIG = Signature(
    inputs=(TensorSpec("pixel_values", ("batch", 3, 4, 4), "float32", "image"),
            TensorSpec("input_ids", ("batch", 6), "int64", "text", index_bound=VOCAB)),
    outputs=(TensorSpec("logits", ("batch", 5), "float32"),))


def _feeds(batch: int = 2, **overrides):
    rng = np.random.default_rng(0)
    feeds = {"pixel_values": rng.standard_normal((batch, 3, 4, 4)).astype(np.float32),
             "input_ids": rng.integers(0, VOCAB, (batch, 6)).astype(np.int64)}
    return {**feeds, **overrides}


def test_valid_inputs_pass_through_without_copies():
    feeds = _feeds()
    ready = SIG.validate(feeds)
    assert list(ready) == ["pixel_values", "input_ids"]
    for name, value in feeds.items():
        assert ready[name] is value  # right dtype, contiguous: nothing to do


def test_missing_input_is_named():
    feeds = _feeds()
    del feeds["input_ids"]
    with pytest.raises(InputError, match=r"missing \['input_ids'\]"):
        SIG.validate(feeds)


def test_unexpected_input_is_named():
    with pytest.raises(InputError, match=r"unexpected \['attention_mask'\]") as info:
        SIG.validate(_feeds(attention_mask=np.ones((2, 6), np.int64)))
    assert "missing" not in str(info.value)


def test_wrong_rank_names_input_and_ranks():
    with pytest.raises(InputError) as info:
        SIG.validate(_feeds(pixel_values=np.zeros((3, 4, 4), np.float32)))
    message = str(info.value)
    assert "'pixel_values'" in message and "rank 3" in message and "rank 4" in message


def test_wrong_static_dim_names_input_and_dim():
    with pytest.raises(InputError) as info:
        SIG.validate(_feeds(pixel_values=np.zeros((2, 3, 5, 4), np.float32)))
    message = str(info.value)
    assert "'pixel_values'" in message
    assert "dim 2: 5 != 4" in message


def test_symbolic_dim_must_agree_across_inputs():
    feeds = _feeds(input_ids=np.zeros((3, 6), np.int64))  # batch 2 in pixel_values
    with pytest.raises(InputError) as info:
        SIG.validate(feeds)
    assert str(info.value) == ("dim 'batch' is 3 in input 'input_ids' but 2 in input "
                               "'pixel_values'")


def test_symbolic_dim_takes_any_consistent_size():
    ready = SIG.validate(_feeds(batch=5))
    assert ready["pixel_values"].shape[0] == ready["input_ids"].shape[0] == 5


def test_int32_ids_are_cast_to_int64():
    ids = np.array([[1, 2, 3, 4, 5, 9]] * 2, np.int32)
    ready = SIG.validate(_feeds(input_ids=ids))
    assert ready["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(ready["input_ids"], ids)


def test_float64_is_rejected_not_rounded():
    with pytest.raises(InputError, match=r"'pixel_values' has dtype float64.*expects float32"):
        SIG.validate(_feeds(pixel_values=np.zeros((2, 3, 4, 4), np.float64)))


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 100, -1])
def test_token_id_outside_table_names_input_and_bound(bad):
    ids = np.zeros((2, 6), np.int64)
    ids[1, 3] = bad
    with pytest.raises(InputError) as info:
        SIG.validate(_feeds(input_ids=ids))
    message = str(info.value)
    assert "'input_ids'" in message
    assert f"index {bad}" in message and f"[0, {VOCAB})" in message


def test_largest_valid_token_id_is_accepted():
    ids = np.full((2, 6), VOCAB - 1, np.int64)
    assert SIG.validate(_feeds(input_ids=ids))["input_ids"].max() == VOCAB - 1


def test_torch_tensors_are_accepted_and_cast():
    feeds = {"pixel_values": torch.randn(2, 3, 4, 4),
             "input_ids": torch.randint(0, VOCAB, (2, 6), dtype=torch.int32)}
    ready = SIG.validate(feeds)
    assert isinstance(ready["input_ids"], torch.Tensor)
    assert ready["input_ids"].dtype == torch.int64
    assert torch.equal(ready["input_ids"], feeds["input_ids"].long())
    assert ready["pixel_values"].dtype == torch.float32


def test_torch_tensors_are_checked_like_numpy():
    with pytest.raises(InputError, match="float64"):
        SIG.validate({"pixel_values": torch.randn(2, 3, 4, 4, dtype=torch.float64),
                      "input_ids": torch.zeros(2, 6, dtype=torch.int64)})
    with pytest.raises(InputError, match=r"index 10, outside \[0, 10\)"):
        SIG.validate({"pixel_values": torch.randn(2, 3, 4, 4),
                      "input_ids": torch.full((2, 6), VOCAB, dtype=torch.int64)})


def test_non_contiguous_inputs_are_made_contiguous():
    pixels = np.asfortranarray(np.random.default_rng(1).standard_normal((2, 3, 4, 4),
                                                                        dtype=np.float32))
    ids = np.zeros((6, 2), np.int64).T  # a transposed view
    assert not pixels.flags.c_contiguous and not ids.flags.c_contiguous
    ready = SIG.validate({"pixel_values": pixels, "input_ids": ids})
    assert ready["pixel_values"].flags.c_contiguous and ready["input_ids"].flags.c_contiguous
    np.testing.assert_array_equal(ready["pixel_values"], pixels)
    strided = torch.randn(2, 3, 4, 8)[..., ::2]
    ready = SIG.validate({"pixel_values": strided, "input_ids": torch.zeros(2, 6).long()})
    assert ready["pixel_values"].is_contiguous()
    assert torch.equal(ready["pixel_values"], strided)


def test_random_inputs_match_the_signature_and_respect_index_bound():
    sig = Signature(
        inputs=(TensorSpec("input_ids", ("batch", 500), "int64", "text", index_bound=3),
                TensorSpec("mask", (1, 500), "int32"),
                TensorSpec("x", (1, 2), "float16")),
        outputs=())
    feeds = sig.random_inputs(seed=4)
    assert feeds["input_ids"].shape == (1, 500)  # symbolic dims -> 1
    assert feeds["input_ids"].dtype == np.int64
    assert set(np.unique(feeds["input_ids"])) == {0, 1, 2}
    assert set(np.unique(feeds["mask"])) == {0, 1}  # no table: [0, 2)
    assert feeds["x"].dtype == np.float16
    sig.validate(feeds)
    again = sig.random_inputs(seed=4)
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)


def test_to_dict_from_dict_round_trip_through_json():
    data = json.loads(json.dumps(SIG.to_dict()))
    assert data["inputs"][1] == {"name": "input_ids", "shape": ["batch", 6], "dtype": "int64",
                                 "modality": "text", "index_bound": VOCAB}
    assert Signature.from_dict(data) == SIG


def _gather_graph(ids_shape):
    nodes = [helper.make_node("Reshape", ["input_ids", "flat"], ["ids_flat"]),
             helper.make_node("Gather", ["table", "ids_flat"], ["emb"]),
             helper.make_node("ReduceSum", ["emb"], ["out"], keepdims=0)]
    init = {"table": np.ones((7, 3), np.float32), "flat": np.array([-1], np.int64)}
    return make_graph(nodes, [("input_ids", INT64, ids_shape)], [("out", FLOAT, [])], init)


def test_from_graph_finds_table_bound_modality_and_symbolic_dims():
    sig = Signature.from_graph(_gather_graph(["batch", 4]))
    (spec,) = sig.inputs
    assert spec == TensorSpec("input_ids", ("batch", 4), "int64", "text", index_bound=7)
    assert [o.name for o in sig.outputs] == ["out"]
    with pytest.raises(InputError, match=r"\[0, 7\)"):
        sig.validate({"input_ids": np.full((2, 4), 7, np.int64)})


def test_unnamed_dynamic_dims_are_independent():
    graph = make_graph([helper.make_node("Relu", ["x"], ["y"])], [("x", FLOAT, [None, None])],
                       [("y", FLOAT, [None, None])])
    sig = Signature.from_graph(graph)
    assert sig.validate({"x": np.zeros((2, 3), np.float32)})["x"].shape == (2, 3)


@pytest.mark.parametrize("where", ["input", "output"])
def test_a_boundary_type_numpy_lacks_is_a_clear_error_before_compiling(where):
    # bfloat16 at the model's inputs or outputs: the signature's np.dtype(16) raised a bare
    # TypeError after the target had compiled the model (19 of onnx's node tests)
    import mmcompile
    from mmcompile.errors import ModelLoadError
    bf16 = helper.TensorProto.BFLOAT16
    if where == "input":
        nodes = [helper.make_node("Cast", ["x"], ["y"], to=helper.TensorProto.FLOAT)]
        io = ([("x", bf16, [2, 3])], [("y", FLOAT, [2, 3])])
    else:
        nodes = [helper.make_node("Cast", ["x"], ["y"], to=bf16)]
        io = ([("x", FLOAT, [2, 3])], [("y", bf16, [2, 3])])
    graph = make_graph(nodes, *io)
    with pytest.raises(ModelLoadError, match=f"model {where} '{io[0 if where == 'input' else 1][0][0]}'"
                                             f" is BFLOAT16: .*numpy"):
        mmcompile.compile(graph, verify=False, fallback=None)


STATIC = Signature(inputs=tuple(TensorSpec(s.name, (2,) + s.shape[1:], s.dtype, s.modality,
                                           s.index_bound) for s in SIG.inputs),
                   outputs=SIG.outputs)


def test_static_shapes_take_the_quick_check_with_the_same_outcomes():
    # all dims static: exact numpy arrays are checked without the general path, which must
    # still see (and name) everything else
    feeds = _feeds()
    ready = STATIC.validate(feeds)
    assert all(ready[name] is value for name, value in feeds.items())
    for bad in (VOCAB, -1):
        ids = np.zeros((2, 6), np.int64)
        ids[0, 5] = bad
        with pytest.raises(InputError, match=rf"'input_ids' holds index {bad}, outside"):
            STATIC.validate(_feeds(input_ids=ids))
    with pytest.raises(InputError, match=r"dim 0: 3 != 2"):
        STATIC.validate(_feeds(batch=3))
    cast = STATIC.validate(_feeds(input_ids=np.ones((2, 6), np.int32)))["input_ids"]
    assert cast.dtype == np.int64
    swapped = _feeds()["pixel_values"].astype(">f4")
    assert STATIC.validate(_feeds(pixel_values=swapped))["pixel_values"].dtype == np.float32
    strided = np.zeros((2, 3, 4, 8), np.float32)[..., ::2]
    assert STATIC.validate(_feeds(pixel_values=strided))["pixel_values"].flags.c_contiguous
    with pytest.raises(InputError, match=r"dtype float64"):
        STATIC.validate(_feeds(pixel_values=np.zeros((2, 3, 4, 4))))
    with pytest.raises(InputError, match=r"missing \['input_ids'\]"):
        STATIC.validate({"pixel_values": feeds["pixel_values"]})
