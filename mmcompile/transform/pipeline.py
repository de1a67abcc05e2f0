"""Pipelines as data: a list of pass names with options, printable and parsable.

Grammar (whitespace ignored)::

    pipeline := [item ("," item)*]
    item     := NAME ["{" option ("," option)* "}"]          a pass, or a named pipeline
              | "fixpoint(" pipeline ")" ["{max_iterations=N}"]  repeat until nothing changes
    option   := KEY "=" VALUE

``str(parse_pipeline(text))`` gives back an equivalent text, so the CLI, the API and the tests
all speak the same language. Named pipelines (``default``, ``none``) expand in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mmcompile.errors import PipelineError
from mmcompile.spec import Spec

# The default pipeline, in order, with why each step sits where it does:
NAMED_PIPELINES: dict[str, str] = {
    "default": ",".join([
        # (target-independent: what a target needs legalized, it runs on its own stages;
        # see Target.pipeline)
        # shape arithmetic -> constants; identities and duplicates only show up once folded
        "fixpoint(eliminate-identity,fold-constants,eliminate-common-subexpr,eliminate-dead-code)",
        # BN and scale/bias folding need constant weights, hence after folding
        "fuse-conv-bn",
        "fold-scale-bias",
        # activation / norm fusions before MatMul+Add->Gemm: LayerNorm's Add must not be taken
        "fuse-gelu",
        "fuse-layernorm",
        "fuse-gemm",
        "fixpoint(fold-constants,eliminate-dead-code)",
        # attention marking last: it annotates the final node names
        "mark-attention",
    ]),
    "none": "",
}

_NAME = r"[A-Za-z_][A-Za-z0-9_\-]*"


PassSpec = Spec  # one pass in a pipeline: its registered name and its options (as given)


@dataclass(frozen=True)
class Fixpoint:
    """A group of passes repeated until one whole round changes nothing."""

    items: tuple[PassSpec, ...]
    max_iterations: int = 10

    def __str__(self) -> str:
        body = ",".join(str(i) for i in self.items)
        suffix = f"{{max_iterations={self.max_iterations}}}" if self.max_iterations != 10 else ""
        return f"fixpoint({body}){suffix}"


@dataclass(frozen=True)
class Pipeline:
    """An ordered list of passes and fixed-point groups."""

    items: tuple[PassSpec | Fixpoint, ...] = ()

    def __str__(self) -> str:
        return ",".join(str(i) for i in self.items)

    def pass_names(self) -> list[str]:
        """Every pass name, in order, fixed-point groups flattened."""
        names: list[str] = []
        for item in self.items:
            names.extend(p.name for p in item.items) if isinstance(item, Fixpoint) \
                else names.append(item.name)
        return names


class _Parser:
    def __init__(self, text: str):
        self.text = re.sub(r"\s+", "", text)
        self.pos = 0

    def error(self, message: str) -> PipelineError:
        return PipelineError(f"bad pipeline '{self.text}' at column {self.pos + 1}: {message}")

    def peek(self, token: str) -> bool:
        return self.text.startswith(token, self.pos)

    def expect(self, token: str) -> None:
        if not self.peek(token):
            raise self.error(f"expected '{token}'")
        self.pos += len(token)

    def name(self) -> str:
        match = re.compile(_NAME).match(self.text, self.pos)
        if not match:
            raise self.error("expected a pass name")
        self.pos = match.end()
        return match.group(0)

    def options(self) -> tuple[tuple[str, str], ...]:
        if not self.peek("{"):
            return ()
        self.expect("{")
        opts = []
        while True:
            key = self.name()
            self.expect("=")
            match = re.compile(r"[^,{}()]+").match(self.text, self.pos)
            if not match:
                raise self.error(f"option '{key}' has no value")
            self.pos = match.end()
            opts.append((key, match.group(0)))
            if self.peek("}"):
                self.expect("}")
                return tuple(opts)
            self.expect(",")

    def items(self, nested: bool) -> list[PassSpec | Fixpoint]:
        items: list[PassSpec | Fixpoint] = []
        if self.pos == len(self.text) or (nested and self.peek(")")):
            return items
        while True:
            items.extend(self.item(nested))
            if not self.peek(","):
                return items
            self.expect(",")

    def item(self, nested: bool) -> list[PassSpec | Fixpoint]:
        if self.peek("fixpoint("):
            if nested:
                raise self.error("fixpoint groups cannot be nested")
            self.expect("fixpoint(")
            body = self.items(nested=True)
            self.expect(")")
            opts = dict(self.options())
            unknown = set(opts) - {"max_iterations"}
            if unknown:
                raise self.error(f"fixpoint takes only max_iterations, got {sorted(unknown)}")
            try:
                max_iterations = int(opts.get("max_iterations", 10))
            except ValueError:
                raise self.error("max_iterations must be an integer") from None
            if max_iterations < 1:
                raise self.error(f"max_iterations must be at least 1, got {max_iterations}")
            return [Fixpoint(tuple(body), max_iterations)]  # type: ignore[arg-type]
        name = self.name()
        options = self.options()
        if name in NAMED_PIPELINES:
            if options:
                raise self.error(f"named pipeline '{name}' takes no options")
            expanded = parse_pipeline(NAMED_PIPELINES[name]).items
            if nested and any(isinstance(i, Fixpoint) for i in expanded):
                raise self.error(f"named pipeline '{name}' cannot be used inside fixpoint()")
            return list(expanded)
        return [PassSpec(name, options)]


def parse_pipeline(text: str | Pipeline) -> Pipeline:
    """Parse pipeline text (or return a Pipeline unchanged). Pass names are not checked here.

    Raises:
        PipelineError: syntax error, naming the column.
    """
    if isinstance(text, Pipeline):
        return text
    parser = _Parser(text)
    items = parser.items(nested=False)
    if parser.pos != len(parser.text):
        raise parser.error("unexpected text")
    return Pipeline(tuple(items))
