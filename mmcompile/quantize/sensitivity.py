"""The models the accuracy budget measures, cut from the all-int8 one; each layer's sensitivity.

The budget keeps the most sensitive layers in float: it measures the model with each layer
alone int8, then with the most sensitive few kept float. Asking onnxruntime's quantizer for
each of those models cost a quantization apiece (MM-IMDb, 23 layers: 0.18-0.3 s each, before
the session and the run). Here they are cut from the float model and the model with every
layer quantized (:func:`cut`): a quantized layer reads its weights and bias as their
dequantized constants, and every reader of an activation it quantizes (a residual branch
too) and of its output, where that is quantized, reads it through that model's quantize /
dequantize pair. That is the model the quantizer writes for those layers (the tests compare
the two, bit for bit). Of each one-layer model only the part its layer changes runs (the
layer, its quantize / dequantize pairs and what is downstream of them), on values read from
one run of the float model per sample; the rest computes what the float model computes. A
layer of one modality branch never runs the other branches, nor the layers before it: the
sensitivities of MM-IMDb's 23 layers took 1.1 s instead of 3.1 s, AV-MNIST's 9 0.75 s instead
of 2.2 s, MOSEI-TFN's 27 (its fusion, downstream of everything, dominates) 1.2 s instead of
1.25 s, the same scores. The parts run a few at a time, each on one onnxruntime thread
(onnxruntime releases the GIL while it runs).

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
from mmcompile.reference import onnxruntime_session as session
from mmcompile.reference import run_onnxruntime_many
from mmcompile.schedule import available_cores

_PREFIX = "mmc_cut"
# The float values sensitivities() holds at once (the inputs of every layer's changed part)
HELD_BYTES = 256 << 20


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
    the cores this process may use, at most 4), each on one onnxruntime thread.

    Only what a layer's quantization changes is run (:func:`changed_part`): the rest of
    each one-layer model computes what the float model computes, and is read from one run
    of the float model per sample (a layer of one modality branch never runs the others)."""
    workers = threads or min(4, available_cores())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in float_model.graph.node for a in n.attribute):
            # a node holding a subgraph reads tensors its inputs do not list: whole models,
            # each cut when it runs (a cut copies the float model, weights and all)
            def measure(layer: str) -> float | None:
                model = cut(float_model, quantized, [layer])
                return None if model is None else score(run_onnxruntime_many(model, feeds,
                                                                             threads=1))
            found = dict(zip(layers, pool.map(measure, layers)))
            return {layer: value for layer, value in found.items() if value is not None}
        parts = {}  # one cut at a time: only its changed part is kept
        for layer in layers:
            model = cut(float_model, quantized, [layer])
            if model is not None:
                parts[layer] = changed_part(model)
        return _measure_parts(float_model, parts, feeds, score, pool)


def changed_part(model: onnx.ModelProto) -> onnx.ModelProto:
    """The nodes of a model :func:`cut` from the float model (one without subgraphs) whose
    results differ from the float model's (the cut's own nodes and everything downstream of
    them), as a model whose inputs are what they read of the rest (float values) and whose
    outputs are the model outputs among them."""
    changed: set[str] = set()
    nodes = []
    for node in model.graph.node:
        if node.name.startswith(f"{_PREFIX}/") or any(t in changed for t in node.input):
            nodes.append(node)
            changed.update(t for t in node.output if t)
    constants = {i.name: i for i in model.graph.initializer}
    read = list(dict.fromkeys(t for n in nodes for t in n.input if t))
    part = helper.make_graph(
        nodes, model.graph.name,
        # untyped here: typed from the float values before a session is made (_typed)
        [onnx.ValueInfoProto(name=t) for t in read if t not in changed and t not in constants],
        [o for o in model.graph.output if o.name in changed],
        [constants[t] for t in read if t in constants])
    return helper.make_model(part, opset_imports=model.opset_import, ir_version=model.ir_version)


def _measure_parts(float_model: onnx.ModelProto, parts: Mapping[str, onnx.ModelProto],
                   feeds: Sequence[Mapping[str, np.ndarray]],
                   score: Callable[[list[dict[str, np.ndarray]]], float],
                   pool: ThreadPoolExecutor) -> dict[str, float]:
    """Each part run on the float model's values, its outputs over the float model's;
    layer -> score. The float values are held for as many samples at a time as fit
    :data:`HELD_BYTES`, and each part runs on those samples as one task."""
    wanted = list(dict.fromkeys(i.name for part in parts.values() for i in part.graph.input))
    probe = onnx.ModelProto()
    probe.CopyFrom(float_model)
    outputs = [o.name for o in float_model.graph.output]
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted
                              if t not in outputs and t not in feeds[0])
    float_run = session(probe)
    fetched = [o.name for o in float_run.get_outputs()]

    def float_values(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**feed, **dict(zip(fetched, float_run.run(fetched, dict(feed))))}

    first = float_values(feeds[0])
    sessions = dict(zip(parts, pool.map(
        lambda part: session(_typed(part, first), threads=1) if part.graph.output else None,
        parts.values())))  # a layer no output reads changes nothing
    at_once = max(1, HELD_BYTES // max(1, sum(v.nbytes for v in first.values())))
    results: dict[str, list[dict[str, np.ndarray]]] = {layer: [] for layer in parts}
    for start in range(0, len(feeds), at_once):
        held = [first if i == 0 else float_values(feeds[i])
                for i in range(start, min(start + at_once, len(feeds)))]

        def run(layer: str) -> list[dict[str, np.ndarray]]:
            part = sessions[layer]
            if part is None:
                return [{name: values[name] for name in outputs} for values in held]
            names = [o.name for o in part.get_outputs()]
            return [{**{name: values[name] for name in outputs},
                     **dict(zip(names, part.run(names, {i.name: values[i.name]
                                                        for i in part.get_inputs()})))}
                    for values in held]

        for layer, got in zip(parts, pool.map(run, parts)):
            results[layer].extend(got)
    return {layer: score(runs) for layer, runs in results.items()}


def _typed(part: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """``part`` with its inputs typed as ``values`` are."""
    typed = onnx.ModelProto()
    typed.CopyFrom(part)
    for value_info in typed.graph.input:
        array = values[value_info.name]
        value_info.CopyFrom(helper.make_tensor_value_info(
            value_info.name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape))
    return typed
