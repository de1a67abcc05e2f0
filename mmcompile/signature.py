"""A compiled model's calling signature, and the checks inputs pass before native code sees them.

Native kernels trust their inputs: TVM's gather does not check bounds (an out-of-range token id
segfaults), and a wrong shape reads past a buffer. So every call is validated here first:
names, rank, static dims, consistent symbolic dims, dtype (safe casts only), and the range of
integer inputs that index an embedding table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from mmcompile.errors import InputError

if TYPE_CHECKING:
    from mmcompile.ir import Graph


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: static dims are ints, symbolic dims are names."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    modality: str | None = None
    index_bound: int | None = None  # integer inputs indexing a table: valid ids are [0, bound)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if k == "shape" else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(data["name"], tuple(data["shape"]), data["dtype"], data.get("modality"),
                   data.get("index_bound"))


def _dims(shape) -> tuple[int | str, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else str(d or "?") for d in (shape or ()))


@dataclass(frozen=True)
class Signature:
    """Inputs and outputs of a compiled model, in graph order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_graph(cls, graph: Graph) -> Signature:
        from mmcompile.reference import embedding_bound  # onnx-graphsurgeon: compile time only
        inputs = tuple(
            TensorSpec(t.name, _dims(t.shape), str(np.dtype(t.dtype)),
                       graph.modalities[t.name].modality if t.name in graph.modalities else None,
                       embedding_bound(graph, t.name))
            for t in graph.gs.inputs)
        outputs = tuple(TensorSpec(t.name, _dims(t.shape), str(np.dtype(t.dtype)))
                        for t in graph.gs.outputs)
        return cls(inputs, outputs)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Signature:
        return cls(tuple(TensorSpec.from_dict(d) for d in data["inputs"]),
                   tuple(TensorSpec.from_dict(d) for d in data["outputs"]))

    def random_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs for this signature (symbolic dims -> 1; ids within their table)."""
        rng = np.random.default_rng(seed)
        out = {}
        for spec in self.inputs:
            shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape)
            dtype = np.dtype(spec.dtype)
            if np.issubdtype(dtype, np.floating):
                out[spec.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                out[spec.name] = rng.integers(0, 2, shape).astype(bool)
            else:
                out[spec.name] = rng.integers(0, spec.index_bound or 2, shape).astype(dtype)
        return out

    def validate(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``feeds`` (numpy arrays or torch tensors) and return them ready for native code:
        safe-cast to the compiled dtype and made contiguous (copies only when needed).

        Raises:
            InputError: naming the input and what is wrong with it.
        """
        exact = self._exact
        if len(feeds) != len(exact) or any(name not in feeds for name in exact):
            expected = list(exact)
            missing = [n for n in expected if n not in feeds]
            unknown = [n for n in feeds if n not in expected]
            raise InputError(f"inputs {sorted(feeds)} do not match the compiled signature "
                             f"{expected}" + (f": missing {missing}" if missing else "")
                             + (f": unexpected {unknown}" if unknown else ""))
        symbols: dict[str, tuple[int, str]] = {}
        ready = {}
        for spec in self.inputs:
            value = feeds[spec.name]
            want = exact[spec.name]
            # The common call, checked in ~1 us instead of ~5-12: a contiguous numpy array of
            # exactly the static shape and dtype (ids within their table) passes as it is.
            if (want is not None and type(value) is np.ndarray and value.shape == want[0]
                    and value.dtype == want[1] and value.flags.c_contiguous
                    and (want[2] is None or not value.size
                         or (value.min() >= 0 and value.max() < want[2]))):
                ready[spec.name] = value
            else:
                ready[spec.name] = _check_one(spec, value, symbols)
        return ready

    @cached_property
    def _exact(self) -> dict[str, tuple[tuple[int, ...], np.dtype, int | None] | None]:
        """Input name -> (shape, dtype, index bound) of the arrays that pass unchanged, for
        inputs whose dims are all static (None for the others)."""
        return {s.name: (tuple(s.shape), np.dtype(s.dtype), s.index_bound)
                if all(isinstance(d, int) for d in s.shape) else None for s in self.inputs}


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _check_one(spec: TensorSpec, value: Any, symbols: dict[str, tuple[int, str]]) -> Any:
    if _is_torch(value):
        import torch
        value = value.detach()
        shape = tuple(value.shape)
        dtype = np.dtype(str(value.dtype).removeprefix("torch.").replace("bool", "bool_")
                         if value.dtype != torch.bool else np.bool_)
    else:
        value = np.asarray(value)
        shape, dtype = value.shape, value.dtype
    if len(shape) != len(spec.shape):
        raise InputError(f"input '{spec.name}' has rank {len(shape)} (shape {list(shape)}), the "
                         f"compiled model expects rank {len(spec.shape)} {list(spec.shape)}")
    for axis, (got, want) in enumerate(zip(shape, spec.shape)):
        if isinstance(want, int):
            if got != want:
                raise InputError(f"input '{spec.name}' has shape {list(shape)}, the compiled "
                                 f"model expects {list(spec.shape)} (dim {axis}: {got} != {want})")
        elif want.startswith("?"):
            continue  # an unnamed dynamic dim: any size, independent of every other
        elif want in symbols and symbols[want][0] != got:
            size, other = symbols[want]
            raise InputError(f"dim '{want}' is {got} in input '{spec.name}' but {size} in "
                             f"input '{other}'")
        else:
            symbols.setdefault(want, (got, spec.name))
    target = np.dtype(spec.dtype)
    if dtype != target:
        if not np.can_cast(dtype, target, casting="safe"):
            raise InputError(f"input '{spec.name}' has dtype {dtype}, the compiled model expects "
                             f"{target} (only lossless casts are applied; convert it yourself)")
        value = value.to(_torch_dtype(target)) if _is_torch(value) else value.astype(target)
    if spec.index_bound is not None and np.prod(shape) > 0:
        low, high = (int(value.min()), int(value.max()))
        if low < 0 or high >= spec.index_bound:
            bad = low if low < 0 else high
            raise InputError(f"input '{spec.name}' holds index {bad}, outside [0, "
                             f"{spec.index_bound}) of the table it indexes")
    if _is_torch(value):
        return value.contiguous()
    return value if value.flags.c_contiguous else value.copy(order="C")


def _torch_dtype(dtype: np.dtype):
    import torch
    return {np.dtype(np.bool_): torch.bool}.get(dtype) or getattr(torch, dtype.name)
