"""A handler for demos and tests that fails on purpose, deterministically where it can.

Params (all optional): ``sleep_ms``, ``p`` (transient failure probability per attempt,
seeded by job id and attempt), ``fail_attempts`` (attempts 1..k of each round fail),
``fail_rounds`` (every attempt of rounds < k fails; rounds count from 0), ``poison`` (regex
on the file name: permanent failure), ``crash`` (regex: the executor process exits at
once), ``dependency`` (the simulated external dependency, for circuit breakers).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re

from shared.errors import PermanentError, TransientError
from services.executor.handlers.base import FileRef, StepContext

CRASH_EXIT_CODE = 86


def dependency_of(params: dict, file: FileRef) -> str | None:
    """The simulated dependency named by ``params["dependency"]``, if any."""
    dep = params.get("dependency")
    return str(dep) if dep else None


def _regex(params: dict, name: str) -> re.Pattern | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PermanentError(f"flaky: param {name!r} must be a regex string, got {type(value).__name__}")
    try:
        return re.compile(value)  # re caches compiled patterns, so this is cheap per call
    except re.error as exc:
        raise PermanentError(f"flaky: param {name!r} is not a valid regex: {exc}") from None


def _number(params: dict, name: str, *, whole: bool = False, maximum: float | None = None) -> float:
    value = params.get(name)
    if value is None:
        return 0
    ok = (
        not isinstance(value, bool)  # bool is an int subclass; True is not "1 attempt"
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value >= 0
        and (maximum is None or value <= maximum)
        and (not whole or value == int(value))
    )
    if not ok:
        kind = "a whole number" if whole else "a number"
        bound = f" between 0 and {maximum:g}" if maximum is not None else " >= 0"
        raise PermanentError(f"flaky: param {name!r} must be {kind}{bound}, got {value!r}")
    return value


def _transient(ctx: StepContext) -> TransientError:
    return TransientError(f"flaky: simulated transient failure (attempt {ctx.attempt})")


def _parse(params: dict) -> tuple:
    """Every param, checked (PermanentError naming the first bad one)."""
    # Validate everything first: a typo in one param must not hide behind another's effect.
    crash, poison = _regex(params, "crash"), _regex(params, "poison")
    sleep_ms = _number(params, "sleep_ms", maximum=24 * 3600 * 1000)
    p = _number(params, "p", maximum=1)
    fail_attempts = _number(params, "fail_attempts", whole=True)
    fail_rounds = _number(params, "fail_rounds", whole=True)
    dep = params.get("dependency")
    if dep is not None and not isinstance(dep, str):
        raise PermanentError(f"flaky: param 'dependency' must be a string, got {type(dep).__name__}")
    return crash, poison, sleep_ms, p, fail_attempts, fail_rounds


def check_params(params: dict) -> None:
    """For a template being made: the same checks as a run's (registry.check_steps)."""
    _parse(params)


async def run(ctx: StepContext) -> dict:
    """Crash, poison, sleep, then fail transiently as the params say; output ``{"attempt"}``."""
    crash, poison, sleep_ms, p, fail_attempts, fail_rounds = _parse(ctx.params)

    if crash is not None and crash.search(ctx.file.name):
        # No cleanup, no ack: exactly what a segfault or an OOM kill looks like to the broker.
        os._exit(CRASH_EXIT_CODE)
    if poison is not None and poison.search(ctx.file.name):
        raise PermanentError(f"flaky: {ctx.file.name!r} is poison")
    if sleep_ms > 0:
        await asyncio.sleep(sleep_ms / 1000)
    if ctx.attempt <= fail_attempts or ctx.round < fail_rounds:
        raise _transient(ctx)
    # Seeded by job and attempt so a replay of the same attempt decides the same way.
    if p > 0 and random.Random(f"{ctx.job_id}:{ctx.attempt}").random() < p:
        raise _transient(ctx)
    return {"attempt": ctx.attempt}
