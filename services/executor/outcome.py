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


class StepStopped(BaseException):
    """Raised by ``ctx.heartbeat()`` when the step's run was stopped (cancel, fail_fast)
    while it ran: a long step stops at its next heartbeat instead of running to its end.
    Never a failure: the step ends ``stopped``. A BaseException, as asyncio's
    CancelledError is, so that a handler's ``except Exception`` does not take it for one."""
