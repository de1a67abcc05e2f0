"""How a pass or a target is written with its options: ``NAME`` or ``NAME{KEY=VALUE,...}``
(``fold-constants{size_threshold=1024}``, ``cpu{mcpu=znver4,winograd=false}``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Spec:
    """A name and its options, as written (values are text; their owner types them)."""

    name: str
    options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.options) + "}"
