"""QDQ graph -> the quantized layers the accelerator takes, node by node.

A layer is the pattern onnxruntime's quantizer (and :mod:`mmcompile.quantize`) writes around
each quantized contraction::

    DequantizeLinear(xq) ─┐
    DequantizeLinear(W)  ─┼─ Conv | MatMul | Gemm ─ [Relu | Clip] ─ QuantizeLinear ─> yq
    DequantizeLinear(b)  ─┘  (bias: int32, Conv and Gemm only)

with ``xq`` a per-tensor quantized activation (uint8 or int8), ``W`` constant int8 weights,
symmetric per channel, and one ``QuantizeLinear`` reading the result. Every node of the
pattern goes to the accelerator, so a stage of accelerator layers reads and writes the
*quantized* tensors: it consumes ``xq`` as the graph's ``QuantizeLinear`` produced it (on
the host) and hands back ``yq``, exactly the integers the QDQ graph's ``QuantizeLinear``
produces (:mod:`.layers` states the arithmetic). Nothing is quantized or dequantized at the
stage boundary, so the boundary adds no rounding of its own.

What stays on the host, with the reason recorded: every other op; a contraction whose
pattern is incomplete (a float input, a float bias, a result read by anything other than
one ``QuantizeLinear``); one :func:`~.lowering.supports` refuses (the accelerator's ops,
grouped convolutions, accumulator overflow); and one whose input or weight
``DequantizeLinear`` also feeds a node the accelerator does not run (that node needs the
float tensor on the host). Layers that share weights (one ``DequantizeLinear`` read by
several) each take their own copy: the planner pulls constant-only nodes into every stage
that reads them.
1-D convolutions run as 2-D ones with a height of 1.

Max pooling, when the description lists ``MaxPool``, is a layer of its own: the pattern the
quantizer leaves between convolutions, ``DequantizeLinear(xq) -> [Relu] -> MaxPool -> [Relu]
-> QuantizeLinear -> yq`` (:class:`~.layers.QPool` states its integer semantics), so a CNN
branch's pooling no longer splits it into accelerator and host pieces. Refused with the
reason: a read ``Indices`` output, ``auto_pad``, a ``ceil_mode`` window hanging over the
edge, a Clip. ``AveragePool`` stays on the host (its float mean is not an integer
operation the ALU could reproduce bit for bit). A ReLU the quantizer left between two
quantizations (``DequantizeLinear -> Relu -> QuantizeLinear``, after a layer whose output it
quantized) is the same layer with a 1x1 window, so it no longer splits a stage either.
Such ALU-only layers stay on the array only when joined (through each other) to a
contraction there or to the graph's inputs and outputs: one between two host nodes (a ReLU
between two depthwise convolutions) would only add two stage boundaries.

Written for this project (no library matches QDQ patterns into an accelerator's layers):
the pattern is fixed by onnxruntime's quantizer, and matching it on the graph-surgeon graph
keeps the node names the planner places.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from mmcompile.targets.accel.layers import Layer, LayerError, QConv2d, QGemm, QParams, QPool
from mmcompile.targets.accel.lowering import supports
from mmcompile.targets.accel.spec import AccelSpec

if TYPE_CHECKING:
    from mmcompile.ir import Graph

CONTRACTIONS = ("Conv", "MatMul", "Gemm")
POOLS = ("MaxPool",)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class Match:
    """One layer found in a graph: the layer, the nodes it is made of, the quantized tensors
    it reads and writes, and their shapes in the graph (a 1-D convolution's differ from the
    layer's 2-D ones by the unit height)."""

    layer: Layer
    nodes: list[str]
    input: str
    output: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    shared: tuple[str, ...] = ()  # input and weight DequantizeLinear (checked for readers)


@dataclass
class Analysis:
    """Every contraction of a graph, taken (``layers``) or refused (``refused``, with why),
    and which layer each node belongs to."""

    layers: dict[str, Match] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)        # node -> taken layer
    refused_owner: dict[str, str] = field(default_factory=dict)  # node -> refused layer
    quantized: bool = False

    def reason(self, node: Any) -> str:
        """Why ``node`` (not taken) stays on the host."""
        if node.name in self.refused:
            return self.refused[node.name]
        if node.name in self.refused_owner:
            layer = self.refused_owner[node.name]
            return f"part of layer '{layer}', which it cannot run: {self.refused[layer]}"
        if node.op in QDQ_OPS:
            return f"a {node.op} around float ops, outside the quantized layers it runs"
        return f"{node.op} is not a quantized Conv/MatMul/Gemm/MaxPool layer"


class _Refuse(Exception):
    """A contraction does not fit the pattern; the message says how."""


def _producer(tensor: Any, op: str) -> Any:
    node = tensor.inputs[0] if tensor is not None and tensor.inputs else None
    if node is None or node.op != op:
        found = f"{node.op} '{node.name}'" if node is not None else "a graph input or constant"
        raise _Refuse(f"'{getattr(tensor, 'name', '?')}' comes from {found}, not a {op}")
    return node


def _const(tensor: Any, what: str) -> np.ndarray:
    values = getattr(tensor, "values", None)
    if values is None:
        raise _Refuse(f"the {what} is not a constant")
    return np.asarray(values)


def _qparams(node: Any, what: str) -> QParams:
    """Per-tensor scale and zero point of a (De)QuantizeLinear ``node``."""
    scale = _const(node.inputs[1], f"{what} scale").astype(np.float32)
    if len(node.inputs) > 2 and node.inputs[2].name:
        zero = _const(node.inputs[2], f"{what} zero point")
    else:
        zero = np.zeros((), np.uint8)  # ONNX's default: uint8, zero point 0
    if scale.size != 1 or zero.size != 1:
        raise _Refuse(f"the {what} is quantized per channel; the accelerator takes one scale "
                      f"per activation tensor")
    if str(zero.dtype) not in ("uint8", "int8"):
        raise _Refuse(f"the {what} is {zero.dtype}, not uint8 or int8")
    return QParams(float(scale.reshape(())), int(zero.reshape(())), str(zero.dtype))


def _static(tensor: Any, shapes: dict[str, tuple]) -> tuple[int, ...]:
    shape = tensor.shape if tensor.shape is not None else shapes.get(tensor.name)
    if shape is None or not all(isinstance(d, int) and d > 0 for d in shape):
        raise _Refuse(f"the shape of '{tensor.name}' is not static ({shape})")
    return tuple(int(d) for d in shape)


def _single_reader(tensor: Any, outputs: set[str]) -> Any:
    readers = list(tensor.outputs)
    if tensor.name in outputs:
        raise _Refuse(f"its float result '{tensor.name}' is an output of the graph")
    if len(readers) != 1:
        names = ", ".join(f"{n.op} '{n.name}'" for n in readers) or "nothing (a graph output)"
        raise _Refuse(f"its result is read by {names}, not by one QuantizeLinear")
    return readers[0]


def _weights(node: Any, contraction: Any, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights and per-channel scales behind a weight DequantizeLinear."""
    weight = _const(node.inputs[0], "weight")
    if weight.dtype != np.int8:
        raise _Refuse(f"its weights are {weight.dtype}, not int8")
    scale = _const(node.inputs[1], "weight scale").astype(np.float32).reshape(-1)
    if len(node.inputs) > 2 and node.inputs[2].name:
        zero = _const(node.inputs[2], "weight zero point")
        if np.any(zero != 0):
            raise _Refuse("its weights are not symmetric (a nonzero weight zero point)")
    if scale.size > 1 and node.attrs.get("axis", 1) % weight.ndim != axis:
        raise _Refuse(f"its weights are quantized along axis {node.attrs.get('axis', 1)}, "
                      f"not the output channels (axis {axis})")
    return weight, scale


def _bias(contraction: Any, index: int, x: QParams, w_scale: np.ndarray,
          channels: int) -> tuple[np.ndarray | None, list[Any]]:
    """The int32 bias (scale ``sx * sw``) at input ``index``, and its DequantizeLinear."""
    if len(contraction.inputs) <= index or not contraction.inputs[index].name:
        return None, []
    node = _producer(contraction.inputs[index], "DequantizeLinear")
    bias = _const(node.inputs[0], "bias")
    if bias.dtype != np.int32 or bias.size != channels:
        raise _Refuse(f"its bias is {bias.dtype} {list(bias.shape)}, not int32 [{channels}]")
    scale = _const(node.inputs[1], "bias scale").astype(np.float32).reshape(-1)
    expected = np.float32(x.scale) * np.broadcast_to(w_scale, (channels,))
    if not np.allclose(np.broadcast_to(scale, (channels,)), expected, rtol=1e-6, atol=0):
        raise _Refuse("its bias scale is not input scale x weight scale")
    return bias.reshape(channels).astype(np.int32), [node]


def _epilogue(contraction: Any, outputs: set[str]) -> tuple[str | None, tuple, list[Any], Any]:
    """The optional Relu / Clip after the contraction and the QuantizeLinear that ends it
    (``outputs``: the graph's, which must not be float tensors of the pattern)."""
    reader = _single_reader(contraction.outputs[0], outputs)
    activation, clip, nodes = None, (None, None), []
    if reader.op in ("Relu", "Clip"):
        activation, nodes = reader.op.lower(), [reader]
        if reader.op == "Clip":
            bounds = [float(_const(t, "Clip bound").reshape(())) if t.name else None
                      for t in list(reader.inputs[1:3])]
            clip = (tuple(bounds) + (None, None))[:2]
        reader = _single_reader(reader.outputs[0], outputs)
    if reader.op != "QuantizeLinear":
        raise _Refuse(f"its result goes to {reader.op} '{reader.name}' in float, not to a "
                      f"QuantizeLinear")
    return activation, clip, nodes, reader


def _match(node: Any, shapes: dict[str, tuple], outputs: set[str]) -> Match:
    """The layer ``node`` (a Conv/MatMul/Gemm) heads, or :class:`_Refuse` saying why not."""
    x_dq = _producer(node.inputs[0], "DequantizeLinear")
    x = _qparams(x_dq, "input")
    xq = x_dq.inputs[0]
    in_shape = _static(xq, shapes)
    w_dq = _producer(node.inputs[1], "DequantizeLinear")
    activation, clip, act_nodes, q = _epilogue(node, outputs)
    y = _qparams(q, "output")
    out_shape = _static(q.outputs[0], shapes)
    common: dict[str, Any] = {"name": node.name, "x": x, "y": y, "activation": activation,
                              "clip": clip}
    if node.op == "Conv":
        weight, sw = _weights(w_dq, node, 0)
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            raise _Refuse("auto_pad is not supported (explicit pads only)")
        bias, b_nodes = _bias(node, 2, x, sw, weight.shape[0])
        rank = weight.ndim - 2
        if rank not in (1, 2):
            raise _Refuse(f"a {rank}-D convolution (the array runs 1-D and 2-D ones)")
        pads = _window(node, "pads", 2 * rank, 0)
        strides = _window(node, "strides", rank, 1)
        dilations = _window(node, "dilations", rank, 1)
        if rank == 1:
            weight = weight[:, :, None, :]
        shape, _, pads, strides, dilations = _as_2d(in_shape, [], pads, strides, dilations)
        layer: Layer = QConv2d(**common, weight=np.ascontiguousarray(weight), w_scale=sw,
                               bias=bias, input_shape=shape, strides=tuple(strides),
                               pads=tuple(pads), dilations=tuple(dilations),
                               groups=int(node.attrs.get("group", 1)))
    elif node.op == "Gemm":
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 \
                or node.attrs.get("beta", 1.0) != 1.0:
            raise _Refuse("a Gemm with transA, alpha or beta (only A @ B + C is run)")
        trans_b = bool(node.attrs.get("transB", 0))
        weight, sw = _weights(w_dq, node, 0 if trans_b else 1)
        weight = np.ascontiguousarray(weight.T if trans_b else weight)
        bias, b_nodes = _bias(node, 2, x, sw, weight.shape[1])
        layer = QGemm(**common, weight=weight, w_scale=sw, bias=bias, input_shape=in_shape,
                      op_type="Gemm")
    else:
        weight, sw = _weights(w_dq, node, 1)
        if weight.ndim != 2:
            raise _Refuse(f"its weights are {weight.ndim}-D (a batched MatMul)")
        layer, b_nodes = QGemm(**common, weight=weight, w_scale=sw, input_shape=in_shape,
                               op_type="MatMul"), []
    if int(np.prod(layer.output_shape)) != int(np.prod(out_shape)):
        raise _Refuse(f"its output shape {list(out_shape)} is not the layer's "
                      f"{list(layer.output_shape)}")
    nodes = [x_dq.name, w_dq.name, *(b.name for b in b_nodes), node.name,
             *(a.name for a in act_nodes), q.name]
    return Match(layer, nodes, xq.name, q.outputs[0].name, in_shape, out_shape,
                 (x_dq.name, w_dq.name))


def _as_2d(shape: tuple[int, ...], kernel: list[int], pads: list[int], strides: list[int],
           dilations: list[int]) -> tuple[tuple[int, ...], list[int], list[int], list[int],
                                          list[int]]:
    """A 1-D window over ``[N, C, L]`` as a 2-D one over ``[N, C, 1, L]`` (height 1, pads 0
    above and below); 2-D ones unchanged."""
    if len(shape) != 3:
        return shape, kernel, pads, strides, dilations
    return ((shape[0], shape[1], 1, shape[2]), [1, *kernel], [0, pads[0], 0, pads[1]],
            [1, *strides], [1, *dilations])


def _window(node: Any, name: str, rank: int, default: int) -> list[int]:
    """A window attribute of a Conv / MaxPool (``pads``, ``strides``, ...), its default
    repeated ``rank`` times when absent."""
    return [int(v) for v in node.attrs.get(name, [default] * rank)]


def _match_pool(node: Any, shapes: dict[str, tuple], outputs: set[str]) -> Match:
    """The pooling layer a MaxPool heads (``DequantizeLinear -> [Relu] -> MaxPool -> [Relu]
    -> QuantizeLinear``), or :class:`_Refuse` saying why not."""
    if len(node.outputs) > 1 and node.outputs[1].name and node.outputs[1].outputs:
        raise _Refuse("its Indices output is read")
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise _Refuse("auto_pad is not supported (explicit pads only)")
    before, nodes = node.inputs[0], []
    producer = before.inputs[0] if before.inputs else None
    if producer is not None and producer.op == "Relu":
        if len(before.outputs) != 1 or before.name in outputs:
            raise _Refuse(f"the Relu '{producer.name}' before it is read by other nodes")
        nodes, before = [producer], producer.inputs[0]
    x_dq = _producer(before, "DequantizeLinear")
    x = _qparams(x_dq, "input")
    xq = x_dq.inputs[0]
    in_shape = _static(xq, shapes)
    activation, _, act_nodes, q = _epilogue(node, outputs)
    if activation == "clip":
        raise _Refuse("a Clip after it (the accelerator clamps pools with a Relu only)")
    y = _qparams(q, "output")
    out_shape = _static(q.outputs[0], shapes)
    rank = len(in_shape) - 2
    if rank not in (1, 2):
        raise _Refuse(f"a {rank}-D pool (the accelerator runs 1-D and 2-D ones)")
    kernel = _window(node, "kernel_shape", rank, 1)
    pads = _window(node, "pads", 2 * rank, 0)
    strides = _window(node, "strides", rank, 1)
    dilations = _window(node, "dilations", rank, 1)
    shape, kernel, pads, strides, dilations = _as_2d(in_shape, kernel, pads, strides,
                                                     dilations)
    layer = QPool(node.name, x, y, shape, tuple(kernel), tuple(strides), tuple(pads),
                  tuple(dilations), "relu" if nodes or activation else None)
    if int(np.prod(layer.output_shape)) != int(np.prod(out_shape)):
        how = " (ceil_mode=1 adds a window at the edge)" if node.attrs.get("ceil_mode") else ""
        raise _Refuse(f"its output shape {list(out_shape)} is not the layer's "
                      f"{list(layer.output_shape)}{how}")
    members = [x_dq.name, *(n.name for n in nodes), node.name, *(a.name for a in act_nodes),
               q.name]
    return Match(layer, members, xq.name, q.outputs[0].name, in_shape, out_shape,
                 (x_dq.name,))


def _bare_relu(node: Any, outputs: set[str]) -> bool:
    """Whether ``node`` is a Relu between two quantizations (``DequantizeLinear -> Relu ->
    QuantizeLinear``), which no other layer's pattern holds."""
    producer = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    readers = node.outputs[0].outputs
    return (node.op == "Relu" and producer is not None and producer.op == "DequantizeLinear"
            and len(readers) == 1 and readers[0].op == "QuantizeLinear"
            and node.outputs[0].name not in outputs)


def _match_relu(node: Any, shapes: dict[str, tuple], outputs: set[str]) -> Match:
    """The layer of a :func:`_bare_relu` (a 1x1 "pool" with a ReLU clamp), or
    :class:`_Refuse` saying why not."""
    x_dq = _producer(node.inputs[0], "DequantizeLinear")
    q = node.outputs[0].outputs[0]
    x, y = _qparams(x_dq, "input"), _qparams(q, "output")
    xq = x_dq.inputs[0]
    in_shape = _static(xq, shapes)
    layer = QPool(node.name, x, y, (1, int(np.prod(in_shape)), 1, 1), (1, 1),
                  activation="relu", op_type="Relu")
    return Match(layer, [x_dq.name, node.name, q.name], xq.name, q.outputs[0].name, in_shape,
                 in_shape, (x_dq.name,))


def _inferred_shapes(graph: Graph) -> dict[str, tuple]:
    """Tensor name -> shape by ONNX shape inference (the quantizer's new tensors have none
    recorded), without touching ``graph``."""
    import onnx

    from mmcompile.ir import PROTO_LIMIT
    model = graph.to_onnx()
    if model.ByteSize() >= PROTO_LIMIT:
        return {}
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):  # a help, not a requirement
        return {}
    g = model.graph
    return {v.name: tuple(d.dim_value if d.HasField("dim_value") else None
                          for d in v.type.tensor_type.shape.dim)
            for v in (*g.input, *g.value_info, *g.output) if v.type.HasField("tensor_type")}


def _drop_isolated_alu_layers(result: Analysis, boundary: set[str]) -> bool:
    """Move to the host every pool or bare ReLU not joined (through other such layers) to a
    contraction on the array or to the graph's inputs and outputs (``boundary``): between
    two host nodes it would only add two stage boundaries. Returns whether any moved."""
    anchors = [n for n, m in result.layers.items() if not isinstance(m.layer, QPool)
               or m.input in boundary or m.output in boundary]
    producer = {m.output: n for n, m in result.layers.items()}
    readers: dict[str, list[str]] = {}
    for name, match in result.layers.items():
        readers.setdefault(match.input, []).append(name)
    joined, frontier = set(anchors), list(anchors)
    while frontier:
        match = result.layers[frontier.pop()]
        for other in (producer.get(match.input), *readers.get(match.output, ())):
            if other is not None and other not in joined:
                joined.add(other)
                frontier.append(other)
    alone = [n for n in result.layers if n not in joined]
    for name in alone:
        op = result.layers.pop(name).layer.op_type
        result.refused[name] = (f"a {op} with no accelerator layer next to it: alone on the "
                                f"array it would only add two stage boundaries")
    return bool(alone)


def analyse(graph: Graph, spec: AccelSpec) -> Analysis:
    """Every contraction of ``graph``: the layers ``spec`` runs and why the others stay on
    the host (see the module docstring)."""
    result = Analysis()
    nodes = list(graph.gs.nodes)
    result.quantized = any(n.op in QDQ_OPS for n in nodes)
    heads = CONTRACTIONS + POOLS
    shapes = _inferred_shapes(graph) if any(n.op in heads + ("Relu",) for n in nodes) else {}
    outputs = {t.name for t in graph.gs.outputs}
    members: dict[str, list[str]] = {}
    for node in nodes:
        relu = _bare_relu(node, outputs)
        if node.op not in heads and not relu:
            continue
        try:
            match = (_match_relu if relu else _match_pool if node.op in POOLS else _match)(
                node, shapes, outputs)
        except _Refuse as exc:
            result.refused[node.name] = f"not a quantized layer: {exc}"
            continue
        except LayerError as exc:
            result.refused[node.name] = str(exc)
            continue
        ok, reason = supports(spec, match.layer)
        members[node.name] = match.nodes
        if ok:
            result.layers[node.name] = match
        else:
            result.refused[node.name] = reason.removeprefix(f"not supported by {spec.name}: ")
    by_name = {n.name: n for n in nodes}
    boundary = outputs | {t.name for t in graph.gs.inputs}
    changed = True
    while changed:  # a dequantize also read by a host node keeps its layers on the host
        changed = _drop_isolated_alu_layers(result, boundary)
        taken = {member for name in result.layers for member in members[name]}
        for name, match in list(result.layers.items()):
            for what, dq in zip(("input", "weights"), match.shared):
                host = [r for r in by_name[dq].outputs[0].outputs if r.name not in taken]
                if host and name in result.layers:
                    del result.layers[name]
                    result.refused[name] = (f"its {what} DequantizeLinear also feeds "
                                            f"{host[0].op} '{host[0].name}', which runs on the "
                                            f"host")
                    changed = True
    for name, names in members.items():
        table = result.owner if name in result.layers else result.refused_owner
        for member in names:
            if name in result.layers or member not in result.owner:
                table.setdefault(member, name)
    return result
