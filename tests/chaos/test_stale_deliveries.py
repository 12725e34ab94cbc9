"""Chaos: a delivery of a job that another has overtaken must not go on running its steps.

* An executor frozen (SIGSTOP) mid-step loses its job to another executor after the ack
  wait; thawed, it may finish the step it was in, but must stop at its next checkpoint
  instead of running the steps the other executor ran.
* A fail_fast run stopped while a file's job is in flight, then continued: the old
  round's job may finish its current step, but must stop at its next checkpoint instead of
  running the steps the new round's job runs.

The step log (tests/chaos/handlers.py) records every start of a step, by which process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.chaos.invariants import check
from tests.procs import ProcStack
from tests.stack import drained

pytestmark = pytest.mark.chaos

STEP_MS = 500


def starts(log: Path, run_id: str) -> list[dict]:
    if not log.exists():
        return []
    return [e for e in (json.loads(line) for line in log.read_text().splitlines() if line.strip())
            if e["run"] == run_id]


async def until_logged(log: Path, run_id: str, pred, timeout: float = 10) -> dict:
    """The first step start of the run matching ``pred`` (bounded poll of the step log)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in starts(log, run_id) if pred(e)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no such step start within {timeout}s: {starts(log, run_id)}")
        await asyncio.sleep(0.02)


def chaos_steps(log: Path, n: int, first: int = 0) -> list[dict]:
    return [{"name": f"s{i}", "handler": "chaos_step", "params": {"log": str(log), "sleep_ms": STEP_MS}}
            for i in range(first, first + n)]


async def test_a_frozen_executor_thawed_does_not_run_the_steps_its_successor_ran(chaos_settings, tmp_path):
    settings = await chaos_settings()  # executor ack wait 2 s, keepalive on
    stack = await ProcStack(settings, executors=2).start("billing", "coordinator", "notifier", "executor")
    frozen = None
    try:
        log = tmp_path / "steps.log"
        tenant = await stack.tenant(monthly=100)
        template = await stack.template(tenant, chaos_steps(log, 5))
        run_id = (await stack.submit(tenant, template, 1))["id"]

        # A is whichever executor took the job: freeze it in step 1 (step 0 is checkpointed).
        a = (await until_logged(log, run_id, lambda e: e["step"] == 1))["pid"]
        frozen = next(p for p in stack.procs["executor"] if p.pid == a)
        os.kill(a, signal.SIGSTOP)
        # After the ack wait B is handed the job; it resumes from A's checkpoint.
        await until_logged(log, run_id, lambda e: e["pid"] != a, timeout=10)
        run = await stack.wait_run(tenant, run_id, timeout=15)
        assert run["status"] == "COMPLETED", run
        os.kill(a, signal.SIGCONT)
        frozen = None

        # A's step 1 ended long ago: thawed, it is at its next checkpoint at once, finds it
        # overtaken, and stops there (its log says so).
        deadline = time.monotonic() + 10
        while not any("job.overtaken" in line and run_id in line
                      for line in (stack.logs / "executor.log").read_text().splitlines()):
            assert time.monotonic() < deadline, "the thawed executor never said it was overtaken"
            await asyncio.sleep(0.05)
        seen = starts(log, run_id)
        by = [("A" if e["pid"] == a else "B", e["step"]) for e in seen]
        dups = {s: n for s, n in sorted(Counter(e["step"] for e in seen).items()) if n > 1}
        after_freeze = [s for who, s in by if who == "A" and s > 1]
        assert not after_freeze and set(dups) <= {1} and all(n == 2 for n in dups.values()), (
            f"the thawed executor went on after its frozen step 1: A ran {after_freeze} after the thaw; "
            f"steps run twice {dups}; starts {by}")
        assert sorted(s for who, s in by if who == "B") == [1, 2, 3, 4], by

        await check(stack, tenant, [run_id], step_log=log)  # counts, fan-in once, books balance
        charges = [e for e in await stack.ledger(tenant) if e["run_id"] == run_id and e["kind"] == "charge"]
        assert sum(-e["amount"] for e in charges) == 1, charges  # one file, charged once
        print(f"starts {by}")
    finally:
        if frozen is not None:
            os.kill(frozen.pid, signal.SIGCONT)
        await stack.stop()


async def test_a_stopped_runs_job_in_flight_does_not_run_the_continued_rounds_steps(chaos_settings, tmp_path):
    settings = await chaos_settings()
    stack = await ProcStack(settings).start("billing", "coordinator", "notifier", "executor")
    try:
        log = tmp_path / "steps.log"
        tenant = await stack.tenant(monthly=100)
        steps = [{"name": "gate", "handler": "flaky", "params": {"poison": "^bad"}}, *chaos_steps(log, 3, first=1)]
        template = await stack.template(tenant, steps, failure_policy="fail_fast")
        run_id = (await stack.submit(tenant, template, 0, files=[{"name": "good.pdf"}, {"name": "bad.pdf"}]))["id"]

        # bad.pdf is poison: ERROR at step 0 at once, and fail_fast stops the run while
        # good.pdf's round-0 job is in flight (past step 0, in its chaos steps).
        run = await stack.wait_run(tenant, run_id, timeout=10)
        assert run["status"] == "FAILED", run
        in_flight = [e["step"] for e in starts(log, run_id) if e["round"] == 0]
        await stack.call("coordinator", "retry_failed", tenant_id=tenant, actor="test", run_id=run_id)
        continued = time.monotonic()
        run = await stack.wait_run(tenant, run_id, timeout=15)
        # Both jobs' deliveries acked: the round-0 one stopped (or ran to its end).
        await drained(stack, stack.names.jobs_stream, stack.names.executor_consumer, timeout=10)
        elapsed = time.monotonic() - continued

        seen = starts(log, run_id)
        by = [(e["round"], e["step"]) for e in seen]
        assert all(e["file"] == 0 for e in seen), by
        dups = {s: n for s, n in sorted(Counter(e["step"] for e in seen).items()) if n > 1}
        round0 = [s for r, s in by if r == 0]
        first_r1 = min((e["t"] for e in seen if e["round"] == 1), default=float("inf"))
        r0_after_continue = [e["step"] for e in seen if e["round"] == 0 and e["t"] > first_r1]
        # The round-0 job may finish the step it was in (it may run twice: once in each
        # round); it starts nothing once the new round's job runs, and no later step runs twice.
        current = max(round0, default=None)
        assert not r0_after_continue and set(dups) <= {current} and all(n == 2 for n in dups.values()), (
            f"the stopped round-0 job went on: it started {r0_after_continue} after round 1 began; "
            f"steps run twice {dups}; starts (round, step) {by}")
        assert sorted({s for r, s in by}) == [1, 2, 3], by

        run = await stack.run(tenant, run_id)
        assert run["status"] == "COMPLETED_WITH_ERRORS", run["status"]  # bad.pdf is ERROR: never retried
        assert [f["status"] for f in sorted(run["files"], key=lambda f: f["index"])] == ["SUCCEEDED", "ERROR"]
        await check(stack, tenant, [run_id])
        # Continue charges FAILED files only: there were none (bad.pdf is ERROR, good.pdf was
        # PENDING: free; its ledger entry is a charge of 0). The run's only credits are the
        # two files' at its start, and nothing is refunded.
        entries = [e for e in await stack.ledger(tenant) if e["run_id"] == run_id]
        assert [-e["amount"] for e in entries if e["kind"] == "charge" and e["amount"]] == [2], entries
        assert sum(e["amount"] for e in entries) == -2, entries
        print(f"round 0 at the stop: {in_flight}; starts (round, step) {by}; settled {elapsed:.1f}s after Continue")
    finally:
        await stack.stop()


async def test_a_recover_of_jobs_a_dead_executor_held_runs_no_finished_step_again(chaos_settings, tmp_path):
    """An operator's Recover of a run whose executor died mid-step (the lease ran out long
    before the jobs' ack wait) published copies, which finished every file; then the ack
    wait brought the originals back, and each ran its file's last step again, after the
    file had SUCCEEDED. A delivery of a job another message finished is now acked, not run."""
    settings = await chaos_settings(executor_ack_wait_s=8.0, recovery_lease_s=2.0)
    stack = await ProcStack(settings).start("billing", "coordinator", "notifier", "executor")
    try:
        log = tmp_path / "steps.log"
        tenant = await stack.tenant(monthly=100)
        template = await stack.template(tenant, [{"name": f"s{i}", "handler": "chaos_step",
                                                  "params": {"log": str(log), "sleep_ms": 1500}} for i in range(3)])
        run_id = (await stack.submit(tenant, template, 3))["id"]
        await stack.wait_run(tenant, run_id, until=lambda r: all(f["checkpoint_step"] == 0 for f in r["files"]))
        stack.kill("executor")  # mid step 1 of every file; a new executor is started
        await stack.wait_run(tenant, run_id, until=lambda r: r["needs_attention"], timeout=30)  # past the lease
        await stack.call("coordinator", "recover", tenant_id=tenant, run_id=run_id, actor="op")
        assert (await stack.wait_run(tenant, run_id, timeout=60))["status"] == "COMPLETED"
        # The dead executor's deliveries come back after their ack wait, and are acked.
        await drained(stack, stack.names.jobs_stream, stack.names.executor_consumer, timeout=30)
        last_steps = Counter(e["file"] for e in starts(log, run_id) if e["step"] == 2)
        assert last_steps == {0: 1, 1: 1, 2: 1}, starts(log, run_id)
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()
