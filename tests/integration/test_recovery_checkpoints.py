"""Recovery from the coordinator's own checkpoints when the broker's jobs and the executor's
progress store are both gone (a lost disk), and a new tenant's default of 3 automatic
retries (product.md items 2 and 6, seed 000)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.stack import Stack, counts_add_up


@pytest.fixture(scope="module")
async def stack(make_settings):
    settings = await make_settings(handlers="tests.chaos.handlers", recovery_interval_s=0.2, recovery_lease_s=1.0,
                                   recovery_max_failures=1000,
                                   executor_ack_wait_s=0.6)  # heartbeats every 0.2 s: a live step is never stuck
    s = await Stack(settings).start("billing", "coordinator", "notifier", "executor")
    yield s
    await s.stop()


async def until(what, check, timeout=20.0):
    """Poll ``check`` (a coroutine function) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def step_starts(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


async def lose_the_disk(stack: Stack) -> None:
    """The machine dies mid-step: the executor's handlers stop where they are (nothing acked,
    nacked or checkpointed after that), and the broker's copy of the jobs and the
    executor's progress store (its own checkpoints) are gone with the disk. Only then is
    what is left of the executor stopped (it may take a second to leave its fetch)."""
    executor = stack.services["executor"].pop()
    for task in list(executor.worker._inflight):
        task.cancel()
    await asyncio.gather(*executor.worker._inflight, return_exceptions=True)
    await stack.js.purge_stream(stack.names.jobs_stream)
    await stack.js.purge_stream(f"KV_{stack.names.attempts_bucket}")
    await executor.stop()


async def test_recovery_resumes_from_the_coordinators_checkpoints_when_jobs_and_executor_progress_are_lost(
        stack, tmp_path):
    log = tmp_path / "steps.log"
    # A started executor takes its first job alone (cautious mode, worker.py): one job
    # of another tenant first, so that both files below are in step 1 at once.
    other = await stack.tenant()
    warm_up = await stack.submit(other, await stack.template(other, [{"name": "a", "handler": "noop"}]), 1)
    assert (await stack.wait_run(other, warm_up["id"]))["status"] == "COMPLETED"
    tenant = await stack.tenant()
    steps = [{"name": f"s{i}", "handler": "chaos_step", "params": {"log": str(log)}} for i in range(3)]
    steps[1]["params"]["sleep_ms"] = 1500  # caught here, step 0 checkpointed
    template = await stack.template(tenant, steps)
    run = await stack.submit(tenant, template, 2)
    caught = await stack.wait_run(tenant, run["id"], timeout=20, until=lambda r: all(
        f["status"] == "PENDING" and f["checkpoint_step"] == 0 for f in r["files"]))

    async def both_in_step_1():
        return sorted(s["file"] for s in step_starts(log) if s["step"] == 1) == [0, 1]

    await until("both files in step 1", both_in_step_1)

    await lose_the_disk(stack)
    assert (await stack.js.stream_info(stack.names.jobs_stream)).state.messages == 0
    assert (await stack.js.stream_info(f"KV_{stack.names.attempts_bucket}")).state.messages == 0
    assert [s["step"] for s in step_starts(log) if s["step"] == 2] == []  # nobody got past step 1
    assert [f["checkpoint_step"] for f in (await stack.run(tenant, run["id"]))["files"]] == [0, 0]

    # The sweep finds the run stuck and re-publishes its files from the coordinator's checkpoints.
    async def republished():
        timeline = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]
        return [e for e in timeline if e["kind"] == "recovery_started"]

    [started] = await until("the sweep's re-publish", republished)
    assert (started["actor"], started["details"]["pending_files"]) == ("system:recovery", 2), started
    assert started["details"]["generation"] == 1  # re-published (not only flagged), once
    recovering = await stack.run(tenant, run["id"])
    assert recovering["status"] == "RUNNING" and recovering["recovering"]
    assert recovering["round"] == caught["round"] == 0
    await stack.start("executor")
    done = await stack.wait_run(tenant, run["id"], timeout=30)
    assert done["status"] == "COMPLETED" and counts_add_up(done), done
    assert done["counts"]["succeeded"] == 2 and not done["needs_attention"]
    assert [f["status"] for f in done["files"]] == ["SUCCEEDED", "SUCCEEDED"]

    # Step 0 ran once per file; step 1, cut short by the crash, ran again; then step 2.
    starts = step_starts(log)
    for index in (0, 1):
        assert [(s["round"], s["step"]) for s in starts if s["file"] == index] == [(0, 0), (0, 1), (0, 1), (0, 2)], \
            starts
    timeline = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]
    recoveries = [(e["actor"], e["details"]["pending_files"]) for e in timeline if e["kind"] == "recovery_started"]
    assert recoveries == [("system:recovery", 2)], timeline  # one recovery, from the sweep

    async def recovery_notes():
        items = (await stack.call("notifier", "list", tenant_id=tenant, limit=200))["items"]
        mine = [n for n in items if n["run_id"] == run["id"] and n["kind"].startswith("run_recover")]
        return mine if any(n["kind"] == "run_recovered" for n in mine) else None

    notes = sorted(await until("the recovery notifications", recovery_notes), key=lambda n: n["at"])
    assert [n["kind"] for n in notes] == ["run_recovery_started", "run_recovered"], notes
    assert notes[0]["message"].startswith("Recovery started")
    assert notes[1]["message"].startswith("Recovery succeeded")

    # Charged once, for two files; recovery was free.
    assert done["credits"]["consumed"] == 2
    ledger = [e for e in await stack.ledger(tenant) if e["run_id"] == run["id"]]
    assert sum(e["amount"] for e in ledger) == -2 and all(e["kind"] == "charge" for e in ledger), ledger
    balance = await stack.call("billing", "balance", tenant_id=tenant)
    assert balance["monthly"]["remaining"] == 998
    await stack.assert_books_balance(tenant)


async def test_a_new_tenant_gets_three_automatic_retries_by_default(stack):
    tenant = await stack.tenant()
    defaults = await stack.call("coordinator", "get_settings", tenant_id=tenant)
    assert defaults["auto_retries"] == 3, defaults
    # Only the backoff is shortened (to keep this quick): auto_retries is left unset.
    saved = await stack.call("coordinator", "put_settings", tenant_id=tenant, backoff_base_ms=10, backoff_max_ms=20)
    assert saved == {**defaults, "backoff_base_ms": 10, "backoff_max_ms": 20}
    assert await stack.call("coordinator", "get_settings", tenant_id=tenant) == saved

    template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_attempts": 99}}])
    run = await stack.submit(tenant, template, 1)
    done = await stack.wait_run(tenant, run["id"], timeout=30)
    assert done["status"] == "COMPLETED_WITH_ERRORS" and counts_add_up(done), done
    [file] = done["files"]
    assert (file["status"], file["attempts"]) == ("FAILED", 4), file  # the first attempt and 3 retries
    timeline = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]
    assert sum(e["kind"] == "file_retrying" for e in timeline) == 3, [e["kind"] for e in timeline]

    async def failed_note():
        items = (await stack.call("notifier", "list", tenant_id=tenant, limit=200))["items"]
        return [n for n in items if n["run_id"] == run["id"] and n["kind"] == "file_failed"]

    [note] = await until("the file_failed notification", failed_note)
    assert note["message"].startswith("Step failed after multiple attempts")
    await stack.assert_books_balance(tenant)
