"""What running one file's steps came to, and nothing about how to acknowledge it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shared.errors import Classified


@dataclass(frozen=True, slots=True)
class Outcome:
    # stopped: its run was stopped (cancel, fail_fast) while it ran; overtaken: another
    # delivery of this message checkpointed this far first; superseded: a copy of the job
    # (another message) did. Each ends at a checkpoint, before the next step, and none is a
    # result: nothing is published for them.
    kind: Literal["succeeded", "retry", "failed", "errored", "defer", "stopped", "overtaken", "superseded"]
    step: int
    output: dict[str, Any] | None = None
    error: Classified | None = None
    delay_ms: int = 0
    # defer: the dependency whose breaker is open, and when that open period began.
    dependency: str | None = None
    opened_at: float | None = None
