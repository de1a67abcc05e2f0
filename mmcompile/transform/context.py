"""PassContext and instruments.

A :class:`PassContext` carries what a pipeline run is configured with (opt level, disabled
passes, free-form config, instruments, whether to verify after each pass). It is passed
explicitly; there is no global current context. Instruments observe a run from outside: they
never change what a pass does.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmcompile.ir import Graph
    from mmcompile.transform.pass_base import Pass, PassResult


class Instrument:
    """Hooks called around every pass. Subclass and override what you need."""

    def enter(self, ctx: PassContext) -> None:
        """Called once before the first pass of a pipeline run."""

    def exit(self, ctx: PassContext) -> None:
        """Called once after the last pass (also when a pass failed)."""

    def before_pass(self, graph: Graph, pass_: Pass) -> None:
        """Called before ``pass_`` runs on ``graph``."""

    def after_pass(self, graph: Graph, pass_: Pass, result: PassResult) -> None:
        """Called after ``pass_`` ran successfully."""


@dataclass
class PassContext:
    """Configuration of one pipeline run.

    Attributes:
        opt_level: passes whose ``opt_level`` is above this are skipped (0 runs only level-0
            passes; 2, the default, runs everything built in).
        disabled_passes: pass names to skip.
        config: free-form options passes may read (documented by each pass).
        instruments: observers called around each pass.
        verify_each: run ``Graph.verify()`` after every pass (debug mode; the tests use it).
    """

    opt_level: int = 2
    disabled_passes: frozenset[str] = frozenset()
    config: Mapping[str, Any] = field(default_factory=dict)
    instruments: list[Instrument] = field(default_factory=list)
    verify_each: bool = False

    def __post_init__(self) -> None:
        self.disabled_passes = frozenset(self.disabled_passes)


class TimingInstrument(Instrument):
    """Wall time spent in each pass, summed over invocations (fixed-point rounds included)."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self._start = 0.0

    def before_pass(self, graph: Graph, pass_: Pass) -> None:
        self._start = time.perf_counter()

    def after_pass(self, graph: Graph, pass_: Pass, result: PassResult) -> None:
        self.seconds[pass_.name] += time.perf_counter() - self._start
        self.calls[pass_.name] += 1

    def render(self) -> str:
        """A table of passes by total time, largest first."""
        from mmcompile.report import format_table
        rows = [(name, self.calls[name], f"{secs * 1000:.1f}")
                for name, secs in self.seconds.most_common()]
        return format_table(["pass", "calls", "ms"], rows)


class IRDumpInstrument(Instrument):
    """Saves the graph after every pass that changed it, as ``NNN-<pass>.onnx`` in a folder."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.count = 0

    def enter(self, ctx: PassContext) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def after_pass(self, graph: Graph, pass_: Pass, result: PassResult) -> None:
        if result.changed:
            self.count += 1
            graph.save(self.directory / f"{self.count:03d}-{pass_.name}.onnx", check=False)


class CallbackInstrument(Instrument):
    """Calls ``fn(event, pass_name, result_or_None)``; handy for progress displays and tests."""

    def __init__(self, fn):
        self.fn = fn

    def before_pass(self, graph: Graph, pass_: Pass) -> None:
        self.fn("before", pass_.name, None)

    def after_pass(self, graph: Graph, pass_: Pass, result: PassResult) -> None:
        self.fn("after", pass_.name, result)

