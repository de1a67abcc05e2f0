"""The target interface and registry.

A target turns one stage (a :class:`~mmcompile.ir.Graph`) into an :class:`Executable` that runs
it, and loads such an executable back from an artifact folder. Targets live in ``targets/``
(shipped as ``mmcompile.targets``) and register themselves by name; the core finds them through
:func:`get_target` and never imports a target module by name, so optional dependencies (CUDA,
TensorRT) are imported only when that target is used.

What a target declares, so that the planner can place work on it without knowing it:

- ``supports(node, graph)``: node by node, whether it can run the node, and why not (the
  capability query of torch.fx's ``OperatorSupport``); the planner puts what the requested
  target cannot run on the fallback target;
- ``options``: typed options (:class:`TargetOption`); :meth:`Target.check_options` refuses an
  unknown or mistyped one, naming the valid ones;
- ``pipeline``: the graph passes its stages need in front of it (TVM: ``legalize-for-tvm``),
  run on its own stages only, so the ``default`` pipeline stays target-independent;
- ``device``: where its stages run (``cpu``, ``cuda``): the lane a parallel schedule gives them,
  and whether a tensor crossing from another stage must be copied;
- ``configured(options)``, ``host(options)``, ``branch_moves(options)``: for a target whose
  capability depends on its options, whose unsupported nodes go to a host target, and whose
  branches the planner may move to that host (an accelerator).

A target is written ``name`` or ``name{key=value,...}`` (:func:`parse_target_spec`), the same
text in the API, the CLI and the manifest.
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mmcompile.errors import MMCompileError, RegistryError
from mmcompile.spec import Spec

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from mmcompile.ir import Graph


class TargetError(MMCompileError):
    """Unknown target, a target unavailable here, or a stage a target cannot compile."""


@dataclass(frozen=True)
class TargetOption:
    """One typed option of a target: ``type`` is ``bool``, ``int``, ``float`` or ``str``; a
    ``default`` of None means "not set" (the target decides)."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] = ()

    def convert(self, value: Any, target: str) -> Any:
        """``value`` (as given in Python, or as text from the CLI) as this option's type.

        Raises:
            TargetError: naming the target, the option, what was given and what is expected.
        """
        def bad(expected: str) -> TargetError:
            return TargetError(f"target '{target}': option '{self.name}' expects {expected}, "
                               f"got {value!r}")
        if isinstance(value, str) and self.type is not str:
            text = value.strip().lower()
            if self.type is bool:
                if text not in _BOOLEANS:
                    raise bad("true or false")
                value = _BOOLEANS[text]
            else:
                try:
                    value = self.type(text)
                except ValueError:
                    raise bad(f"a{'n' if self.type is int else ''} {self.type.__name__}") \
                        from None
        elif self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise bad(f"a {self.type.__name__}")
        if self.choices and value not in self.choices:
            raise bad(f"one of {', '.join(map(str, self.choices))}")
        return value


_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}


@dataclass(frozen=True)
class Support:
    """Whether a target can run a node; ``reason`` says why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


SUPPORTED = Support(True)


@dataclass
class CompileOptions:
    """What every target's ``compile`` receives besides the stage.

    Attributes:
        threads: worker threads the executable may use (0: all available cores).
        progress: called with one-line status messages during long steps.
        config: the target's options, checked and typed (:meth:`Target.check_options`).
    """

    threads: int = 0
    progress: Callable[[str], None] = lambda message: None
    config: Mapping[str, Any] = field(default_factory=dict)


class Executable(ABC):
    """A compiled stage: runs on DLPack-capable arrays, and saves itself into a folder.

    ``memory_device_type`` is the DLPack device type its inputs must live on (1: host
    memory, 2: CUDA); the runtime hands over arrays already there as they are and copies the
    others in with :meth:`copy_in`.
    """

    memory_device_type: ClassVar[int] = 1

    def copy_in(self, value: Any) -> Any:
        """``value`` (on another device) copied to this executable's memory. Default: host."""
        if type(value).__module__.startswith("torch"):
            return value.detach().cpu().numpy()
        return value.numpy()  # TVM tensors (any device) copy to a host numpy array

    @abstractmethod
    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run on input name -> array (numpy / torch / DLPack); returns output name -> array
        in the executable's native type (convert with :mod:`mmcompile.runtime`)."""

    @abstractmethod
    def save(self, directory: Path, stem: str) -> dict[str, str]:
        """Write the executable's files into ``directory``; returns role -> file name."""

    def describe(self) -> dict[str, Any]:
        """JSON-able facts for the manifest and reports (target details, compile time, ...)."""
        return {}

    def replica(self) -> Executable | None:
        """Another executable over the same compiled code that may run at the same time as
        this one (on another thread), or None when the target cannot provide one."""
        return None


class Target(ABC):
    """A backend. Subclasses set ``name`` and implement ``compile`` and ``load``; they declare
    ``options``, ``pipeline``, ``device`` and override ``supports`` where they need to."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    device: ClassVar[str] = "cpu"
    options: ClassVar[tuple[TargetOption, ...]] = ()
    pipeline: ClassVar[str] = ""

    def supports(self, node: gs.Node, graph: Graph) -> Support:
        """Whether this target can run ``node`` of ``graph`` (default: every node)."""
        return SUPPORTED

    def configured(self, options: Mapping[str, Any]) -> Target:
        """This target set up for its checked ``options``: what placement asks
        :meth:`supports`, for a target whose capability depends on them (an accelerator's
        description decides which layers fit its buffers). A target with such state returns
        a new instance holding it, so two configurations in one process never share one
        (placement keeps one instance per configuration). Default: ``self``.

        Raises:
            MMCompileError: options the target cannot set up from (an invalid description).
        """
        return self

    def host(self, options: Mapping[str, Any]) -> str | None:
        """The target spec that runs the nodes this one cannot (an accelerator's host CPU),
        or None (default): they go to the fallback."""
        return None

    def branch_moves(self, options: Mapping[str, Any]) -> bool:
        """Whether the planner may move a whole branch (a modality's, or the fusion) from
        this target to its :meth:`host` when its cost model says the model then runs faster
        (:mod:`mmcompile.planning.moves`). Default: False."""
        return False

    @classmethod
    def check_options(cls, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """``given`` checked against :attr:`options`, converted to their types, defaults filled.

        Raises:
            TargetError: an unknown option (the valid ones are named) or a value of the wrong
                type.
        """
        known = {o.name: o for o in cls.options}
        unknown = sorted(set(given or {}) - set(known))
        if unknown:
            valid = ", ".join(known) or "none"
            raise TargetError(f"target '{cls.name}' has no option "
                              f"{', '.join(repr(u) for u in unknown)}; its options: {valid}")
        values = {name: option.default for name, option in known.items()}
        for name, value in (given or {}).items():
            values[name] = None if value is None else known[name].convert(value, cls.name)
        return values

    @abstractmethod
    def compile(self, graph: Graph, options: CompileOptions) -> Executable:
        """Compile one stage."""

    @abstractmethod
    def load(self, directory: Path, files: Mapping[str, str], info: Mapping[str, Any],
             threads: int = 0) -> Executable:
        """Load an executable saved by :meth:`Executable.save` (without the compiler)."""

    def why_not_runnable(self) -> str | None:
        """Why code for this target cannot run on this machine (no GPU, say), or None. Such a
        target can still compile and save; measuring and verifying need a runnable one."""
        return None

    def configure_thread(self, threads: int) -> None:
        """Called once on each long-lived worker thread before it runs this target's stages:
        size the calling thread's compute pool to ``threads``. Default: nothing to do."""


_REGISTRY: dict[str, type[Target]] = {}


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator adding a target; two targets with one name is an error."""
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise RegistryError(f"target name '{cls.name}' is registered twice: by "
                            f"{existing.__module__} and {cls.__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_targets() -> None:
    # Target modules import the core; loading the package here (lazily) is what registers them.
    importlib.import_module("mmcompile.targets")


def get_target(name: str) -> Target:
    """An instance of the target registered as ``name`` (``cpu``, ``cuda``, ...)."""
    _load_builtin_targets()
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise TargetError(f"unknown target '{name}'; known targets: "
                          f"{', '.join(sorted(_REGISTRY))}") from None


def registered_targets() -> dict[str, type[Target]]:
    _load_builtin_targets()
    return dict(sorted(_REGISTRY.items()))


TargetSpec = Spec  # a target and its options as written: cpu{mcpu=znver4,winograd=false}


_SPEC = re.compile(r"^\s*([A-Za-z_][\w\-]*)\s*(?:\{(.*)\})?\s*$", re.DOTALL)


def parse_target_spec(text: str) -> TargetSpec:
    """``name`` or ``name{key=value,...}`` -> :class:`TargetSpec` (values kept as text).

    Raises:
        TargetError: malformed text.
    """
    match = _SPEC.match(text or "")
    if match is None:
        raise TargetError(f"malformed target '{text}'; expected NAME or NAME{{KEY=VALUE,...}}, "
                          f"e.g. cpu{{mcpu=znver4,winograd=false}}")
    options = []
    for item in filter(None, (i.strip() for i in (match.group(2) or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TargetError(f"malformed option '{item}' in target '{text}'; expected "
                              f"KEY=VALUE")
        options.append((key.strip(), value.strip()))
    return TargetSpec(match.group(1), tuple(options))


def resolve_target(spec: str, config: Mapping[str, Any] | None = None
                   ) -> tuple[Target, dict[str, Any]]:
    """The target named by ``spec`` (``name`` or ``name{key=value,...}``) and its checked
    options: those in ``spec``, then ``config`` (Python values) over them.

    Raises:
        TargetError: unknown target, malformed spec, unknown or mistyped option.
    """
    parsed = parse_target_spec(spec)
    target = get_target(parsed.name)
    return target, target.check_options({**dict(parsed.options), **dict(config or {})})
