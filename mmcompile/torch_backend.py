"""``torch.compile(model, backend="mmcompile")``: a TorchDynamo backend that compiles each
captured FX graph with :func:`mmcompile.compile`.

Registered through the ``torch_dynamo_backends`` entry point (``pyproject.toml``), so torch finds
it by name without importing mmcompile first; options arrive as
``torch.compile(..., options={"target": "cpu", "threads": 2, ...})``.

From an FX graph to a compiled model, and why each step is there:

1. Refuse what an inference compiler cannot take, with a logged reason, by returning the graph's
   own ``forward`` (eager): graphs without operations, graphs that mutate an input in place
   (ONNX is functional: the caller would not see the write), non-tensor outputs or inputs other
   than tensors and ints, and graphs traced with grad mode on and an input that requires grad
   (the result would have no autograd history; dynamo guards on grad mode, so the same code
   run under ``torch.no_grad()`` or ``torch.inference_mode()`` recompiles here and is taken).
2. Parameters and buffers reach the graph as inputs (dynamo lifts them): they are baked into the
   exported model as constants, so mmcompile folds them (batch-norm folding, constant shapes)
   the way it does for ``mmcompile.compile(module)``. Dynamo does not guard on them, so each
   call checks that they are the same tensors, unmodified (``_version``); if not, the graph is
   compiled again with the new values.
3. The graph is wrapped as a module whose ``forward`` takes only the user's tensors, named after
   the caller's own arguments (``image``, ``input_ids``: mmcompile infers modalities from
   names), and exported with the rest of mmcompile's torch frontend (ONNX, then TVM).
4. Shapes: mmcompile compiles static shapes. A graph with static shapes is compiled when dynamo
   hands it over; a dynamic one (``dynamic=True``, or dynamo's automatic dynamic shapes after a
   second shape, with SymInt inputs) is compiled at call time, once per concrete input shapes,
   its SymInts fixed to their values; the compiled models are cached per shape signature.
5. Recurrent layers: dynamo breaks the graph at every ``nn.LSTM`` / ``GRU`` / ``RNN`` and runs
   them eagerly unless ``torch._dynamo.config.allow_rnn`` is on; mmcompile lowers them
   natively, so importing this backend (which ``backend="mmcompile"`` does) turns it on for
   the process (MOSEI-LSTM at batch 1: 3.8 ms with the breaks, 1.3 ms captured whole).
6. A graph mmcompile cannot compile (an export failure, an unsupported op with no fallback, a
   failed verification) runs eagerly, with a warning on ``mmcompile.torch_backend`` naming why.

The returned callable takes the graph's flat inputs and returns the graph's output structure
(a tuple or list) of torch tensors.
"""

from __future__ import annotations

import inspect
import logging
import operator
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmcompile.errors import MMCompileError

log = logging.getLogger(__name__)


def _capture_recurrent_layers() -> None:
    import torch._dynamo
    if not torch._dynamo.config.allow_rnn:
        torch._dynamo.config.allow_rnn = True
        log.debug("torch._dynamo.config.allow_rnn turned on: LSTM/GRU/RNN layers are captured "
                  "and compiled instead of breaking the graph")


_capture_recurrent_layers()

_VERSION = operator.attrgetter("_version")  # bumped by every in-place write to a tensor

# Options of ``mmcompile.compile`` the backend does not take: it sets them itself.
_RESERVED = ("progress", "input_shapes")


class BackendOptionError(MMCompileError):
    """An option given through ``torch.compile(..., options=...)`` that the backend lacks."""


def valid_options() -> list[str]:
    """The option names ``torch.compile(..., backend="mmcompile", options=...)`` accepts: the
    keyword arguments of :func:`mmcompile.compile` other than ``progress`` and
    ``input_shapes``."""
    from mmcompile.compiler import compile as mm_compile
    params = inspect.signature(mm_compile).parameters.values()
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _RESERVED]


def check_options(options: Mapping[str, Any] | None, mode: str | None = None) -> dict[str, Any]:
    """The options as keyword arguments of :func:`mmcompile.compile`.

    Raises:
        BackendOptionError: an unknown option name (the message lists the valid ones), or a
            ``mode`` (torch.compile's inductor modes mean nothing to mmcompile).
    """
    if mode not in (None, "default"):
        raise BackendOptionError(f"the mmcompile backend takes no mode (got mode={mode!r}); "
                                 f"pass options={{...}} instead: {', '.join(valid_options())}")
    options = dict(options or {})
    valid = valid_options()
    unknown = sorted(k for k in options if k not in valid)
    if unknown:
        raise BackendOptionError(f"unknown mmcompile backend option(s) {unknown}; valid "
                                 f"options: {', '.join(valid)}")
    return options


def mmcompile_backend(gm: Any, example_inputs: Sequence[Any], *,
                      options: Mapping[str, Any] | None = None,
                      mode: str | None = None) -> Callable[..., Any]:
    """The TorchDynamo backend: compile one captured graph with :func:`mmcompile.compile`.

    Args:
        gm: the ``torch.fx.GraphModule`` dynamo captured.
        example_inputs: its flat inputs (tensors, including lifted parameters, and SymInts).
        options: keyword arguments of :func:`mmcompile.compile` (``target``, ``schedule``,
            ``tuning_db``, ``threads``, ``verify``, ...; see :func:`valid_options`).
        mode: must be None: torch.compile's modes are inductor's.

    Returns:
        A callable taking the graph's flat inputs and returning its outputs as torch tensors:
        the compiled model, or ``gm.forward`` where the graph runs eagerly (logged).

    Raises:
        BackendOptionError: an unknown option (dynamo reports it as a backend failure).
    """
    kwargs = check_options(options, mode)
    graph = _describe(gm, example_inputs)
    why = _cannot_take(gm, graph, example_inputs, kwargs)
    if why:
        log.warning("mmcompile backend: running graph %s eagerly: %s", graph.name, why)
        return gm.forward
    compiled = CompiledGraph(gm, graph, kwargs)
    static = not graph.dynamic and not any(_is_fake(v) for v in example_inputs)
    if static and not compiled.prime(example_inputs):
        return gm.forward
    return compiled


@dataclass
class _GraphFacts:
    """What the backend needs to know about a captured graph's inputs and outputs.

    Attributes:
        name: a short name for messages (the graph's first user input names).
        user: indices of the inputs the caller passes on each call (tensors that are not
            parameters or buffers).
        names: the compiled model's input names for ``user``, in order.
        static: indices of lifted parameters and buffers (baked as constants).
        ints: indices of int / SymInt inputs (fixed to their value per compiled shape).
        dynamic: the graph has symbolic shapes or int inputs: compile per call-time shape.
        outputs: how many outputs; ``as_list``: the graph returns a list, not a tuple.
        others: inputs that are neither tensors nor ints (the graph then runs eagerly).
    """

    name: str
    user: list[int]
    names: list[str]
    static: list[int]
    ints: list[int]
    dynamic: bool
    outputs: int
    as_list: bool
    others: list[str]


def _is_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(value, FakeTensor)


def _is_static(node: Any, value: Any) -> bool:
    """A parameter or buffer lifted into the graph as an input."""
    import torch
    if isinstance(value, torch.nn.Parameter):
        return True
    if node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type"):
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    where = source.name if source is not None else ""
    return "._parameters[" in where or "._buffers[" in where


def _input_name(node: Any, taken: set[str]) -> str:
    """The caller's own argument name where dynamo knows it (``L['image']`` -> ``image``),
    else the placeholder's."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "local_name", None)
    if not (isinstance(name, str) and name.isidentifier()) or name in taken or name == "self":
        name = node.name
    taken.add(name)
    return name


def _describe(gm: Any, example_inputs: Sequence[Any]) -> _GraphFacts:
    import torch
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user, names, static, ints, others, taken = [], [], [], [], [], set()
    dynamic = False
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(value, torch.Tensor):
            if _is_static(node, value):
                static.append(index)
                continue
            user.append(index)
            names.append(_input_name(node, taken))
            shape = getattr(node.meta.get("example_value"), "shape", ())
            dynamic |= any(not isinstance(d, int) for d in shape)
        elif isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
            ints.append(index)
            dynamic = True
        else:
            others.append(f"{node.name} ({type(value).__name__})")
    result = gm.graph.find_nodes(op="output")[0].args[0]
    as_list = isinstance(result, list)
    count = len(result) if isinstance(result, (tuple, list)) else 1
    return _GraphFacts(", ".join(names[:3]) or "<no inputs>", user, names, static, ints,
                       dynamic, count, as_list, others)


def _cannot_take(gm: Any, graph: _GraphFacts, example_inputs: Sequence[Any],
                 options: Mapping[str, Any]) -> str | None:
    """Why the graph must run eagerly, or None."""
    import torch
    ops = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    if not ops:
        return "the graph has no operations"
    if not graph.user:
        return "the graph has no tensor inputs besides parameters (nothing to compile per call)"
    if graph.others:
        return f"inputs other than tensors and ints: {', '.join(graph.others)}"
    tensors = [v for v in example_inputs if isinstance(v, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return ("grad mode is on and an input requires grad; mmcompile compiles inference "
                "only: call the model under torch.no_grad() or torch.inference_mode()")
    if str(options.get("target", "cpu")).startswith("cpu") and any(
            t.device.type != "cpu" for t in tensors):
        return "inputs on a device other than the CPU, for the cpu target"
    mutated = _mutated_input(gm)
    if mutated:
        return f"the graph writes to its input '{mutated}' in place"
    result = gm.graph.find_nodes(op="output")[0].args[0]
    for out in (result if isinstance(result, (tuple, list)) else (result,)):
        value = out.meta.get("example_value") if isinstance(out, torch.fx.Node) else out
        if not isinstance(value, torch.Tensor):
            return f"an output that is not a tensor ({type(value).__name__})"
    return None


def _mutated_input(gm: Any) -> str | None:
    """The name of a placeholder an in-place op writes to (``x.add_(1)``, ``x[0] = 1``)."""
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or not node.args:
            continue
        target = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", "")
        in_place = (target.endswith("_") and not target.endswith("__")) or (
            node.target is operator.setitem)
        first = node.args[0]
        if in_place and getattr(first, "op", None) == "placeholder":
            return first.name
    return None


def _encoder_layer(src: Any, embed_dim: int, num_heads: int, qkv_weight: Any, qkv_bias: Any,
                   proj_weight: Any, proj_bias: Any, use_gelu: bool, norm_first: bool,
                   eps: float, norm1_weight: Any, norm1_bias: Any, norm2_weight: Any,
                   norm2_bias: Any, ffn1_weight: Any, ffn1_bias: Any, ffn2_weight: Any,
                   ffn2_bias: Any, mask: Any = None, mask_type: Any = None) -> Any:
    """``torch._transformer_encoder_layer_fwd`` (the fused inference path of a batch-first
    ``nn.TransformerEncoderLayer``, which dynamo records under no_grad and the ONNX exporter
    cannot lower) in exportable ops: the layer's own non-fused path, without a mask."""
    import torch.nn.functional as F
    batch, steps, _ = src.shape

    def heads(t: Any) -> Any:
        return t.reshape(batch, steps, num_heads, embed_dim // num_heads).transpose(1, 2)

    def attention(x: Any) -> Any:
        q, k, v = F.linear(x, qkv_weight, qkv_bias).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return F.linear(out.transpose(1, 2).reshape(batch, steps, embed_dim), proj_weight,
                        proj_bias)

    def feed_forward(x: Any) -> Any:
        hidden = F.linear(x, ffn1_weight, ffn1_bias)
        return F.linear(F.gelu(hidden) if use_gelu else F.relu(hidden), ffn2_weight, ffn2_bias)

    def norm(x: Any, weight: Any, bias: Any) -> Any:
        return F.layer_norm(x, (embed_dim,), weight, bias, eps)

    if norm_first:
        x = src + attention(norm(src, norm1_weight, norm1_bias))
        return x + feed_forward(norm(x, norm2_weight, norm2_bias))
    x = norm(src + attention(src), norm1_weight, norm1_bias)
    return norm(x + feed_forward(x), norm2_weight, norm2_bias)


def _decompositions() -> list[tuple[Any, Callable[[Any], bool], Callable[..., Any]]]:
    """(fused torch function, when the replacement applies to a node, replacement): fused
    inference kernels eager torch picks under no_grad that the ONNX exporter has no lowering
    for. A node the condition refuses stays, and its export failure sends the graph to eager."""
    import torch
    return [(torch._transformer_encoder_layer_fwd,
             lambda node: len(node.args) < 19 or node.args[18] is None, _encoder_layer)]


def _decomposed(gm: Any) -> Any:
    """``gm``, or a copy with the fused calls of :func:`_decompositions` replaced (``gm``
    itself stays as dynamo gave it: it is the eager fallback)."""
    import copy

    import torch
    rules = _decompositions()
    found = {node.name: replacement for node in gm.graph.nodes if node.op == "call_function"
             for fused, applies, replacement in rules
             if node.target is fused and applies(node)}
    if not found:
        return gm
    graph = copy.deepcopy(gm.graph)  # keeps node names
    for node in graph.nodes:
        if node.name in found:
            node.target = found[node.name]
    return torch.fx.GraphModule(gm, graph)


def _exportable(gm: Any, graph: _GraphFacts, args: Sequence[Any]) -> Any:
    """A module whose ``forward(<user inputs by name>)`` runs ``gm`` with the parameters as
    buffers (exported as constants) and the ints fixed to their values in ``args``."""
    import torch

    full = list(args)

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gm = gm
            for k, index in enumerate(graph.static):
                self.register_buffer(f"const{k}", args[index].detach(), persistent=False)

        def forward(self, *inputs: Any) -> Any:
            values = list(full)
            for index, value in zip(graph.user, inputs):
                values[index] = value
            for k, index in enumerate(graph.static):
                values[index] = getattr(self, f"const{k}")
            for index in graph.ints:
                values[index] = int(full[index])
            return tuple(self.gm(*values))

    # torch.export names the ONNX inputs after forward()'s parameters.
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for n in ["self", *graph.names]]
    Graph.forward.__signature__ = inspect.Signature(params)
    return Graph().eval()


class _Entry:
    """One compiled model (one shape signature, one set of parameter tensors)."""

    def __init__(self, compiled: Any, graph: _GraphFacts, args: Sequence[Any]):
        self.run = compiled.run
        self.feeds = list(zip(graph.names, graph.user))
        self.outputs = list(compiled.output_names)
        self.as_list = graph.as_list
        # Checked on every call, so kept to two C-level maps over the parameters.
        self._params = operator.itemgetter(*graph.static) if graph.static else (lambda a: ())
        params = self._tuple(args)
        self._ids = tuple(map(id, params))
        self._versions = tuple(map(_VERSION, params))
        # An id is only unique while its tensor lives: a freed parameter makes the entry stale.
        self._alive = [weakref.ref(p, self._stale) for p in params]

    def _stale(self, _ref: Any) -> None:
        self._ids = None

    def _tuple(self, args: Sequence[Any]) -> tuple:
        params = self._params(args)
        return params if isinstance(params, tuple) else (params,)

    def current(self, args: Sequence[Any]) -> bool:
        """Whether the parameters in ``args`` are the tensors baked in, unmodified."""
        params = self._tuple(args)
        return (tuple(map(id, params)) == self._ids
                and tuple(map(_VERSION, params)) == self._versions)

    def __call__(self, args: Sequence[Any]) -> Any:
        out = self.run({name: args[index] for name, index in self.feeds})
        result = [out[name] for name in self.outputs]
        return result if self.as_list else tuple(result)


class CompiledGraph:
    """The callable dynamo gets for one graph: compiled models per input-shape signature.

    A shape mmcompile failed on runs eagerly from then on (logged once).
    """

    def __init__(self, gm: Any, graph: _GraphFacts, options: Mapping[str, Any]):
        self.gm = gm
        self.graph = graph
        self.options = dict(options)
        self._cache: dict[Any, Any] = {}
        self._last: _Entry | None = None  # the static graph's one model: no key to compute

    def _key(self, args: Sequence[Any]) -> Any:
        graph = self.graph
        return (tuple(tuple(args[i].shape) for i in graph.user),
                tuple(int(args[i]) for i in graph.ints))

    def prime(self, args: Sequence[Any]) -> bool:
        """Compile for ``args`` now (a static graph, when dynamo hands it over); False when
        mmcompile cannot take it (logged)."""
        entry = self._compile(args)
        if isinstance(entry, _Entry):
            self._last = entry
            self._cache[self._key(args)] = entry
            return True
        return False

    def _compile(self, args: Sequence[Any]) -> Any:
        import mmcompile
        graph = self.graph
        shapes = ", ".join(f"{n} {list(args[i].shape)}" for n, i in zip(graph.names, graph.user))
        module = _exportable(_decomposed(self.gm), graph, args)
        examples = tuple(args[i] for i in graph.user)
        try:
            compiled = mmcompile.compile(
                module, examples, progress=lambda m: log.debug("graph %s: %s", graph.name, m),
                **self.options)
        except MMCompileError as exc:
            log.warning("mmcompile backend: running graph %s (%s) eagerly: %s", graph.name,
                        shapes, exc)
            return self.gm.forward
        except Exception as exc:
            log.warning("mmcompile backend: running graph %s (%s) eagerly: mmcompile failed "
                        "unexpectedly: %s: %s", graph.name, shapes, type(exc).__name__, exc,
                        exc_info=True)
            return self.gm.forward
        if len(compiled.output_names) != graph.outputs:
            log.warning("mmcompile backend: running graph %s (%s) eagerly: the compiled model "
                        "has %d outputs, the graph %d", graph.name, shapes,
                        len(compiled.output_names), graph.outputs)
            return self.gm.forward
        log.info("mmcompile backend: compiled graph %s (%s)", graph.name, shapes)
        return _Entry(compiled, graph, args)

    def __call__(self, *args: Any) -> Any:
        entry = self._last
        if entry is not None and not self.graph.dynamic and entry.current(args):
            return entry(args)
        key = self._key(args)
        entry = self._cache.get(key)
        if isinstance(entry, _Entry) and not entry.current(args):
            log.info("mmcompile backend: parameters of graph %s changed: compiling it again",
                     self.graph.name)
            entry = None
        if entry is None:
            entry = self._cache[key] = self._compile(args)
            if isinstance(entry, _Entry) and not self.graph.dynamic:
                self._last = entry
        return entry(args) if isinstance(entry, _Entry) else entry(*args)
