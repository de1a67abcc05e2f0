"""Differential fuzzing: seeded random models compiled by mmcompile and compared with onnxruntime.

    python -m mmcompile.fuzz --seeds 0:500 [--workers 2] [--save-failures DIR] [-v]

Each seed builds one small multimodal ONNX model (:func:`random_model`): an image branch of
convolution blocks and, for most seeds, a sequence branch of 1-D convolutions, joined by a
fusion head. The blocks are drawn from the layer kinds deployed vision and audio models use,
with every convolution configuration the CPU schedules special-case: dense, grouped and
depthwise convolutions, 1x1 to 7x7 windows, strides 1 and 2, dilation, symmetric, asymmetric
and no padding, odd spatial sizes, channel counts that do not divide the vector width, batch
norm, ReLU / LeakyReLU / sigmoid / tanh / HardSigmoid / HardSwish / clip (ReLU6) / SiLU / GELU,
squeeze-excitation, residual adds, max and average pools (ceil mode, padding), nearest and
linear ``Resize``, transposed convolutions (dense and depthwise), channel concatenation and
slices of a convolution's last axis (drawn from a second generator of the seed: the first
one draws what it drew before they were added).
A model's outputs include the last feature map itself, not only pooled features, so a wrong
pixel cannot average away.

Each model is compiled (``verify=False``, the whole graph as one stage) in a worker process
(:mod:`mmcompile.process_pool`: a crash costs one seed) and run on random inputs; every output
must be within ``tolerance * max(1, max|ref|)`` of onnxruntime with its graph optimizations
off (the model's own semantics). Outcomes: ``ok``, ``mismatch`` (wrong numbers), ``error``
(mmcompile raised on a valid model), ``crashed`` / ``timeout``.

Written here rather than taken from a library: onnx's node tests and hypothesis-based op
fuzzers check one op at a time, and the miscompiles this finds live in how the schedules and
fusions treat whole blocks (a depthwise 1x1 convolution with its bias, a convolution followed
by a pool), which only multi-layer graphs reach.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

TOLERANCE = 1e-3
OPSET = 18
ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Relu6",
               "SiLU", "Gelu", "none")
CHANNELS = (3, 4, 5, 6, 8, 12, 16, 20, 24, 32, 40)  # several not a multiple of 4, 8 or 16


@dataclass
class Outcome:
    """One seed's result."""

    seed: int
    status: str  # ok | mismatch | error | crashed | timeout
    detail: str = ""
    layers: list[str] = field(default_factory=list)
    max_error: float = 0.0  # max |got - ref| / max(1, max|ref|) over the outputs
    seconds: float = 0.0


class _Builder:
    """ONNX nodes and initializers under construction, with fresh names."""

    def __init__(self, rng: np.random.Generator, extra: np.random.Generator | None = None):
        self.rng = rng
        # draws for layer kinds added later, apart from ``rng``, so that they do not change
        # what ``rng`` draws for the layers seeds already had
        self.extra = extra if extra is not None else np.random.default_rng(0)
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.layers: list[str] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, array: np.ndarray, stem: str = "w") -> str:
        from onnx import numpy_helper
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: Sequence[str], **attrs: Any) -> str:
        from onnx import helper
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self.name(op), **attrs))
        return out

    def weights(self, *shape: int, fan_in: int) -> str:
        # He-style scale keeps activations O(1) through a dozen layers
        scale = np.sqrt(2.0 / max(1, fan_in))
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32))

    def choice(self, options: Sequence[Any]) -> Any:
        return options[int(self.rng.integers(len(options)))]


# -- tensors are (name, shape) pairs; shapes are lists of ints ----------------------------------

def _activation(b: _Builder, x: str, kind: str | None = None) -> str:
    kind = kind or b.choice(ACTIVATIONS)
    if kind == "none":
        return x
    b.layers.append(kind)
    if kind == "LeakyRelu":
        return b.node("LeakyRelu", [x], alpha=0.1)
    if kind == "HardSigmoid":  # torch's (1/6, 1/2) or ONNX's default (0.2, 0.5)
        alpha = b.choice((1.0 / 6.0, 0.2))
        return b.node("HardSigmoid", [x], alpha=alpha, beta=0.5)
    if kind == "Relu6":
        lo = b.const(np.array(0.0, np.float32), "lo")
        hi = b.const(np.array(6.0, np.float32), "hi")
        return b.node("Clip", [x, lo, hi])
    if kind == "SiLU":
        return b.node("Mul", [x, b.node("Sigmoid", [x])])
    if kind == "Gelu":  # the erf form exporters write (fuse-gelu turns it into one op)
        root2 = b.const(np.array(np.sqrt(2.0), np.float32), "sqrt2")
        one = b.const(np.array(1.0, np.float32), "one")
        half = b.const(np.array(0.5, np.float32), "half")
        erf = b.node("Erf", [b.node("Div", [x, root2])])
        return b.node("Mul", [b.node("Mul", [x, b.node("Add", [erf, one])]), half])
    return b.node(kind, [x])


def _conv_size(size: int, k: int, s: int, d: int, pads: tuple[int, int]) -> int:
    return (size + pads[0] + pads[1] - d * (k - 1) - 1) // s + 1


def _conv(b: _Builder, x: str, shape: list[int], rank: int) -> tuple[str, list[int]]:
    """A convolution with random window, stride, dilation, padding and grouping."""
    n, c, *spatial = shape
    k = b.choice((1, 1, 3, 3, 3, 5, 7))
    s = b.choice((1, 1, 2))
    d = b.choice((1, 1, 2)) if k > 1 else 1
    grouping = b.choice(("dense", "dense", "depthwise", "grouped"))
    if grouping == "depthwise":
        groups, out_c = c, c * b.choice((1, 1, 2))
    elif grouping == "grouped" and c >= 4:
        groups = b.choice([g for g in (2, 3, 4, 8) if c % g == 0] or [1])
        out_c = groups * b.choice((1, 2, 3))
    else:
        groups, out_c = 1, b.choice(CHANNELS)
    padding = b.choice(("same", "same", "none", "asym"))
    if padding == "same":
        pads = [(d * (k - 1) // 2, d * (k - 1) // 2)] * rank
    elif padding == "asym":
        pads = [(0, d * (k - 1) // 2 + 1)] * rank  # as TF "SAME" writes it, plus one
    else:
        pads = [(0, 0)] * rank
    out = [_conv_size(size, k, s, d, p) for size, p in zip(spatial, pads)]
    if min(out) < 1:  # too small for this window: a 1x1 convolution instead
        k, s, d, pads = 1, 1, 1, [(0, 0)] * rank
        out = list(spatial)
    inputs = [x, b.weights(out_c, c // groups, *[k] * rank, fan_in=c // groups * k ** rank)]
    if b.rng.random() < 0.7:
        inputs.append(b.const((b.rng.standard_normal(out_c) * 0.1).astype(np.float32), "bias"))
    y = b.node("Conv", inputs, kernel_shape=[k] * rank, strides=[s] * rank,
               dilations=[d] * rank, group=groups,
               pads=[p[0] for p in pads] + [p[1] for p in pads])
    b.layers.append(f"Conv{rank}d(k{k} s{s} d{d} g{groups} {c}->{out_c} {padding})")
    return y, [n, out_c, *out]


def _batch_norm(b: _Builder, x: str, c: int) -> str:
    b.layers.append("BatchNorm")
    scale = b.const((1 + 0.2 * b.rng.standard_normal(c)).astype(np.float32), "gamma")
    bias = b.const((0.1 * b.rng.standard_normal(c)).astype(np.float32), "beta")
    mean = b.const((0.1 * b.rng.standard_normal(c)).astype(np.float32), "mean")
    var = b.const((0.5 + b.rng.random(c)).astype(np.float32), "var")
    return b.node("BatchNormalization", [x, scale, bias, mean, var], epsilon=1e-5)


def _squeeze_excite(b: _Builder, x: str, shape: list[int]) -> str:
    """GlobalAveragePool -> 1x1 conv -> ReLU -> 1x1 conv -> HardSigmoid -> Mul (MobileNetV3)."""
    c = shape[1]
    mid = max(1, c // 4)
    b.layers.append(f"SE({c}->{mid})")
    pooled = b.node("GlobalAveragePool", [x])
    w1 = b.weights(mid, c, 1, 1, fan_in=c)
    w2 = b.weights(c, mid, 1, 1, fan_in=mid)
    b1 = b.const(np.zeros(mid, np.float32), "bias")
    b2 = b.const(np.zeros(c, np.float32), "bias")
    hidden = b.node("Relu", [b.node("Conv", [pooled, w1, b1], kernel_shape=[1, 1])])
    gate = b.node("HardSigmoid", [b.node("Conv", [hidden, w2, b2], kernel_shape=[1, 1])],
                  alpha=1.0 / 6.0, beta=0.5)
    return b.node("Mul", [x, gate])


def _pool(b: _Builder, x: str, shape: list[int]) -> tuple[str, list[int]]:
    n, c, h, w = shape
    op = b.choice(("MaxPool", "AveragePool"))
    k, s, p = b.choice(((2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)))
    ceil = int(b.rng.random() < 0.3)
    if min(h, w) + 2 * p < k:
        return x, shape
    attrs = {"kernel_shape": [k, k], "strides": [s, s], "pads": [p] * 4, "ceil_mode": ceil}
    if op == "AveragePool":
        attrs["count_include_pad"] = int(b.rng.random() < 0.5)

    def size(v: int) -> int:
        span = v + 2 * p - k
        out = (-(-span // s) if ceil else span // s) + 1
        # ONNX: the last window must start inside the input or its left padding
        return out - 1 if ceil and (out - 1) * s >= v + p else out

    b.layers.append(f"{op}(k{k} s{s} p{p}{' ceil' if ceil else ''})")
    return b.node(op, [x], **attrs), [n, c, size(h), size(w)]


def _upsample(b: _Builder, x: str, shape: list[int]) -> tuple[str, list[int]]:
    n, c, h, w = shape
    if max(h, w) > 24:
        return x, shape
    mode = b.choice(("nearest", "nearest", "linear"))
    scales = b.const(np.array([1, 1, 2, 2], np.float32), "scales")
    if mode == "nearest":  # YOLO / FPN upsampling as torch exports it
        attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                 "nearest_mode": "floor"}
    else:
        attrs = {"mode": "linear",
                 "coordinate_transformation_mode": b.choice(("half_pixel", "align_corners",
                                                             "pytorch_half_pixel"))}
    b.layers.append(f"Resize({attrs['mode']} {attrs['coordinate_transformation_mode']})")
    return b.node("Resize", [x, "", scales], **attrs), [n, c, 2 * h, 2 * w]


def _conv_transpose(b: _Builder, x: str, shape: list[int]) -> tuple[str, list[int]]:
    n, c, h, w = shape
    if max(h, w) > 24:
        return x, shape
    k, s, p, op = b.choice(((2, 2, 0, 0), (3, 2, 1, 1), (4, 2, 1, 0), (3, 1, 1, 0)))
    depthwise = b.rng.random() < 0.3
    groups, out_c = (c, c) if depthwise else (1, b.choice(CHANNELS))
    weight = b.weights(c, out_c // groups, k, k, fan_in=c * k * k // max(1, s * s) // groups)
    inputs = [x, weight]
    if b.rng.random() < 0.5:
        inputs.append(b.const((0.1 * b.rng.standard_normal(out_c)).astype(np.float32), "bias"))
    b.layers.append(f"ConvTranspose(k{k} s{s} p{p} op{op} g{groups} {c}->{out_c})")
    y = b.node("ConvTranspose", inputs, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4,
               output_padding=[op, op], group=groups)
    size = [(v - 1) * s - 2 * p + k + op for v in (h, w)]
    return y, [n, out_c, *size]


def _residual(b: _Builder, x: str, shape: list[int]) -> tuple[str, list[int]]:
    """x + conv(act(conv(x))) with shape-keeping 3x3 / depthwise convolutions; sometimes
    act(x + bias) as the shortcut."""
    c = shape[1]
    b.layers.append(f"Residual({c})")
    groups = b.choice((1, c))
    w1 = b.weights(c, c // groups, 3, 3, fan_in=9 * c // groups)
    h = _activation(b, b.node("Conv", [x, w1], kernel_shape=[3, 3], pads=[1] * 4,
                              group=groups))
    w2 = b.weights(c, c, 1, 1, fan_in=c)
    shortcut = x
    if b.extra.random() < 0.4:
        # a pre-activated shortcut, act(x + bias): an elementwise chain over another input
        # that FuseOps puts into the convolution's kernel (CenterFace's neck). The blocked
        # rules declined such kernels, and dlight's generic rule took them.
        bias = b.const((0.1 * b.extra.standard_normal((1, c, 1, 1))).astype(np.float32), "b")
        kind = ("Relu", "Relu6", "SiLU", "Tanh")[int(b.extra.integers(4))]
        b.layers.append("PreactShortcut")
        shortcut = _activation(b, b.node("Add", [x, bias]), kind)
    return b.node("Add", [shortcut, b.node("Conv", [h, w2], kernel_shape=[1, 1])]), shape


def _concat(b: _Builder, x: str, shape: list[int]) -> tuple[str, list[int]]:
    """Two 1x1 / 3x3 paths over ``x`` concatenated on channels (inception / CSP blocks)."""
    n, c, h, w = shape
    c1, c2 = b.choice(CHANNELS), b.choice(CHANNELS)
    b.layers.append(f"Concat({c1}+{c2})")
    left = b.node("Conv", [x, b.weights(c1, c, 1, 1, fan_in=c)], kernel_shape=[1, 1])
    right = b.node("Conv", [x, b.weights(c2, c, 3, 3, fan_in=9 * c)], kernel_shape=[3, 3],
                   pads=[1] * 4)
    return b.node("Concat", [_activation(b, left), _activation(b, right)], axis=1), \
        [n, c1 + c2, h, w]


_IMAGE_BLOCKS: dict[str, Callable[[_Builder, str, list[int]], tuple[str, list[int]]]] = {
    "conv": lambda b, x, s: _conv(b, x, s, 2),
    "pool": _pool,
    "upsample": _upsample,
    "conv_transpose": _conv_transpose,
    "residual": _residual,
    "concat": _concat,
}
_BLOCK_WEIGHTS = {"conv": 6, "pool": 1, "upsample": 1, "conv_transpose": 1, "residual": 1,
                  "concat": 1}


def _maybe_slice(b: _Builder, x: str, shape: list[int]) -> tuple[str, list[int]]:
    """Sometimes a slice of the last axis after a convolution: down to its first index (the
    last step a sequence model keeps) or its second half. A slice inlined into a blocked
    convolution's write-back once stored every column of a tile into the one kept."""
    if b.extra.random() >= 0.15 or shape[-1] < 2:
        return x, shape
    start, end = (0, 1) if b.extra.random() < 0.5 else (shape[-1] // 2, shape[-1])
    b.layers.append(f"Slice[{start}:{end}]")
    sliced = b.node("Slice", [x, b.const(np.array([start], np.int64), "starts"),
                              b.const(np.array([end], np.int64), "ends"),
                              b.const(np.array([len(shape) - 1], np.int64), "axes")])
    return sliced, [*shape[:-1], end - start]


def _image_branch(b: _Builder, x: str, shape: list[int]) -> tuple[str, list[int]]:
    names = list(_BLOCK_WEIGHTS)
    p = np.array([_BLOCK_WEIGHTS[k] for k in names], float)
    for i in range(int(b.rng.integers(2, 7))):
        # a convolution first: the stem every image encoder has (and the output is never the
        # input itself)
        kind = "conv" if i == 0 else names[int(b.rng.choice(len(names), p=p / p.sum()))]
        x, shape = _IMAGE_BLOCKS[kind](b, x, shape)
        if kind == "conv":
            if b.rng.random() < 0.3:
                x = _batch_norm(b, x, shape[1])
            x = _activation(b, x)
            if b.rng.random() < 0.2 and min(shape[2:]) > 1:
                x = _squeeze_excite(b, x, shape)
            x, shape = _maybe_slice(b, x, shape)
    return x, shape


def _sequence_branch(b: _Builder, x: str, shape: list[int]) -> tuple[str, list[int]]:
    for _ in range(int(b.rng.integers(1, 4))):
        x, shape = _conv(b, x, shape, 1)
        x, shape = _maybe_slice(b, _activation(b, x), shape)
    return x, shape


def _head(b: _Builder, x: str, shape: list[int], width: int) -> str:
    """Global average over the spatial axes, then a linear layer to ``width`` features."""
    pooled = b.node("ReduceMean", [x, b.const(np.arange(2, len(shape), dtype=np.int64), "axes")],
                    keepdims=0)
    weight = b.weights(shape[1], width, fan_in=shape[1])
    bias = b.const((0.1 * b.rng.standard_normal(width)).astype(np.float32), "bias")
    return b.node("Gemm", [pooled, weight, bias])


def random_model(seed: int):
    """The ONNX model (checked) of ``seed`` and the layer descriptions it drew."""
    import onnx
    from onnx import TensorProto, helper
    rng = np.random.default_rng(seed)
    b = _Builder(rng, np.random.default_rng([seed, 1]))
    batch = int(b.choice((1, 1, 2)))
    image_shape = [batch, int(b.choice((1, 3, 4))), int(rng.integers(7, 41)),
                   int(rng.integers(7, 41))]
    inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, image_shape)]
    feature, feature_shape = _image_branch(b, "pixel_values", image_shape)
    heads = [_head(b, feature, feature_shape, 16)]
    if rng.random() < 0.7:
        seq_shape = [batch, int(b.choice((1, 8, 13, 16, 40))), int(rng.integers(16, 161))]
        inputs.append(helper.make_tensor_value_info("input_features", TensorProto.FLOAT,
                                                    seq_shape))
        b.layers.append("|")
        sequence, seq_shape = _sequence_branch(b, "input_features", seq_shape)
        heads.append(_head(b, sequence, seq_shape, 16))
    fused = b.node("Concat", heads, axis=1) if len(heads) > 1 else heads[0]
    logits = b.node("Gemm", [_activation(b, fused, "Relu"),
                             b.weights(16 * len(heads), 10, fan_in=16 * len(heads))])
    outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, None),
               helper.make_tensor_value_info(feature, TensorProto.FLOAT, None)]
    graph = helper.make_graph(b.nodes, f"fuzz_{seed}", inputs, outputs, b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model, b.layers


def check_seed(seed: int, tolerance: float = TOLERANCE, target: str = "cpu") -> Outcome:
    """Build, compile and compare the model of ``seed`` (in this process)."""
    import mmcompile
    from mmcompile.frontend import from_onnx_model
    from mmcompile.reference import compare_outputs, random_inputs, run_onnxruntime
    start = time.perf_counter()
    model, layers = random_model(seed)
    feeds = random_inputs(from_onnx_model(model), seed=seed)
    try:
        compiled = mmcompile.compile(model, feeds, target=target, verify=False,
                                     schedule="sequential", measure=False)
        got = compiled.run(feeds)
        compiled.close()
    except Exception as exc:  # noqa: BLE001  (any failure on a valid model is a finding)
        text = str(exc).strip().splitlines()
        return Outcome(seed, "error", f"{type(exc).__name__}: {text[0] if text else ''}"[:400],
                       layers, seconds=time.perf_counter() - start)
    expected = run_onnxruntime(model, feeds)
    worst, where = 0.0, ""
    for diff in compare_outputs(expected, got):
        scaled = diff.max_abs / max(1.0, diff.ref_scale) if diff.shape_ok else float("inf")
        if scaled > worst:
            worst, where = scaled, str(diff)
    status = "ok" if worst <= tolerance else "mismatch"
    return Outcome(seed, status, "" if status == "ok" else where, layers, worst,
                   time.perf_counter() - start)


def _task(task: dict[str, Any]) -> dict[str, Any]:
    """One seed in a worker process (module level: the pool spawns its workers)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return asdict(check_seed(task["seed"], task["tolerance"], task["target"]))


def run_fuzz(seeds: Sequence[int], workers: int = 2, tolerance: float = TOLERANCE,
             target: str = "cpu", timeout: float = 300.0,
             progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Check every seed in worker processes; one :class:`Outcome` per seed, in seed order."""
    from mmcompile.process_pool import run_pool
    seeds = list(seeds)
    tasks = [{"seed": s, "tolerance": tolerance, "target": target} for s in seeds]

    def outcome(index: int, result: Any) -> Outcome:
        if isinstance(result, dict):
            return Outcome(**result)
        _, reason, seconds = result  # the pool's (False, "crashed ..." | "timeout ...", s)
        return Outcome(seeds[index], reason.split(" ")[0], reason, seconds=seconds)

    def report(index: int, result: Any) -> None:
        if progress:
            progress(outcome(index, result))

    results = run_pool(_task, tasks, workers, timeout, max_tasks=25, on_result=report)
    return [outcome(i, r) for i, r in enumerate(results)]


def parse_seeds(text: str) -> list[int]:
    """``"0:500"`` (a half-open range), ``"3,17,42"`` or a mix (``"0:10,99"``)."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if ":" in part:
            lo, hi = part.split(":", 1)
            seeds.extend(range(int(lo), int(hi)))
        else:
            seeds.append(int(part))
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmcompile.fuzz",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0:50", help="half-open ranges and single seeds, "
                        "comma-separated (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="relative to max(1, max|ref|) (default: %(default)g)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    parser.add_argument("--save-failures", metavar="DIR",
                        help="write each failing seed's model to DIR/fuzz_<seed>.onnx")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per seed")
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError:
        parser.error(f"--seeds: expected ranges like 0:500 or seeds like 3,17, got {args.seeds!r}")

    done = {"n": 0, "failed": 0}

    def show(o: Outcome) -> None:
        done["n"] += 1
        done["failed"] += o.status != "ok"
        if not args.verbose and done["n"] % 25 == 0:  # a long run shows it is alive
            print(f"{done['n']}/{len(seeds)} models, {done['failed']} failed", flush=True)
        if args.verbose or o.status != "ok":
            line = f"seed {o.seed}: {o.status} ({o.seconds:.1f} s, max error {o.max_error:.2e})"
            print(line + (f"\n  {o.detail}\n  layers: {' '.join(o.layers)}"
                          if o.status != "ok" else ""), flush=True)

    start = time.perf_counter()
    outcomes = run_fuzz(seeds, args.workers, args.tolerance, args.target, args.timeout, show)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    failed = [o for o in outcomes if o.status != "ok"]
    if args.save_failures and failed:
        import os

        import onnx
        os.makedirs(args.save_failures, exist_ok=True)
        for o in failed:
            onnx.save(random_model(o.seed)[0], os.path.join(args.save_failures,
                                                             f"fuzz_{o.seed}.onnx"))
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"{len(outcomes)} models (seeds {args.seeds}) in {time.perf_counter() - start:.0f} s: "
          f"{summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
