"""What a tenant's flaky params can do to the executor every tenant shares: ``crash`` only
where the operator allows it, and regexes bounded in length, in size and in match time."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shared.errors import PermanentError
from services.executor.handlers import flaky
from services.executor.handlers.base import FileRef, StepContext
from services.executor.handlers.registry import builtin_registry

ROOT = Path(__file__).resolve().parents[2]
CATASTROPHIC = r"(a+)+$"
# The audit's name: 27 characters, where Python's re backtracks for seconds.
SHORT = "a" * 26 + "!"
LONG = "a" * 1023 + "!"  # the longest file name a run takes (1024)


def ctx(params: dict, name: str = "boom.txt") -> StepContext:
    return StepContext(job_id="j", run_id="r", tenant_id="t", file_index=0, round=0, attempt=1, step_index=0,
                       step_name="s", params=params, file=FileRef(name), previous_output=None,
                       artifact_root=Path("."))


def _in_a_process(snippet: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``snippet`` in a python of its own: a crash, or a match that never ends, takes
    that process and not the test run with it."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(snippet)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# --- crash: off unless the operator turns it on ----------------------------------------------


def test_a_template_using_crash_is_refused_unless_the_system_allows_it():
    steps = [{"handler": "flaky", "params": {"crash": "^boom"}}]
    problems = builtin_registry().check_steps(steps)
    why = problems["steps.0.params"]
    assert "'crash' is disabled on this system" in why
    assert "REDRIVE_EXECUTOR_ALLOW_CRASH" in why and "executor_allow_crash" in why
    assert builtin_registry(allow_crash=True).check_steps(steps) == {}
    # Absent (or null), nothing to refuse: the other params still work.
    assert builtin_registry().check_steps([{"handler": "flaky", "params": {"crash": None, "p": 0.5}}]) == {}


def test_a_job_using_crash_anyway_errors_its_file_and_the_process_lives_on():
    proc = _in_a_process("""
        import asyncio
        from pathlib import Path
        from shared.errors import PermanentError
        from services.executor.handlers.base import FileRef, StepContext
        from services.executor.handlers.registry import builtin_registry

        ctx = StepContext(job_id="j", run_id="r", tenant_id="t", file_index=0, round=0, attempt=1, step_index=0,
                          step_name="s", params={"crash": "^boom"}, file=FileRef("boom.txt"),
                          previous_output=None, artifact_root=Path("."))
        try:
            asyncio.run(builtin_registry().get("flaky").run(ctx))
        except PermanentError as exc:
            print("permanent:", exc, flush=True)
        print("survived", flush=True)
    """)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    lines = proc.stdout.splitlines()
    assert lines[-1] == "survived"
    assert "'crash' is disabled on this system" in lines[0] and "REDRIVE_EXECUTOR_ALLOW_CRASH" in lines[0]


def test_the_module_level_handler_is_the_one_without_crashes():
    with pytest.raises(PermanentError, match="'crash' is disabled"):
        flaky.check_params({"crash": "x"})
    flaky.Flaky(allow_crash=True).check_params({"crash": "x"})


# --- regexes: bounded length, size and time --------------------------------------------------


@pytest.mark.parametrize("param", ["poison", "crash"])
def test_a_pattern_longer_than_the_limit_is_refused(param):
    handler = flaky.Flaky(allow_crash=True)
    handler.check_params({param: "a" * flaky.MAX_PATTERN_CHARS})
    with pytest.raises(PermanentError, match=rf"flaky: param '{param}' is too long: at most 200 characters"):
        handler.check_params({param: "a" * (flaky.MAX_PATTERN_CHARS + 1)})
    problems = builtin_registry().check_steps([{"handler": "flaky", "params": {"poison": "x" * 201}}])
    assert "too long" in problems["steps.0.params"]


@pytest.mark.parametrize("pattern", [r"a{4294967294}", r"(a{60000}){60000}", r"((a{100}){100}){2}",
                                     r"(?=b{20000})", r"x|y{10001}"])
def test_a_pattern_whose_repetitions_would_take_long_to_compile_is_refused_at_once(pattern):
    # Compiling a{4294967294} takes minutes, on the loop: refused from its parse, in microseconds.
    started = time.perf_counter()
    with pytest.raises(PermanentError, match="is too complex"):
        flaky.check_params({"poison": pattern})
    assert time.perf_counter() - started < 0.5
    # Ordinary patterns, and repetitions a 1024-character name could need, are still taken.
    for ordinary in (r"^bad", r"\.exe$", r"(?i)^[a-z]{1,64}\.(pdf|csv)$", r"x{1000}", r"(ab){5000}"):
        flaky.check_params({"poison": ordinary})


def test_a_catastrophic_pattern_errors_the_file_within_a_bound_and_never_holds_the_loop():
    # In a process of its own: without the limit, re backtracks for seconds on the short
    # name and for ever on the long one, with the GIL held (nothing in-process could stop it).
    # With it, but matched on the loop, the loop stalled for the whole MATCH_TIMEOUT_S (and
    # more under load): every other tenant's jobs waited.
    proc = _in_a_process(f"""
        import asyncio, time
        from pathlib import Path
        from shared.errors import PermanentError
        from services.executor.handlers import flaky
        from services.executor.handlers.base import FileRef, StepContext

        async def main():
            ticks = []

            async def ticker():  # the event loop keeps turning meanwhile
                while True:
                    ticks.append(time.perf_counter())
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(ticker())
            await asyncio.sleep(0.05)
            for name in ({SHORT!r}, {LONG!r}):
                ctx = StepContext(job_id="j", run_id="r", tenant_id="t", file_index=0, round=0, attempt=1,
                                  step_index=0, step_name="s", params={{"poison": {CATASTROPHIC!r}}},
                                  file=FileRef(name), previous_output=None, artifact_root=Path("."))
                started = time.perf_counter()
                try:
                    print("returned", await flaky.run(ctx), flush=True)
                except PermanentError as exc:
                    print("permanent", round(time.perf_counter() - started, 3), exc, flush=True)
                await asyncio.sleep(0.05)
            task.cancel()
            print("longest_gap", round(max(b - a for a, b in zip(ticks, ticks[1:])), 3), flush=True)

        asyncio.run(main())
    """, timeout=30)
    assert proc.returncode == 0, proc.stderr
    short, long_, _gap = proc.stdout.splitlines()
    assert short == "returned {'attempt': 1}"  # no match, found at once
    kind, elapsed, why = long_.split(" ", 2)
    assert kind == "permanent" and float(elapsed) < 1.0, long_
    assert "flaky: param 'poison': pattern took too long" in why
    # That the loop turns meanwhile (the match in a thread, without the GIL) is the next
    # test's, with a limit long enough to tell the two apart on a busy machine.


async def test_a_pattern_that_times_out_is_a_permanent_error_not_a_step_timeout(monkeypatch):
    monkeypatch.setattr(flaky, "MATCH_TIMEOUT_S", 0.01)
    with pytest.raises(PermanentError, match="pattern took too long") as info:
        await flaky.run(ctx({"poison": CATASTROPHIC}, LONG))
    assert not isinstance(info.value, TimeoutError)  # the step's own timeout would make it transient
    # Patterns that match in time still decide as before.
    with pytest.raises(PermanentError, match="is poison"):
        await flaky.run(ctx({"poison": r"(?i)^BAD-\d+\.csv$"}, "bad-3.csv"))
    assert await flaky.run(ctx({"poison": r"^bad"}, "good.csv")) == {"attempt": 1}
    with pytest.raises(PermanentError, match="is poison"):  # the audit's pattern, on a name it matches
        await flaky.run(ctx({"poison": CATASTROPHIC}, "a" * 40))


def test_a_crash_pattern_is_matched_off_the_loop_too():
    proc = _in_a_process(f"""
        import asyncio, time
        from pathlib import Path
        from shared.errors import PermanentError
        from services.executor.handlers import flaky
        from services.executor.handlers.base import FileRef, StepContext

        # A long limit: a match on the loop would stop it that long, far past what a busy
        # machine's scheduling can (the assertion below has room for both).
        flaky.MATCH_TIMEOUT_S = 1.0

        async def main():
            ticks = []

            async def ticker():
                while True:
                    ticks.append(time.perf_counter())
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(ticker())
            await asyncio.sleep(0.05)
            ctx = StepContext(job_id="j", run_id="r", tenant_id="t", file_index=0, round=0, attempt=1,
                              step_index=0, step_name="s", params={{"crash": {CATASTROPHIC!r}}},
                              file=FileRef({LONG!r}), previous_output=None, artifact_root=Path("."))
            try:
                await flaky.Flaky(allow_crash=True).run(ctx)
            except PermanentError as exc:
                print("permanent", exc, flush=True)
            await asyncio.sleep(0.05)
            task.cancel()
            print("longest_gap", round(max(b - a for a, b in zip(ticks, ticks[1:])), 3), flush=True)

        asyncio.run(main())
    """, timeout=30)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)  # timed out: no crash
    why, gap = proc.stdout.splitlines()
    assert why.startswith("permanent flaky: param 'crash': pattern took too long"), why
    assert float(gap.split()[1]) < 0.5, gap


async def test_many_catastrophic_matches_at_once_all_end_and_the_loop_keeps_turning(monkeypatch):
    # A limit long enough that a match on the loop would stop it for longer than a busy
    # machine's scheduling does (the gap bound below sits between the two).
    monkeypatch.setattr(flaky, "MATCH_TIMEOUT_S", 0.25)
    ticks: list[float] = []

    async def ticker():
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    started = time.perf_counter()
    results = await asyncio.gather(*(flaky.run(ctx({"poison": CATASTROPHIC}, LONG)) for _ in range(8)),
                                   return_exceptions=True)
    elapsed = time.perf_counter() - started
    await asyncio.sleep(0.02)  # a tick after the last match too
    task.cancel()
    assert all(isinstance(r, PermanentError) and "took too long" in str(r) for r in results), results
    # They queue for the matcher threads (regex's limit is CPU time of the whole process, so
    # matches side by side time out sooner): at most 8 x MATCH_TIMEOUT_S, and then some.
    assert elapsed < 8 * flaky.MATCH_TIMEOUT_S + 2, elapsed
    assert max(b - a for a, b in zip(ticks, ticks[1:])) < 0.2


class _StarvedOnce:
    """A pattern whose first search times out without working (it waited for the GIL
    beside busy threads), as seen: 6 of 20,000 searches of "bad" did."""

    def __init__(self, starved: int) -> None:
        self.starved, self.calls = starved, 0

    def search(self, name, timeout, concurrent):
        self.calls += 1
        if self.calls <= self.starved:
            raise TimeoutError("regex timed out")
        return "found"


async def test_a_match_starved_of_the_gil_is_tried_again_not_failed():
    starved = _StarvedOnce(starved=1)
    assert await flaky._matches(starved, "poison", "ok-1.txt") is True and starved.calls == 2
    # Starved every time it is tried: a permanent error all the same, never a wait without end.
    always = _StarvedOnce(starved=10)
    with pytest.raises(PermanentError, match="pattern took too long"):
        await flaky._matches(always, "poison", "ok-1.txt")
    assert always.calls == flaky._STARVED_ATTEMPTS


def test_an_unknown_param_is_refused_naming_it_and_the_known_ones():
    with pytest.raises(PermanentError, match=r"flaky: unknown param 'fail_attempt' \(its params: sleep_ms, p, "):
        flaky.check_params({"fail_attempts": 1, "fail_attempt": 2})
    flaky.check_params({"sleep_ms": 1, "p": 0.5, "fail_attempts": 1, "fail_rounds": 1, "poison": "x", "dependency": "d"})
