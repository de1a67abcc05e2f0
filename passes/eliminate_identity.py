"""eliminate-identity: remove nodes that return their input unchanged.

Exporters and earlier passes leave no-ops behind: Identity, inference-mode Dropout, a Cast to the
dtype the tensor already has, a Reshape/Expand to its own shape, an identity Transpose, a
single-input Concat/Sum/Max/Min/Mean, ``x + 0``/``x - 0``/``x * 1``/``x / 1``, a Slice that
covers the whole tensor and a Pad by zeros. Each costs a kernel launch and a copy at run time and
hides patterns from the fusions that follow, so they are removed: consumers read the input.

Each kind is a :class:`RewriteRule` (a pattern and a check) run by the shared driver.
onnx-graphsurgeon has nothing of the kind (``cleanup`` drops only dead nodes). onnxscript's
rewriter and onnx_ir have some of these rules, but on their own IR (a proto round trip that
rebuilds this graph) and fewer of them: Identity only in onnx_ir; ``x * 1`` and friends only
for scalar constants, and no whole-tensor Slice, zero Pad or single-input Concat, in onnxscript.

A no-op is decided from static facts only: constant operands and the input's inferred shape.
When the shape is unknown (a symbolic dim where a 1 or a concrete size matters) the node stays.
``x + 0`` turns ``-0.0`` into ``+0.0``; removing it keeps ``-0.0``, a difference no comparison
or later op can observe except through the sign of a division by zero.

Graph inputs and outputs keep their names: a node writing a graph output is removed only when
its input is written by a node that can write the graph output instead (the input is not a
graph input or output, nor read by anyone else); otherwise the node stays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from mmcompile.ir import Graph
from mmcompile.transform import Pass, PassContext, PassResult, register_pass
from mmcompile.transform.rewrite import (Match, Pattern, RewriteRule, apply_rules, axes_of,
                                         const, constant_value, op, var)

# Slice ends at least this large mean "to the end" (exporters write INT64_MAX or INT32_MAX).
_TO_THE_END = 2**31 - 1

_Shape = Sequence[int | str | None] | None


def _noop(name: str, pattern: Pattern, is_noop: Callable[[Match, Graph], bool]) -> RewriteRule:
    """A rule removing nodes matching ``pattern`` (input bound as ``x``) where ``is_noop``."""
    # Returning the input tensor tells the driver to forward it to the node's readers.
    return RewriteRule(name, pattern, lambda m, g: m["x"] if is_noop(m, g) else None)


# -- checks -------------------------------------------------------------------------------------

def _static(shape: _Shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def _keeps_shape(shape: _Shape, other: Sequence[int]) -> bool:
    """Broadcasting a tensor of ``shape`` against ``other`` leaves its shape unchanged."""
    if shape is None or len(other) > len(shape):
        return False
    return all(o == 1 or (isinstance(d, int) and d == o)
               for d, o in zip(reversed(list(shape)), reversed(list(other))))


def _is_false(tensor: gs.Tensor | None) -> bool:
    """An absent optional input or a constant false."""
    if tensor is None or not tensor.name:
        return True
    value = constant_value(tensor)
    return value is not None and not value.any()


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def _const_input(node: gs.Node, index: int) -> np.ndarray | None:
    tensor = _input(node, index)
    return None if tensor is None else constant_value(tensor)


def _dropout_noop(m: Match, g: Graph) -> bool:
    node = m.root
    if g.opset < 7 and not node.attrs.get("is_test", 0):
        return False  # before opset 7, Dropout trains unless told is_test
    if not _is_false(_input(node, 2)):
        return False
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    return mask is None or not mask.name or (
        not mask.outputs and all(t is not mask for t in g.gs.outputs))


def _onnx_dtype(dtype) -> int | None:
    if dtype is None:
        return None
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        return None


def _cast_noop(m: Match, g: Graph) -> bool:
    dtype = _onnx_dtype(m["x"].dtype)
    return dtype is not None and dtype == m.root.attrs.get("to")


def _cast_like_noop(m: Match, g: Graph) -> bool:
    dtype = _onnx_dtype(m["x"].dtype)
    return dtype is not None and dtype == _onnx_dtype(m["like"].dtype)


def _reshape_noop(m: Match, g: Graph) -> bool:
    shape, target = m["x"].shape, [int(t) for t in m.values["shape"].reshape(-1)]
    allowzero = m.root.attrs.get("allowzero", 0)
    if shape is None or len(target) != len(shape):
        return False
    inferred = [i for i, t in enumerate(target) if t == -1]
    for d, t in zip(shape, target):
        if (t == 0 and not allowzero) or t == -1:
            continue  # 0 copies the input dim; -1 is checked below
        if not (isinstance(d, int) and d == t):
            return False
    # With every other dim kept, a single -1 resolves to the input's own dim, unless another
    # dim is 0 (then -1 is ambiguous).
    return len(inferred) == 0 or (len(inferred) == 1 and all(
        d != 0 for i, d in enumerate(shape) if i != inferred[0]))


def _transpose_noop(m: Match, g: Graph) -> bool:
    perm = m.root.attrs.get("perm")
    if perm is None:  # the default reverses the dims
        return m["x"].shape is not None and len(m["x"].shape) <= 1
    return list(perm) == list(range(len(perm)))


def _expand_noop(m: Match, g: Graph) -> bool:
    return _keeps_shape(m["x"].shape, [int(t) for t in m.values["shape"].reshape(-1)])


def _squeeze_noop(m: Match, g: Graph) -> bool:
    # No axes (or empty ones) squeezes every dim of size 1: a no-op only if there is none.
    node = m.root
    axes = axes_of(node)
    if axes is None and _input(node, 1) is not None:
        return False
    shape = m["x"].shape
    return (axes is None or axes.size == 0) and _static(shape) and 1 not in shape


def _unsqueeze_noop(m: Match, g: Graph) -> bool:
    axes = axes_of(m.root)
    return axes is not None and axes.size == 0


def _always(m: Match, g: Graph) -> bool:
    return True


def _neutral(value: float) -> Callable[[Match, Graph], bool]:
    """``x op c`` is ``x`` when every element of c is exactly ``value`` and broadcasting c
    against x leaves x's shape (the dtype is x's: ONNX requires both operands to share it)."""
    def check(m: Match, g: Graph) -> bool:
        c = m.values["c"]
        return c.size > 0 and bool(np.all(c == value)) and _keeps_shape(m["x"].shape, c.shape)
    return check


def _slice_noop(m: Match, g: Graph) -> bool:
    node, shape = m.root, m["x"].shape
    starts, ends = m.values["starts"].reshape(-1), m.values["ends"].reshape(-1)
    axes, steps = _const_input(node, 3), _const_input(node, 4)
    if not shape or (_input(node, 3) is not None and axes is None) or \
            (_input(node, 4) is not None and steps is None):
        return False
    axes = np.arange(len(starts)) if axes is None else axes.reshape(-1)
    steps = np.ones(len(starts), np.int64) if steps is None else steps.reshape(-1)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        dim = shape[int(axis) % len(shape)]
        static = isinstance(dim, int)
        if step != 1 or not (start == 0 or (static and start <= -dim)):
            return False
        if not ((static and end >= dim) or end >= _TO_THE_END):
            return False
    return True


def _pad_noop(m: Match, g: Graph) -> bool:
    # Padding by zero copies the input whatever the mode (constant, reflect, edge, wrap).
    pads = np.asarray(m.root.attrs["pads"]) if "pads" in m.root.attrs else _const_input(m.root, 1)
    return pads is not None and not pads.any()


_x = var("x")
RULES = [
    _noop("identity", op("Identity", _x), _always),
    _noop("dropout", op("Dropout", _x, allow_extra_inputs=True), _dropout_noop),
    _noop("cast", op("Cast", _x), _cast_noop),
    _noop("cast", op("CastLike", _x, var("like")), _cast_like_noop),
    _noop("reshape", op("Reshape", _x, const("shape")), _reshape_noop),
    _noop("transpose", op("Transpose", _x), _transpose_noop),
    _noop("expand", op("Expand", _x, const("shape")), _expand_noop),
    _noop("squeeze", op("Squeeze", _x, allow_extra_inputs=True), _squeeze_noop),
    _noop("unsqueeze", op("Unsqueeze", _x, allow_extra_inputs=True), _unsqueeze_noop),
    *[_noop(kind.lower(), op(kind, _x), _always)
      for kind in ("Concat", "Sum", "Max", "Min", "Mean")],
    _noop("add", op("Add", _x, const("c")), _neutral(0)),
    _noop("sub", op("Sub", _x, const("c")), _neutral(0)),
    _noop("mul", op("Mul", _x, const("c")), _neutral(1)),
    _noop("div", op("Div", _x, const("c")), _neutral(1)),
    _noop("slice", op("Slice", _x, const("starts"), const("ends"), allow_extra_inputs=True),
          _slice_noop),
    _noop("pad", op("Pad", _x, allow_extra_inputs=True), _pad_noop),
]


@register_pass
class EliminateIdentity(Pass):
    name = "eliminate-identity"
    description = "remove no-op nodes (Identity, same-dtype Cast, x*1, whole-tensor Slice, ...)"
    opt_level = 1

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed: dict[str, int] = {}
        # One sweep removes chains (readers are rewired before they are visited); a removal can
        # still free a Dropout mask read only by a removed node, hence the loop.
        while counts := apply_rules(graph, RULES):
            for kind, n in counts.items():
                removed[kind] = removed.get(kind, 0) + n
        return PassResult.from_stats(nodes_removed=sum(removed.values()),
                                     **dict(sorted(removed.items())))
