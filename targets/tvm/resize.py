"""``Resize`` forms TVM's importer rejects or computes differently (used by legalize-for-tvm).

Measured on TVM 0.27 with onnx's node tests:

- ``axes`` and ``keep_aspect_ratio_policy`` are ignored (the importer fails on the short
  sizes): the constant roi / scales / sizes are spelled out over every axis, as onnx's
  reference does.
- TVM maps output to input coordinates with the ratio of the sizes, where ONNX uses the
  ``scales`` given; they differ whenever ``floor(in * scale) / in != scale`` (a 0.6
  downsample of 4 pixels is 2 pixels, ratio 0.5). ``antialias`` is ignored,
  ``half_pixel_symmetric`` is rejected, and ``align_corners`` to a single pixel divides by
  zero. Those Resizes are computed as what they are, a linear map per resized axis: a constant
  (out x in) matrix applied with MatMul. Its entries are the op's own definition evaluated
  on unit vectors by onnx's reference implementation (``onnx.reference``), so every mode,
  coordinate transformation, cubic coefficient, ``exclude_outside`` and antialias filter is
  exactly the reference's. A dense matrix costs ``in`` multiply-adds per output where an
  interpolation costs 1-16, which is why the form TVM computes right keeps TVM's kernel.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from mmcompile.ir import Graph
from mmcompile.transform.rewrite import (Match, NodeBuilder, fresh_name, has_input,
                                         has_static_shape)

_ROI, _SCALES, _SIZES = 1, 2, 3
_MAX_MATRIX = 1 << 22  # entries of one axis's matrix; larger Resizes stay with TVM


def _canonical(node: gs.Node) -> tuple[np.ndarray | None, ...] | None:
    """(roi, scales, sizes) over every axis, or None when they are not constants or the input's
    rank is unknown."""
    x = node.inputs[0]
    given = [node.inputs[i] if has_input(node, i) else None for i in (_ROI, _SCALES, _SIZES)]
    if not has_static_shape(x) \
            or any(t is not None and not isinstance(t, gs.Constant) for t in given):
        return None
    rank, shape = len(x.shape), np.array(x.shape, np.int64)
    axes = [a % rank for a in node.attrs.get("axes", range(rank))]
    roi, scales, sizes = (None if t is None or not t.values.size else np.asarray(t.values)
                          for t in given)
    if roi is not None:
        full = np.concatenate([np.zeros(rank), np.ones(rank)]).astype(roi.dtype)
        full[axes], full[[rank + a for a in axes]] = roi[:len(axes)], roi[len(axes):]
        roi = full
    if scales is not None:
        full = np.ones(rank, scales.dtype)
        full[axes] = scales
        scales = full
    if sizes is not None:
        full = shape.copy()
        full[axes] = sizes
        policy = node.attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            ratios = full[axes] / shape[axes]
            scale = ratios.min() if policy == "not_larger" else ratios.max()
            full[axes] = (scale * shape[axes] + 0.5).astype(np.int64)  # round half up
        sizes = full
    return roi, scales, sizes


def _tvm_differs(node: gs.Node, shape: np.ndarray, scales: np.ndarray | None,
                 out: np.ndarray) -> bool:
    attrs = node.attrs
    mode = attrs.get("coordinate_transformation_mode", "half_pixel")
    if attrs.get("antialias", 0) and attrs.get("mode", "nearest") != "nearest":
        return True
    if mode == "half_pixel_symmetric":
        return True
    if mode == "align_corners" and np.any((out == 1) & (shape != 1)):
        return True
    return scales is not None and not np.allclose(out / shape, scales, rtol=1e-6, atol=0)


def _axis_matrix(node: gs.Node, length: int, out_len: int, scale: float | None) -> np.ndarray:
    """(out_len, length): output j of the resized axis = sum_i W[j, i] * input i."""
    attrs = {k: v for k, v in node.attrs.items()
             if k not in ("axes", "keep_aspect_ratio_policy")}
    inputs, inits = ["x", "roi"], [helper.make_tensor("roi", TensorProto.FLOAT, [4], [0, 0, 1, 1])]
    if scale is not None:
        inputs.append("scales")
        inits.append(helper.make_tensor("scales", TensorProto.FLOAT, [2], [1.0, scale]))
    else:
        inputs += ["", "sizes"]
        inits.append(helper.make_tensor("sizes", TensorProto.INT64, [2], [length, out_len]))
    graph = helper.make_graph(
        [helper.make_node("Resize", inputs, ["y"], **attrs)], "axis",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [length, length])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    from onnx.reference import ReferenceEvaluator
    return ReferenceEvaluator(model).run(None, {"x": np.eye(length)})[0].T


def _as_matmuls(node: gs.Node, shape: np.ndarray, scales: np.ndarray | None,
                out: np.ndarray) -> list[gs.Node]:
    dtype = np.dtype(node.inputs[0].dtype)
    b = NodeBuilder(node.name, dtype)
    rank, y = len(shape), node.inputs[0]
    axes = [a for a in range(rank) if out[a] != shape[a]
            or (scales is not None and scales[a] != 1)]
    for n, axis in enumerate(axes):
        w = _axis_matrix(node, int(shape[axis]), int(out[axis]),
                         None if scales is None else float(scales[axis])).astype(dtype)
        last = n == len(axes) - 1
        target = node.outputs[0] if last else None
        if axis == rank - 1:
            y = b("MatMul", [y, b.const(f"axis{axis}", w.T.copy())], out=target)
        elif axis == rank - 2:
            y = b("MatMul", [b.const(f"axis{axis}", w), y], out=target)
        else:
            perm = [a for a in range(rank) if a != axis] + [axis]
            moved = b("MatMul", [b("Transpose", [y], {"perm": perm}),
                                 b.const(f"axis{axis}", w.T.copy())])
            y = b("Transpose", [moved], {"perm": list(np.argsort(perm))}, out=target)
    if not axes:
        b("Identity", [y], out=node.outputs[0])
    return b.nodes


def legalize(m: Match, graph: Graph) -> list[gs.Node] | None:
    """A ``Resize`` TVM imports and computes as ONNX defines it, or None to keep the node."""
    node = m.root
    canonical = _canonical(node)
    if canonical is None:
        return None
    roi, scales, sizes = canonical
    shape = np.array(node.inputs[0].shape, np.int64)
    out = sizes
    if out is None and scales is not None:
        out = np.floor(shape * scales.astype(np.float64)).astype(np.int64)
    dtype = node.inputs[0].dtype
    linear_map = (out is not None and node.attrs.get("coordinate_transformation_mode")
                  != "tf_crop_and_resize" and dtype is not None
                  and np.dtype(dtype).kind == "f"
                  and int(out.max()) * int(shape.max()) <= _MAX_MATRIX)
    if linear_map and _tvm_differs(node, shape, scales, out):
        return _as_matmuls(node, shape, scales, out)
    if "axes" not in node.attrs and "keep_aspect_ratio_policy" not in node.attrs:
        return None
    b = NodeBuilder(node.name)
    operands = [b.const(tag, v) if v is not None else gs.Variable.empty()
                for tag, v in (("roi", roi), ("scales", scales), ("sizes", sizes))]
    while operands and not operands[-1].name:
        operands.pop()
    attrs = {k: v for k, v in node.attrs.items() if k not in ("axes", "keep_aspect_ratio_policy")}
    return [gs.Node("Resize", name=fresh_name(node.name), inputs=[node.inputs[0], *operands],
                    outputs=m.outputs, attrs=attrs)]

