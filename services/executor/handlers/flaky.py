"""A handler for demos and tests that fails on purpose, deterministically where it can.

Params (all optional): ``sleep_ms``, ``p`` (transient failure probability per attempt,
seeded by job id, step and attempt), ``fail_attempts`` (attempts 1..k of the step fail, in
each round: attempts are counted per step), ``fail_rounds`` (every attempt of rounds < k
fails; rounds count from 0), ``poison`` (regex on the file name: permanent failure),
``crash`` (regex: the executor process exits at once), ``dependency`` (the simulated
external dependency, for circuit breakers).

The executor is shared by every tenant, so what a tenant's params can do to it is bounded:

- ``crash`` works only where the operator allowed it (``REDRIVE_EXECUTOR_ALLOW_CRASH``, for
  fault tests). Elsewhere a template using it is refused, and a job using it anyway
  errors its file with that reason: the process never exits.
- The regexes (Python ``re`` syntax) are at most :data:`MAX_PATTERN_CHARS` long, and their
  counted repetitions may not expand past :data:`MAX_PATTERN_SIZE` (compiling
  ``a{4294967294}`` takes minutes).
- A match never runs on the event loop: every tenant's jobs share it, and a backtracking
  pattern (``(a+)+$`` on ``aaa…!``) would hold it, where no step timeout could fire. It
  runs in a thread of a small pool (:data:`MATCH_THREADS`, shared by every tenant) with the
  GIL released, and one that takes longer than :data:`MATCH_TIMEOUT_S` fails the file for
  good. (A linear-time engine such as RE2 would need no limit, but refuses lookarounds and
  backreferences, which the contract's "regex" allows.)
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from re import _constants as sre_constants, _parser as sre_parser  # parse only: a tree to size

import regex

from shared.errors import PermanentError, TransientError
from services.executor.handlers.base import FileRef, StepContext

CRASH_EXIT_CODE = 86
ALLOW_CRASH_SETTING = "REDRIVE_EXECUTOR_ALLOW_CRASH"
MAX_PATTERN_CHARS = 200
# Counted repetitions expanded (``(ab){3}`` is 6): compile time grows with it, ~0.4 µs each.
# A file name is at most 1024 characters: nothing useful needs more.
MAX_PATTERN_SIZE = 10_000
# A name is matched in microseconds by any sane pattern; past this it is backtracking.
# regex counts it in CPU time of the whole process (measured): matches side by side, or a
# busy loop, spend it sooner; a process starved of CPU takes longer than this to spend it.
MATCH_TIMEOUT_S = 0.1
# Matches run here, not on the event loop nor in asyncio's default pool (DNS lookups of
# downloads wait there): a flood of backtracking patterns queues behind its own kind, and
# takes at most this many cores from the loop.
MATCH_THREADS = 2
_MATCHERS = ThreadPoolExecutor(max_workers=MATCH_THREADS, thread_name_prefix="flaky-match")
_REPEATS = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT)


def dependency_of(params: dict, file: FileRef) -> str | None:
    """The simulated dependency named by ``params["dependency"]``, if any."""
    dep = params.get("dependency")
    return str(dep) if dep else None


def _regex(params: dict, name: str) -> regex.Pattern | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PermanentError(f"flaky: param {name!r} must be a regex string, got {type(value).__name__}")
    if len(value) > MAX_PATTERN_CHARS:
        raise PermanentError(f"flaky: param {name!r} is too long: at most {MAX_PATTERN_CHARS} characters, "
                             f"got {len(value)}")
    compiled = _compile(value)
    if isinstance(compiled, str):
        raise PermanentError(f"flaky: param {name!r} {compiled}")
    return compiled


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> regex.Pattern | str:
    """The compiled pattern, or why it is refused (cached: every file of a run asks)."""
    try:
        # Parsed by re first: the syntax stays Python's re (that of the contract), and the
        # tree tells how far its repetitions expand before regex spends time compiling them.
        size = _expanded_size(sre_parser.parse(pattern))
        if size > MAX_PATTERN_SIZE:
            return (f"is too complex: its repetitions expand to more than {MAX_PATTERN_SIZE} items "
                    "(a file name is at most 1024 characters)")
        return regex.compile(pattern, regex.VERSION0)
    except (re.error, regex.error, OverflowError, RecursionError, ValueError) as exc:
        return f"is not a valid regex: {exc}"


def _expanded_size(parsed) -> int:
    """How many items a parsed pattern holds once its counted repetitions are written out."""
    total = 0
    for op, av in parsed:
        if op in _REPEATS:
            low, high, sub = av
            total += max(1, low if high == sre_constants.MAXREPEAT else high) * _expanded_size(sub)
        else:
            total += max(1, sum(_expanded_size(child) for child in _subpatterns(av)))
        if total > MAX_PATTERN_SIZE:
            break  # enough to refuse it
    return total


def _subpatterns(av):
    if isinstance(av, sre_parser.SubPattern):
        yield av
    elif isinstance(av, (tuple, list)):
        for item in av:
            yield from _subpatterns(item)


# A match that timed out having worked less than half its limit was starved, not slow: it
# waited for the GIL (regex's limit counts time, not this thread's work). Measured: 6 of
# 20,000 matches of "bad" timed out beside three busy threads, and failed their files.
_STARVED_ATTEMPTS = 3


def _search(pattern: regex.Pattern, file_name: str):
    """In a matcher thread: ``pattern.search`` within MATCH_TIMEOUT_S of this thread's work."""
    for _ in range(_STARVED_ATTEMPTS - 1):
        worked_from = time.thread_time()
        try:
            return pattern.search(file_name, timeout=MATCH_TIMEOUT_S, concurrent=True)
        except TimeoutError:
            if time.thread_time() - worked_from >= MATCH_TIMEOUT_S / 2:
                raise
    return pattern.search(file_name, timeout=MATCH_TIMEOUT_S, concurrent=True)


async def _matches(pattern: regex.Pattern | None, param: str, file_name: str) -> bool:
    """Whether ``pattern`` is found in the name, in at most MATCH_TIMEOUT_S (PermanentError past it),
    matched in a thread: the event loop goes on serving every other job meanwhile."""
    if pattern is None:
        return False
    # regex holds the GIL while matching unless told otherwise (measured: a match in a thread
    # still stalls the loop for its whole length); a str cannot change meanwhile, so it is safe.
    search = functools.partial(_search, pattern, file_name)
    try:
        # Time queued behind other matches is not this pattern's: the limit starts with the match.
        return await asyncio.get_running_loop().run_in_executor(_MATCHERS, search) is not None
    except TimeoutError:
        raise PermanentError(f"flaky: param {param!r}: pattern took too long (over {MATCH_TIMEOUT_S:g} s) "
                             "to match this file's name; simplify it") from None


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


_PARAMS = ("sleep_ms", "p", "fail_attempts", "fail_rounds", "poison", "crash", "dependency")


def _parse(params: dict, *, allow_crash: bool) -> tuple:
    """Every param, checked (PermanentError naming the first bad one)."""
    # Validate everything first: a typo in one param must not hide behind another's effect,
    # nor be ignored (``fail_attempt`` would make a template that never fails).
    unknown = sorted(str(name) for name in params if name not in _PARAMS)
    if unknown:
        raise PermanentError(f"flaky: unknown param {unknown[0][:100]!r} (its params: {', '.join(_PARAMS)})")
    crash, poison = _regex(params, "crash"), _regex(params, "poison")
    sleep_ms = _number(params, "sleep_ms", maximum=24 * 3600 * 1000)
    p = _number(params, "p", maximum=1)
    fail_attempts = _number(params, "fail_attempts", whole=True)
    fail_rounds = _number(params, "fail_rounds", whole=True)
    dep = params.get("dependency")
    if dep is not None and not isinstance(dep, str):
        raise PermanentError(f"flaky: param 'dependency' must be a string, got {type(dep).__name__}")
    if crash is not None and not allow_crash:
        raise PermanentError("flaky: param 'crash' is disabled on this system: it stops the executor every "
                             "tenant shares, so it works only where the operator enables it for fault tests "
                             f"(setting executor_allow_crash, {ALLOW_CRASH_SETTING}=true)")
    return crash, poison, sleep_ms, p, fail_attempts, fail_rounds


@dataclass(frozen=True, slots=True)
class Flaky:
    """The handler, as the executor's settings allow it (``builtin_registry`` makes it)."""

    allow_crash: bool = False  # REDRIVE_EXECUTOR_ALLOW_CRASH

    def check_params(self, params: dict) -> None:
        """For a template being made: the same checks as a run's (registry.check_steps)."""
        _parse(params, allow_crash=self.allow_crash)

    async def run(self, ctx: StepContext) -> dict:
        """Crash, poison, sleep, then fail transiently as the params say; output ``{"attempt"}``."""
        crash, poison, sleep_ms, p, fail_attempts, fail_rounds = _parse(ctx.params, allow_crash=self.allow_crash)

        if await _matches(crash, "crash", ctx.file.name):
            # No cleanup, no ack: exactly what a segfault or an OOM kill looks like to the broker.
            os._exit(CRASH_EXIT_CODE)
        if await _matches(poison, "poison", ctx.file.name):
            raise PermanentError(f"flaky: {ctx.file.name!r} is poison")
        if sleep_ms > 0:
            await asyncio.sleep(sleep_ms / 1000)
        if ctx.attempt <= fail_attempts or ctx.round < fail_rounds:
            raise _transient(ctx)
        # Seeded by job, step and attempt so a replay of the same attempt decides the same way
        # (and two steps, whose attempts are both counted from 1, do not decide alike).
        if p > 0 and random.Random(f"{ctx.job_id}:{ctx.step_index}:{ctx.attempt}").random() < p:
            raise _transient(ctx)
        return {"attempt": ctx.attempt}


# The handler as a system that does not allow crashes has it (an immutable instance).
_DEFAULT = Flaky()
check_params = _DEFAULT.check_params
run = _DEFAULT.run
