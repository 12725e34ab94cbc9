"""A handler for demos and tests that fails on purpose, deterministically where it can.

Params (all optional): ``sleep_ms``, ``p`` (transient failure probability per attempt,
seeded by job id and attempt), ``fail_attempts`` (attempts 1..k of each round fail),
``fail_rounds`` (every attempt of rounds < k fails), ``poison`` (regex on the file name:
permanent failure), ``crash`` (regex: the executor process exits at once),
``dependency`` (the simulated external dependency, for circuit breakers).
"""

from __future__ import annotations

import asyncio
import os
import random
import re

from shared.errors import PermanentError, TransientError
from services.executor.handlers.base import FileRef, StepContext

CRASH_EXIT_CODE = 86


def dependency_of(params: dict, file: FileRef) -> str | None:
    dep = params.get("dependency")
    return str(dep) if dep else None


def _regex(params: dict, name: str) -> re.Pattern | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        return re.compile(str(value))
    except re.error as exc:
        raise PermanentError(f"flaky: param {name!r} is not a valid regex: {exc}") from None


def _number(params: dict, name: str, kind=int):
    value = params.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PermanentError(f"flaky: param {name!r} must be a number")
    return kind(value)


async def run(ctx: StepContext) -> dict:
    params = ctx.params
    crash, poison = _regex(params, "crash"), _regex(params, "poison")
    if crash is not None and crash.search(ctx.file.name):
        os._exit(CRASH_EXIT_CODE)
    if poison is not None and poison.search(ctx.file.name):
        raise PermanentError(f"flaky: {ctx.file.name!r} is poison")
    sleep_ms = _number(params, "sleep_ms", float)
    if sleep_ms > 0:
        await asyncio.sleep(sleep_ms / 1000)
    if ctx.attempt <= _number(params, "fail_attempts"):
        raise TransientError(f"flaky: simulated transient failure (attempt {ctx.attempt})")
    if ctx.round < _number(params, "fail_rounds"):
        raise TransientError(f"flaky: simulated transient failure in round {ctx.round} (attempt {ctx.attempt})")
    p = _number(params, "p", float)
    if p > 0 and random.Random(f"{ctx.job_id}:{ctx.attempt}").random() < p:
        raise TransientError(f"flaky: simulated transient failure (attempt {ctx.attempt})")
    return {"attempt": ctx.attempt}
