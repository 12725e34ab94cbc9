"""What running one file's steps came to, and nothing about how to acknowledge it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shared.errors import Classified


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Literal["succeeded", "retry", "failed", "errored", "defer"]
    step: int
    output: dict[str, Any] | None = None
    error: Classified | None = None
    delay_ms: int = 0
    # defer: the dependency whose breaker is open, and when that open period began.
    dependency: str | None = None
    opened_at: float | None = None
