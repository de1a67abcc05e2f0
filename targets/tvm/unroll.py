"""``Loop`` and ``Scan`` whose iteration counts are known at compile time, unrolled for TVM.

TVM 0.27's Relax ONNX importer has no ``Loop`` or ``Scan`` converter. The loops real exported
models carry mostly run a count fixed by the model's shapes: a TorchScript ``for t in
range(x.size(1))`` becomes a ``Loop`` whose trip count ``M`` folds to a constant once the input
shapes are fixed (``compile`` fixes them to the example inputs), and a ``Scan`` walks the
static length of its scan inputs. Such a loop is a straight-line graph: each iteration is a
copy of the body with its iteration number (a constant), its loop-carried values wired from
the iteration before, and its scan outputs stacked at the end (``Unsqueeze`` + ``Concat``).
The copies then import, fuse and schedule like any other nodes, so a recurrent body gets
the same fused kernels as the rest of the model, where a run-time loop would call the body's
kernels one by one from the VM.

Not unrolled (the target refuses the node with the reason, and the planner's fallback
target runs it): a trip count that is not a compile-time constant, a body that computes its
own condition (an early exit, e.g. tf2onnx's ``while`` loops), nested control flow in the
body, opset-8 ``Scan`` (``sequence_lens``), and loops whose unrolled size exceeds
:data:`MAX_UNROLLED_NODES` (compile time grows with it).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmcompile.ir import Graph
from mmcompile.transform.rewrite import Match, NodeBuilder, fresh_name, has_input

MAX_UNROLLED_NODES = 20_000  # iterations x body nodes


def _scalar(tensor: gs.Tensor):
    """The value of a one-element constant, else None."""
    if isinstance(tensor, gs.Constant) and np.asarray(tensor.values).size == 1:
        return np.asarray(tensor.values).item()
    return None


def _through_identities(tensor: gs.Tensor) -> gs.Tensor:
    while tensor.inputs and tensor.inputs[0].op == "Identity":
        tensor = tensor.inputs[0].inputs[0]
    return tensor


def _common_refusal(node: gs.Node, body: gs.Graph | None, iterations: int) -> str | None:
    if body is None:
        return "it has no body"
    if any(list(inner.subgraphs()) for inner in body.nodes):
        return "its body holds nested control flow (If / Loop / Scan)"
    if iterations * max(1, len(body.nodes)) > MAX_UNROLLED_NODES:
        return (f"{iterations} iterations of a {len(body.nodes)}-node body exceed "
                f"{MAX_UNROLLED_NODES} unrolled nodes")
    return None


def trip_count(node: gs.Node) -> int | None:
    """A ``Loop``'s iteration count when it is known at compile time, else None."""
    if not has_input(node, 0):
        return None
    count = _scalar(node.inputs[0])
    return None if count is None else int(count)


def loop_refusal(node: gs.Node, graph: Graph) -> str | None:
    """Why a ``Loop`` cannot be unrolled, or None."""
    body = node.attrs.get("body")
    count = trip_count(node)
    if count is None:
        return ("its trip count is not a compile-time constant (fix the input shapes it "
                "depends on, e.g. with example inputs or --input-shape)")
    if has_input(node, 1) and _scalar(node.inputs[1]) != 1:
        return "its initial condition is not a constant true"
    if body is not None:
        cond = _through_identities(body.outputs[0])
        if cond is not body.inputs[1] and _scalar(cond) not in (True, 1):
            return "its body computes the loop condition (an early exit): not unrolled"
        scans = len(body.outputs) - 1 - (len(node.inputs) - 2)
        if count < 1 and scans:
            return "it runs no iteration and has scan outputs (empty tensors)"
    return _common_refusal(node, body, count)


def _scan_layout(node: gs.Node, graph: Graph):
    """``(states, scan inputs, input axes, input directions, output axes, output directions,
    length)`` of a ``Scan`` (axes normalized), or a refusal string."""
    if (graph.gs.opset or 0) < 9:
        return "opset-8 Scan (with sequence_lens) is not supported"
    count = int(node.attrs.get("num_scan_inputs", 0))
    states, scanned = node.inputs[:len(node.inputs) - count], node.inputs[len(node.inputs) - count:]
    if not scanned:
        return "it has no scan inputs"
    in_axes = list(node.attrs.get("scan_input_axes", [0] * count))
    in_dirs = list(node.attrs.get("scan_input_directions", [0] * count))
    lengths = set()
    for j, x in enumerate(scanned):
        if x.shape is None:
            return f"the rank of its scan input '{x.name}' is unknown"
        in_axes[j] %= len(x.shape)
        dim = x.shape[in_axes[j]]
        if not isinstance(dim, int) or dim < 0:
            return (f"the sequence length of its scan input '{x.name}' is not static (fix "
                    f"the input shapes, e.g. with example inputs or --input-shape)")
        lengths.add(dim)
    if len(lengths) != 1:
        return f"its scan inputs have different lengths {sorted(lengths)}"
    outputs = len(node.outputs) - len(states)
    out_axes = list(node.attrs.get("scan_output_axes", [0] * outputs))
    out_dirs = list(node.attrs.get("scan_output_directions", [0] * outputs))
    body = node.attrs.get("body")
    for k, axis in enumerate(out_axes):
        if axis < 0:  # counted from the end of the stacked rank: one more than the element's
            element = body.outputs[len(states) + k] if body is not None else None
            if element is None or element.shape is None:
                return f"scan output {k} has a negative axis and an element of unknown rank"
            out_axes[k] = axis + len(element.shape) + 1
    return states, scanned, in_axes, in_dirs, out_axes, out_dirs, lengths.pop()


def _scan_plan(node: gs.Node, graph: Graph):
    """:func:`_scan_layout`, or why the ``Scan`` cannot be unrolled (a string)."""
    layout = _scan_layout(node, graph)
    if isinstance(layout, str):
        return layout
    length = layout[-1]
    if length < 1 and len(node.outputs) > len(layout[0]):
        return "its scan inputs are empty and it has scan outputs (empty tensors)"
    return _common_refusal(node, node.attrs.get("body"), length) or layout


def scan_refusal(node: gs.Node, graph: Graph) -> str | None:
    """Why a ``Scan`` cannot be unrolled, or None."""
    plan = _scan_plan(node, graph)
    return plan if isinstance(plan, str) else None


class _Unroller(NodeBuilder):
    """Appends the nodes of an unrolled loop: body copies, slices and stacks."""

    def __init__(self, node: gs.Node, opset: int):
        super().__init__(node.name)
        self.node, self.opset = node, opset

    def body(self, body: gs.Graph, bound: list[gs.Tensor], tag: str) -> list[gs.Tensor]:
        """One copy of ``body`` with its inputs bound to ``bound``: its output tensors.
        Tensors the body makes get fresh names; outer-scope tensors and constants are read
        as they are."""
        local = {id(t) for t in body._local_tensors().values()
                 if not isinstance(t, gs.Constant)}
        mapping = {id(b): t for b, t in zip(body.inputs, bound, strict=True)}

        def copy(t: gs.Tensor) -> gs.Tensor:
            if t.is_empty():
                return gs.Variable.empty()
            if id(t) not in mapping and id(t) in local:
                mapping[id(t)] = gs.Variable(fresh_name(f"{self.node.name}/{tag}/{t.name}"),
                                             dtype=t.dtype, shape=t.shape)
            return mapping.get(id(t), t)
        body.toposort()
        for inner in body.nodes:
            self.nodes.append(gs.Node(inner.op, name=fresh_name(f"{self.node.name}/{tag}/"
                                                                f"{inner.name}"),
                                      attrs=dict(inner.attrs), domain=inner.domain,
                                      inputs=[copy(t) for t in inner.inputs],
                                      outputs=[copy(t) for t in inner.outputs]))
        return [copy(t) for t in body.outputs]

    def stack(self, values: list[gs.Tensor], axis: int, out: gs.Tensor) -> None:
        """``out`` = ``values`` stacked along a new ``axis`` (>= 0)."""
        if self.opset >= 13:
            expanded = [self("Unsqueeze", [v, self.const("axes", np.array([axis]))])
                        for v in values]
        else:
            expanded = [self("Unsqueeze", [v], {"axes": [axis]}) for v in values]
        self("Concat", expanded, {"axis": axis}, out=out)

    def forward(self, value: gs.Tensor, out: gs.Tensor) -> None:
        self("Identity", [value], out=out)


def unroll_loop(m: Match, graph: Graph) -> list[gs.Node] | None:
    """The ``Loop`` at ``m.root`` as straight-line nodes (None: it cannot be unrolled)."""
    node = m.root
    if loop_refusal(node, graph):
        return None
    body = node.attrs["body"]
    carried = list(node.inputs[2:])
    unroller = _Unroller(node, graph.gs.opset or 13)
    steps: list[list[gs.Tensor]] = [[] for _ in range(len(body.outputs) - 1 - len(carried))]
    iteration_type = body.inputs[0].dtype or np.int64
    for i in range(trip_count(node)):
        bound = [unroller.const(f"iteration{i}", np.array(i, dtype=iteration_type)),
                 unroller.const("true", np.array(True)), *carried]
        outs = unroller.body(body, bound, f"iteration{i}")
        carried = outs[1:1 + len(carried)]
        for k, value in enumerate(outs[1 + len(carried):]):
            steps[k].append(value)
    for out, value in zip(node.outputs[:len(carried)], carried, strict=True):
        unroller.forward(value, out)
    for out, values in zip(node.outputs[len(carried):], steps, strict=True):
        unroller.stack(values, 0, out)
    return unroller.nodes


def unroll_scan(m: Match, graph: Graph) -> list[gs.Node] | None:
    """The ``Scan`` at ``m.root`` as straight-line nodes (None: it cannot be unrolled)."""
    node = m.root
    plan = _scan_plan(node, graph)
    if isinstance(plan, str):
        return None
    states, scanned, in_axes, in_dirs, out_axes, out_dirs, length = plan
    body = node.attrs["body"]
    unroller = _Unroller(node, graph.gs.opset)
    states = list(states)
    steps: list[list[gs.Tensor]] = [[] for _ in range(len(node.outputs) - len(states))]
    for t in range(length):
        slices = [unroller("Gather", [x, unroller.const(
            f"step{t}", np.array(length - 1 - t if direction else t, np.int64))], {"axis": axis})
            for x, axis, direction in zip(scanned, in_axes, in_dirs, strict=True)]
        outs = unroller.body(body, [*states, *slices], f"step{t}")
        states = outs[:len(states)]
        for k, value in enumerate(outs[len(states):]):
            steps[k].append(value)
    for out, value in zip(node.outputs[:len(states)], states, strict=True):
        unroller.forward(value, out)
    for k, (out, values) in enumerate(zip(node.outputs[len(states):], steps, strict=True)):
        unroller.stack(values[::-1] if out_dirs[k] else values, out_axes[k], out)
    return unroller.nodes
