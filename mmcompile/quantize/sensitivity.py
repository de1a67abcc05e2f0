"""The models the accuracy budget measures, cut from the all-int8 one; each layer's sensitivity.

The budget keeps the most sensitive layers in float: it measures the model with each layer
alone int8, then with the most sensitive few kept float. Asking onnxruntime's quantizer for
each of those models cost a quantization apiece (MM-IMDb, 23 layers: 0.18-0.3 s each, before
the session and the run). Here they are cut from the float model and the model with every
layer quantized (:func:`cut`): a quantized layer reads its weights and bias as their
dequantized constants, and every reader of an activation it quantizes (a residual branch
too) and of its output, where that is quantized, reads it through that model's quantize /
dequantize pair. That is the model the quantizer writes for those layers (the tests compare
the two, bit for bit). The one-layer models run on the held-back samples a few at a time,
each on one onnxruntime thread (onnxruntime releases the GIL while it runs).

Tried and dropped: ranking the layers by their own output's error alone (what onnxruntime's
``qdq_loss_debug`` reports), all measured in one run. It ranked the classifier layers last
(their outputs barely move) although they decide the top-1: AV-MNIST kept every layer float.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
from onnx import helper

from mmcompile.errors import MMCompileError
from mmcompile.reference import run_onnxruntime_many
from mmcompile.schedule import available_cores

_PREFIX = "mmc_cut"


def cut(float_model: onnx.ModelProto, quantized: onnx.ModelProto,
        layers: Sequence[str]) -> onnx.ModelProto | None:
    """``float_model`` with only ``layers`` quantized as in ``quantized`` (a QDQ model of the
    same graph); None when the quantizer left all of them float.

    As the quantizer writes it: every reader of a quantized activation (a residual branch
    too) reads it through its quantize / dequantize pair, the weights and bias are
    dequantized constants, and an output the quantizer quantizes passes through its pair.
    Where one quantized layer reads another's output, that output passes through both pairs:
    the second gives back the same values (a dequantized value is on its own grid)."""
    producer = {out: n for n in quantized.graph.node for out in n.output}
    pair = {n.input[0]: n for n in quantized.graph.node  # a tensor -> its Q, a Q -> its DQ
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    by_name = {n.name: n for n in quantized.graph.node if n.name}
    constants = {i.name: i for i in quantized.graph.initializer}
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    graph = model.graph
    present = {i.name for i in graph.initializer}
    have = {o.domain for o in model.opset_import}
    model.opset_import.extend(o for o in quantized.opset_import if o.domain not in have)
    after: dict[str | None, list[onnx.NodeProto]] = {}  # new nodes, by the tensor they follow
    readers: dict[str, str] = {}  # a quantized activation -> what its readers read instead
    rewritten: dict[str, onnx.NodeProto] = {}  # layer -> its node, reading quantized inputs

    def constant(name: str) -> None:
        if name and name not in present and name in constants:
            graph.initializer.append(constants[name])
            present.add(name)

    def copy(original: onnx.NodeProto, inputs: Sequence[str], output: str,
             follows: str | None, name: str | None = None) -> str:
        for tensor in inputs[1:]:
            constant(tensor)
        new = helper.make_node(original.op_type, list(inputs), [output], name=name or output,
                               domain=original.domain)
        new.attribute.extend(original.attribute)
        after.setdefault(follows, []).append(new)
        return output

    float_nodes = {n.name: n for n in graph.node if n.name}
    for layer in layers:
        node = by_name.get(layer)
        if node is None or layer not in float_nodes:
            continue
        inputs, quantized_any = [], False
        for i, tensor in enumerate(node.input):
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                inputs.append(tensor)  # an input the quantizer left float
                continue
            quantized_any = True
            q = producer.get(dq.input[0])
            stem = f"{_PREFIX}/{layer}/{i}"
            if q is not None and q.op_type == "QuantizeLinear":  # an activation: its Q -> DQ
                source = q.input[0]
                if source not in readers:
                    readers[source] = copy(dq, [copy(q, q.input, f"{stem}/q", source),
                                                *dq.input[1:]], f"{stem}/dq", source)
                inputs.append(readers[source])
            else:  # a weight or bias: its quantized constant
                constant(dq.input[0])
                inputs.append(copy(dq, dq.input, f"{stem}/dq", None))
        if not quantized_any:
            continue
        layer_node = rewritten[layer] = onnx.NodeProto()
        layer_node.CopyFrom(float_nodes[layer])
        del layer_node.input[:]
        layer_node.input.extend(inputs)
        # An output the quantizer quantizes too: the layer writes it under a new name and its
        # Q -> DQ pair writes the old one, which readers and graph outputs read as before.
        for i, output in enumerate(node.output[:len(layer_node.output)]):
            q = pair.get(output)
            dq = pair.get(q.output[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            stem = f"{_PREFIX}/{layer}/out{i}"
            final = layer_node.output[i]
            raw = layer_node.output[i] = f"{stem}/raw"
            copy(dq, [copy(q, [raw, *q.input[1:]], f"{stem}/q", raw), *dq.input[1:]], final,
                 raw, name=f"{stem}/dq")
    if not rewritten:
        return None
    nodes: list[onnx.NodeProto] = []  # copies: the repeated field is cleared below

    def emit(node: onnx.NodeProto) -> None:  # a node, then what follows its outputs
        nodes.append(node)
        for output in node.output:
            for follower in after.pop(output, []):
                emit(follower)

    for new in after.pop(None, []):
        emit(new)
    for tensor in [t.name for t in graph.input] + [t for t in after if t in present]:
        for new in after.pop(tensor, []):
            emit(new)
    for original in graph.node:
        if original.name in rewritten:
            emit(rewritten[original.name])
            continue
        kept = onnx.NodeProto()
        kept.CopyFrom(original)
        for i, tensor in enumerate(kept.input):
            kept.input[i] = readers.get(tensor, tensor)
        emit(kept)
    if after:  # a bug, not a property of the model: never measure such a cut
        raise MMCompileError(f"internal error: cutting {', '.join(layers)} from the quantized "
                             f"model left tensors nothing writes: {', '.join(map(str, after))}")
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def sensitivities(float_model: onnx.ModelProto, quantized: onnx.ModelProto,
                  layers: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]],
                  score: Callable[[list[dict[str, np.ndarray]]], float],
                  threads: int | None = None) -> dict[str, float]:
    """Layer -> ``score`` of the model's outputs on ``feeds`` with that layer alone int8
    (layers the quantizer left float are left out). ``threads``: models run at once (default:
    the cores this process may use, at most 4), each on one onnxruntime thread."""
    workers = threads or min(4, available_cores())

    def measure(layer: str) -> float | None:
        model = cut(float_model, quantized, [layer])
        return None if model is None else score(run_onnxruntime_many(model, feeds, threads=1))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = dict(zip(layers, pool.map(measure, layers)))
    return {layer: value for layer, value in found.items() if value is not None}
