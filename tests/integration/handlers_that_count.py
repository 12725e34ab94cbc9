"""REDRIVE_HANDLERS for tests of per-step retry budgets: a handler that fails by how often
it was called, not by the attempt number the executor gives it, so that a test can tell
which attempt numbers the executor hands each step.

``fails_first`` (param ``calls``): the first ``calls`` calls for one (run, file, step), over
all rounds, fail transiently; after that it outputs ``{"calls", "attempt"}``. Counts live in
this module (the executor of a test stack runs in the test's process)."""

from __future__ import annotations

from collections import Counter

from shared.errors import TransientError

calls: Counter = Counter()  # (run_id, file_index, step_index) → calls so far
attempts: dict[tuple, list[int]] = {}  # (job_id, file_index, step_index) → ctx.attempt of each call


async def fails_first(ctx) -> dict:
    key = (ctx.run_id, ctx.file_index, ctx.step_index)
    calls[key] += 1
    attempts.setdefault((ctx.job_id, ctx.file_index, ctx.step_index), []).append(ctx.attempt)
    if calls[key] <= int(ctx.params.get("calls", 0)):
        raise TransientError(f"fails_first: call {calls[key]} of step {ctx.step_index} fails")
    return {"calls": calls[key], "attempt": ctx.attempt}


def register(registry) -> None:
    registry.register("fails_first", fails_first)
