"""End to end: real transformers exports through the default pipeline.

For CLIP, BLIP and a Whisper encoder (opset 18 and 23, static and dynamic batch): the node count
does not grow (and drops where there is something to fuse), outputs stay within 1e-4 of the
input graph under onnxruntime, and TVM's Relax ONNX importer accepts the result, including the
exports it rejects as exported (opset-23 Attention, dynamic batch).
"""

from __future__ import annotations

import pytest
from hf_models import build

import mmcompile
from mmcompile.reference import compare_outputs, random_inputs, run_onnxruntime

pytest.importorskip("transformers")

ATOL = 1e-4


def tvm_import_error(graph: mmcompile.Graph) -> str | None:
    from tvm.relax.frontend.onnx import from_onnx
    try:
        from_onnx(graph.to_onnx(), keep_params_in_input=False)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


CASES = [
    # (model, opset, dynamic batch, TVM accepts the raw export)
    ("clip", 18, False, True),
    ("clip", 23, False, False),
    ("clip", 18, True, False),
    ("blip", 18, False, True),
    ("whisper_encoder", 18, False, True),
    ("whisper_encoder", 23, False, False),
]


@pytest.mark.parametrize("name,opset,dynamic,raw_ok", CASES,
                         ids=[f"{c[0]}-op{c[1]}{'-dyn' if c[2] else ''}" for c in CASES])
def test_default_pipeline_on_transformers_export(name, opset, dynamic, raw_ok, tmp_path):
    module, inputs = build(name)
    graph = mmcompile.trace(module, inputs, opset=opset, dynamic_batch=dynamic)
    if dynamic:  # fix the batch again, as `--input-shape` does, so shapes can fold
        path = graph.save(tmp_path / "dyn.onnx")
        graph = mmcompile.load_graph(path, input_shapes={k: list(v.shape)
                                                         for k, v in inputs.items()})
    assert (tvm_import_error(graph) is None) == raw_ok

    result = mmcompile.optimize(graph, "default", ctx=mmcompile.PassContext(verify_each=True))

    assert result.nodes_after <= result.nodes_before, result.op_table()
    # what TVM needs legalized is the cpu target's own pipeline, run on its stages
    legalized = mmcompile.optimize(result.graph, mmcompile.get_target("cpu").pipeline)
    assert tvm_import_error(legalized.graph) is None
    feeds = random_inputs(graph, seed=0)
    for diff in compare_outputs(run_onnxruntime(graph, feeds), run_onnxruntime(result.graph, feeds)):
        assert diff.ok(ATOL), str(diff)
    saved = result.graph.save(tmp_path / "opt.onnx")
    assert mmcompile.load_graph(saved).num_nodes == result.nodes_after
