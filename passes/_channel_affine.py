"""Helpers shared by fuse-conv-bn and fold-scale-bias: the output-channel layout of Conv,
ConvTranspose, Gemm and MatMul weights, and folding a per-channel affine map into them."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from mmcompile.transform.rewrite import Pattern, const, constant_value, make_constant, op, var

PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def producer_pattern(op_type: str) -> Pattern:
    """``op_type(x, <constant weight>, [bias])`` captured as node ``producer``, weight ``w``."""
    return op(op_type, var("x"), const("w"), name="producer",
              allow_extra_inputs=op_type != "MatMul")


def output_rank(node: gs.Node, weight: np.ndarray) -> int | None:
    """Rank of the producer's output, or None when it is unknown."""
    if node.op in ("Conv", "ConvTranspose"):
        return weight.ndim  # [N, C, *spatial], with as many spatial dims as the kernel
    if node.op == "Gemm":
        return 2
    shape = node.outputs[0].shape
    return len(shape) if shape is not None else None


def output_channels(node: gs.Node, weight: np.ndarray) -> int | None:
    """Number of output channels (Conv: axis 1, Gemm/MatMul: last axis), or None if unsupported.

    Only floating-point weights qualify: folding rescales them.
    """
    if not np.issubdtype(weight.dtype, np.floating):
        return None
    if node.op == "Conv" and weight.ndim >= 3:
        return weight.shape[0]
    if node.op == "ConvTranspose" and weight.ndim >= 3:
        return weight.shape[1] * int(node.attrs.get("group", 1))
    if node.op == "Gemm" and weight.ndim == 2:
        return weight.shape[0] if node.attrs.get("transB", 0) else weight.shape[1]
    if node.op == "MatMul" and weight.ndim == 2:
        return weight.shape[1]
    return None


def _scale_weight(node: gs.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``weight`` (float64) with each output channel multiplied by ``scale[c]``."""
    if node.op == "Conv":  # [C_out, C_in / group, *kernel]
        return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    if node.op == "ConvTranspose":  # [C_in, C_out / group, *kernel]; channel = g * C_out/g + j
        group = int(node.attrs.get("group", 1))
        c_in, per_group = weight.shape[0], weight.shape[1]
        grouped = weight.reshape((group, c_in // group, per_group) + weight.shape[2:])
        s = scale.reshape((group, 1, per_group) + (1,) * (weight.ndim - 2))
        return (grouped * s).reshape(weight.shape)
    if node.op == "Gemm" and node.attrs.get("transB", 0):  # [N, K]
        return weight * scale[:, None]
    return weight * scale  # Gemm [K, N], MatMul [K, N]


def _optional_input(node: gs.Node, index: int) -> tuple[bool, np.ndarray | None]:
    """(present, value) of an optional input; value is None when present but not constant."""
    if len(node.inputs) <= index or not node.inputs[index].name:
        return False, None
    return True, constant_value(node.inputs[index])


def fold_channel_affine(node: gs.Node, weight: np.ndarray, scale: np.ndarray | None,
                        shift: np.ndarray | None,
                        outputs: list[gs.Tensor]) -> list[gs.Node] | None:
    """The producer ``node`` rewritten to compute ``scale[c] * node(x) + shift[c]`` per channel.

    Args:
        node: a Conv, ConvTranspose, Gemm or MatMul whose input 1 is the constant ``weight``.
        weight: that weight's value.
        scale: per-output-channel factors, shape [C] (None: all ones).
        shift: per-output-channel addends, shape [C] (None: no shift).
        outputs: the tensors the new node writes (the matched root's outputs).

    Returns:
        The replacement nodes, or None when the producer cannot absorb the map: its bias is not
        constant, or a shift would go into a MatMul whose input is not 2-D.
    """
    dtype = weight.dtype
    inputs, attrs, op_type = list(node.inputs[:2]), dict(node.attrs), node.op
    if scale is not None:
        scaled = _scale_weight(node, weight.astype(np.float64), scale).astype(dtype)
        inputs[1] = make_constant(f"{node.name}/weight", scaled)
    if scale is None:
        scale = np.ones(output_channels(node, weight))
    if node.op in ("Conv", "ConvTranspose"):
        present, bias = _optional_input(node, 2)
        if present and bias is None:
            return None
        if present or shift is not None:
            new_bias = (0.0 if bias is None else bias.astype(np.float64)) * scale
            new_bias = new_bias + (0.0 if shift is None else shift)
            inputs.append(make_constant(f"{node.name}/bias", new_bias.astype(dtype)))
    elif node.op == "Gemm":
        present, c = _optional_input(node, 2)
        if present and c is None:
            return None
        if present or shift is not None:
            beta = float(attrs.get("beta", 1.0))
            new_c = (0.0 if c is None else c.astype(np.float64) * beta) * scale
            new_c = new_c + (0.0 if shift is None else shift)
            inputs.append(make_constant(f"{node.name}/C", np.asarray(new_c).astype(dtype)))
            attrs["beta"] = 1.0
    elif shift is not None:  # MatMul: the shift needs Gemm's C, which only takes 2-D A
        if node.inputs[0].shape is None or len(node.inputs[0].shape) != 2:
            return None
        op_type, attrs = "Gemm", {}
        inputs.append(make_constant(f"{node.name}/C", shift.astype(dtype)))
    return [gs.Node(op_type, name=node.name, attrs=attrs, inputs=inputs, outputs=outputs)]
