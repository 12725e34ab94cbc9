"""Seed 001's remaining cases and single-file actions: mixed FAILED + PENDING charges only
the FAILED files; retry one file (charged), skip an optional step, refusals."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from shared.messages import RunEvent
from tests.stack import Stack, counts_add_up, expect_error


@pytest.fixture(scope="module")
async def stack(make_settings):
    s = await Stack(await make_settings()).start("billing", "coordinator", "executor")
    yield s
    await s.stop()


async def failed_run(stack, tenant, steps, n=3, **kw):
    await stack.call("coordinator", "put_settings", tenant_id=tenant, auto_retries=0)
    template = await stack.template(tenant, steps, credits_per_file=2)
    run = await stack.submit(tenant, template, n, **kw)
    return await stack.wait_run(tenant, run["id"]), template


async def test_mixed_failed_and_pending_charges_only_the_failed_files(stack):
    tenant = await stack.tenant(monthly=100)
    done, _ = await failed_run(stack, tenant, [{"name": "a", "handler": "flaky", "params": {"fail_rounds": 1}}], n=4)
    # Make one FAILED file PENDING again, as if its job had been lost with a crash (free to re-run).
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        await conn.execute("UPDATE coordinator.files SET status = 'PENDING' WHERE run_id = $1 AND idx = 3", done["id"])
        await conn.execute("UPDATE coordinator.runs SET failed = failed - 1, pending = pending + 1 WHERE id = $1", done["id"])
    finally:
        await conn.close()
    before = (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"]
    resumed = await stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=done["id"])
    assert resumed["credits"]["consumed"] == 8 + 3 * 2  # 3 FAILED files charged, the PENDING one free
    assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == before - 6
    assert [f["retry_attempt"] for f in resumed["files"]] == [1, 1, 1, 1]
    finished = await stack.wait_run(tenant, done["id"])
    assert finished["status"] == "COMPLETED" and counts_add_up(finished)
    await stack.assert_books_balance(tenant)


async def test_retry_one_failed_file_is_charged_and_refused_otherwise(stack):
    tenant = await stack.tenant(monthly=100)
    # sleep_ms: the retried job is still in flight when the second press comes.
    params = {"fail_rounds": 1, "poison": "f2", "sleep_ms": 1000}
    done, _ = await failed_run(stack, tenant, [{"name": "a", "handler": "flaky", "params": params}])
    assert [f["status"] for f in done["files"]] == ["FAILED", "FAILED", "ERROR"]
    await expect_error("file_not_failed", stack.call("coordinator", "retry_file", tenant_id=tenant, run_id=done["id"], file_index=2))
    retried = await stack.call("coordinator", "retry_file", tenant_id=tenant, run_id=done["id"], file_index=0)
    assert retried["status"] == "RUNNING" and retried["credits"]["consumed"] == 6 + 2
    await expect_error("file_pending", stack.call("coordinator", "retry_file", tenant_id=tenant, run_id=done["id"], file_index=0))
    finished = await stack.wait_run(tenant, done["id"])
    assert [f["status"] for f in finished["files"]] == ["SUCCEEDED", "FAILED", "ERROR"]
    assert finished["files"][0]["retry_attempt"] == 1 and counts_add_up(finished)
    await expect_error("not_found", stack.call("coordinator", "retry_file", tenant_id=tenant, run_id=done["id"], file_index=9))
    await stack.assert_books_balance(tenant)


async def test_skip_only_when_the_failed_step_is_optional(stack):
    tenant = await stack.tenant(monthly=100)
    steps = [{"name": "must", "handler": "noop"},
             {"name": "nice", "handler": "flaky", "optional": True, "params": {"fail_rounds": 1}}]
    done, _ = await failed_run(stack, tenant, steps, n=2)
    assert done["status"] == "COMPLETED_WITH_ERRORS"
    skipped = await stack.call("coordinator", "skip_file", tenant_id=tenant, run_id=done["id"], file_index=0)
    assert skipped["files"][0]["status"] == "SKIPPED" and skipped["status"] == "COMPLETED_WITH_ERRORS"
    assert (skipped["needs_attention"], skipped["attention_reason"]) == (True, "failed")
    completed = asyncio.Queue()
    sub = await stack.nc.subscribe(stack.names.run_event("completed"), cb=completed.put)
    try:
        skipped = await stack.call("coordinator", "skip_file", tenant_id=tenant, run_id=done["id"], file_index=1)
        assert skipped["status"] == "COMPLETED" and skipped["counts"]["skipped"] == 2 and counts_add_up(skipped)
        assert (skipped["needs_attention"], skipped["attention_reason"]) == (False, None)  # not a stale reason
        # Those told "finished with errors" are told it finished after all, once.
        event = RunEvent.model_validate_json((await asyncio.wait_for(completed.get(), 10)).data)
        assert (event.run_id, event.status, event.counts["skipped"]) == (done["id"], "COMPLETED", 2)
    finally:
        await sub.unsubscribe()
    done, _ = await failed_run(stack, tenant, [{"name": "must", "handler": "flaky", "params": {"fail_rounds": 1}}], n=1)
    assert not done["files"][0]["skippable"]
    await expect_error("step_not_optional", stack.call("coordinator", "skip_file", tenant_id=tenant, run_id=done["id"], file_index=0))


async def test_skipping_an_optional_step_goes_on_with_the_required_steps_after_it(stack):
    tenant = await stack.tenant(monthly=100)
    steps = [{"name": "hash", "handler": "checksum"},
             {"name": "enhance", "handler": "flaky", "optional": True, "params": {"fail_rounds": 1}},
             {"name": "publish", "handler": "noop"}]
    files = [{"name": "a.txt", "content_b64": "aGVsbG8="}]
    done, _ = await failed_run(stack, tenant, steps, files=files)
    assert done["status"] == "COMPLETED_WITH_ERRORS" and done["files"][0]["checkpoint_step"] == 0
    assert done["files"][0]["skippable"]  # what the dashboard's Skip button shows for
    going = await stack.call("coordinator", "skip_file", tenant_id=tenant, run_id=done["id"], file_index=0)
    assert going["status"] == "RUNNING" and going["files"][0]["status"] == "PENDING"
    finished = await stack.wait_run(tenant, done["id"])
    assert finished["status"] == "COMPLETED" and finished["files"][0]["status"] == "SUCCEEDED"
    assert finished["files"][0]["checkpoint_step"] == 2 and counts_add_up(finished)
    assert finished["credits"]["consumed"] == 2  # the skip is free
    conn = await asyncpg.connect(stack.settings.database_url)
    try:  # the required step ran after the skipped one; the skipped one never did
        outputs = json.loads(await conn.fetchval("SELECT step_outputs FROM coordinator.files WHERE run_id = $1",
                                                 done["id"]))
    finally:
        await conn.close()
    assert sorted(outputs) == ["0", "2"]
    timeline = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=done["id"]))["items"]
    [skipped] = [e for e in timeline if e["kind"] == "file_skipped"]
    assert skipped["details"]["step"] == 1 and skipped["details"]["resumes_at"] == 2
    await stack.assert_books_balance(tenant)


async def test_three_continue_rounds_then_the_fourth_press_is_refused(stack):
    tenant = await stack.tenant(monthly=100)
    done, _ = await failed_run(stack, tenant, [{"name": "a", "handler": "flaky", "params": {"fail_rounds": 9}}], n=1,
                               max_retry_count=3)
    for round_ in (1, 2, 3):
        pressed = await stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=done["id"])
        assert pressed["round"] == round_
        done = await stack.wait_run(tenant, done["id"])
    err = await expect_error("max_retry_count_exceeded", stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=done["id"]))
    assert err.details["max_retry_count"] == 3
    assert done["credits"]["consumed"] == 2 * 4
    await stack.assert_books_balance(tenant)


async def test_an_interrupted_run_with_only_pending_files_continues_free(stack):
    tenant = await stack.tenant(monthly=100)
    done, _ = await failed_run(stack, tenant, [{"name": "a", "handler": "flaky", "params": {"fail_rounds": 1}}], n=3)
    assert done["max_retry_count"] == 3  # the default (AC3)
    conn = await asyncpg.connect(stack.settings.database_url)
    try:  # as if the server had died with every file in flight, and the run had been failed
        await conn.execute("UPDATE coordinator.files SET status = 'PENDING' WHERE run_id = $1", done["id"])
        await conn.execute("UPDATE coordinator.runs SET failed = 0, pending = 3, status = 'FAILED' WHERE id = $1", done["id"])
    finally:
        await conn.close()
    resumed = await stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=done["id"])
    assert resumed["credits"]["consumed"] == 6  # only the initial charge: PENDING files are free
    finished = await stack.wait_run(tenant, done["id"])
    assert finished["status"] == "COMPLETED" and counts_add_up(finished)
    await stack.assert_books_balance(tenant)


async def test_the_attention_list_pages_and_counts_each_tenants_runs(stack):
    """A platform admin's list is every tenant's: one tenant's many flagged runs must not hide
    another's. It pages (next_cursor), and says how many each tenant has."""
    busy, quiet = await stack.tenant(), await stack.tenant()
    failing = [{"name": "s", "handler": "flaky", "params": {"fail_rounds": 1}}]
    runs = {busy: [(await failed_run(stack, busy, failing, n=1))[0]["id"] for _ in range(3)],
            quiet: [(await failed_run(stack, quiet, failing, n=1))[0]["id"]]}
    mine = {run_id for ids in runs.values() for run_id in ids}
    seen, page, pages = [], {"next_cursor": None}, 0
    while True:  # every tenant's (this module's other tests' runs too): keep ours
        page = await stack.call("coordinator", "attention", tenant_id=None, limit=2, cursor=page["next_cursor"])
        assert len(page["items"]) <= 2
        seen += [r["id"] for r in page["items"]]
        pages += 1
        if page["next_cursor"] is None:
            break
    assert pages >= 2 and mine <= set(seen) and len(seen) == len(set(seen)) == page["total"]
    assert page["by_tenant"][busy] == 3 and page["by_tenant"][quiet] == 1
    one = await stack.call("coordinator", "attention", tenant_id=quiet)
    assert [r["id"] for r in one["items"]] == runs[quiet] and one["by_tenant"] == {quiet: 1} and one["total"] == 1
    await expect_error("validation_error", stack.call("coordinator", "attention", tenant_id=None, cursor="x"))


async def _stopped_by_fail_fast(stack, tenant, steps, n, mode):
    """A fail_fast run stopped by f0's ERROR, some files still PENDING (their jobs stopped)."""
    template = await stack.template(tenant, steps, failure_policy="fail_fast")
    run = await stack.submit(tenant, template, n, mode=mode)
    failed = await stack.wait_run(tenant, run["id"])
    assert failed["status"] == "FAILED" and failed["files"][0]["status"] == "ERROR"
    assert failed["counts"]["pending"] >= 1, "every file ended before the stop: nothing left to resume"
    return failed


async def test_a_batch_run_skipped_past_a_step_goes_on_with_its_files_left_in_the_earlier_round(stack):
    """Skipping f0's optional first step moves the run to round 1; its other files, stopped
    by fail_fast in round 0, are published again in round 0's batch job. Under the run's
    round their results were all ignored and the run never finished (the audit)."""
    tenant = await stack.tenant(monthly=100)
    steps = [{"name": "a", "handler": "flaky", "optional": True, "params": {"poison": "^f0", "sleep_ms": 800}},
             {"name": "b", "handler": "noop"}]
    failed = await _stopped_by_fail_fast(stack, tenant, steps, 4, "batch")
    await stack.call("coordinator", "skip_file", tenant_id=tenant, run_id=failed["id"], file_index=0)
    done = await stack.wait_run(tenant, failed["id"], timeout=30)
    assert done["status"] == "COMPLETED" and counts_add_up(done)
    assert [f["status"] for f in done["files"]] == ["SUCCEEDED"] * 4


async def test_skipping_the_file_that_tripped_fail_fast_lets_the_run_go_on_or_finish(stack):
    """A FAILED (fail_fast) run whose failed file is skipped at its last step: its stopped
    files run (a new generation), and it finishes COMPLETED. It stayed FAILED for good, no
    longer flagged for attention."""
    tenant = await stack.tenant(monthly=100)
    steps = [{"name": "a", "handler": "flaky", "optional": True, "params": {"poison": "^f0", "sleep_ms": 800}}]
    failed = await _stopped_by_fail_fast(stack, tenant, steps, 4, "batch")
    going = await stack.call("coordinator", "skip_file", tenant_id=tenant, run_id=failed["id"], file_index=0)
    assert going["status"] == "RUNNING" and not going["needs_attention"]
    done = await stack.wait_run(tenant, failed["id"], timeout=30)
    assert done["status"] == "COMPLETED" and counts_add_up(done) and not done["needs_attention"]
    assert [f["status"] for f in done["files"]] == ["SKIPPED"] + ["SUCCEEDED"] * 3
    # Nothing left pending when skipped: it finishes there and then.
    run = await stack.submit(tenant, await stack.template(tenant, [{"name": "a", "handler": "flaky", "optional": True,
                                                                    "params": {"poison": "^f0"}}],
                                                          failure_policy="fail_fast"), 1)
    assert (await stack.wait_run(tenant, run["id"]))["status"] == "FAILED"
    finished = await stack.call("coordinator", "skip_file", tenant_id=tenant, run_id=run["id"], file_index=0)
    assert finished["status"] == "COMPLETED" and not finished["needs_attention"]


async def test_a_finished_run_with_errors_cannot_be_cancelled_and_a_cancel_applied_answers_again(stack):
    tenant = await stack.tenant(monthly=100)
    done, _ = await failed_run(stack, tenant, [{"name": "a", "handler": "flaky", "params": {"fail_rounds": 1}}], n=2)
    assert done["status"] == "COMPLETED_WITH_ERRORS"
    # Finished: cancelled, its FAILED files could never be continued, and nothing is left to stop.
    await expect_error("conflict", stack.call("coordinator", "cancel", tenant_id=tenant, run_id=done["id"]))
    # A cancel the gateway sent under an Idempotency-Key, applied, its answer lost (the
    # coordinator died after its commit): the same use of the key answers with the run.
    slow = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"sleep_ms": 3000}}])
    run = await stack.submit(tenant, slow, 2)
    first = await stack.call("coordinator", "cancel", tenant_id=tenant, run_id=run["id"], request_id="cancel:k1:n")
    again = await stack.call("coordinator", "cancel", tenant_id=tenant, run_id=run["id"], request_id="cancel:k1:n")
    assert first["status"] == again["status"] == "CANCELLED" and again["credits"] == first["credits"]
    await expect_error("conflict", stack.call("coordinator", "cancel", tenant_id=tenant, run_id=run["id"],
                                              request_id="cancel:k2:n"))
    await stack.assert_books_balance(tenant)


async def test_a_fail_fast_run_with_two_failures_finishes_at_the_first_skip_and_completes_at_the_second(stack):
    """Two files failed before the stop: skipping one resumes the run, which has nothing
    pending, so it finishes with the other's error; skipping that one completes it. With
    nothing pending, the FAILED run could not be cancelled (its failures could never be
    continued after)."""
    tenant = await stack.tenant(monthly=100)
    template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "optional": True,
                                              "params": {"poison": "^f[01]"}}], failure_policy="fail_fast")
    run = await stack.submit(tenant, template, 3)
    await stack.wait_run(tenant, run["id"])  # FAILED: f0's error stopped it
    # Where the stop caught the other two varies: make it the case at hand, f1 in ERROR too
    # (its job ran before the stop reached it) and f2 done.
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        async with conn.transaction():
            for index, status in ((0, "ERROR"), (1, "ERROR"), (2, "SUCCEEDED")):
                await conn.execute("UPDATE coordinator.files SET status = $3, failed_step = CASE WHEN $3 = 'ERROR' "
                                   "THEN 0 END WHERE run_id = $1 AND idx = $2", run["id"], index, status)
            await conn.execute("UPDATE coordinator.runs SET pending = 0, errored = 2, succeeded = 1, failed = 0, "
                               "skipped = 0, cancelled = 0 WHERE id = $1", run["id"])
    finally:
        await conn.close()
    errored = [0, 1]
    await expect_error("conflict", stack.call("coordinator", "cancel", tenant_id=tenant, run_id=run["id"]))
    finished = await stack.call("coordinator", "skip_file", tenant_id=tenant, run_id=run["id"], file_index=errored[0])
    assert finished["status"] == "COMPLETED_WITH_ERRORS" and counts_add_up(finished)
    done = await stack.call("coordinator", "skip_file", tenant_id=tenant, run_id=run["id"], file_index=errored[1])
    assert done["status"] == "COMPLETED" and not done["needs_attention"] and counts_add_up(done)


async def test_a_batch_continue_whose_job_would_not_fit_a_message_is_refused_before_the_charge(stack):
    """Its one job carries every reopened file with its checkpoint's output: forty outputs
    of 30 KB made a job over 1 MB, and the Continue charged them all, then made every file
    ERROR (JobTooLarge) without running anything."""
    tenant = await stack.tenant(monthly=100)
    done, _ = await failed_run(stack, tenant, [{"name": "a", "handler": "noop"},
                                               {"name": "b", "handler": "flaky", "params": {"fail_rounds": 1}}],
                               n=2, mode="batch")
    assert done["counts"]["failed"] == 2
    conn = await asyncpg.connect(stack.settings.database_url)
    try:  # as if step a had output 600 KB for each file
        await conn.execute("UPDATE coordinator.files SET checkpoint_step = 0, checkpoint_output = $2::jsonb "
                           "WHERE run_id = $1", done["id"], json.dumps({"text": "x" * 600_000}))
    finally:
        await conn.close()
    before = await stack.call("billing", "balance", tenant_id=tenant)
    refused = await expect_error("payload_too_large", stack.call("coordinator", "retry_failed", tenant_id=tenant,
                                                                 run_id=done["id"]))
    assert refused.details["job_bytes"] > refused.details["max_payload"]
    assert await stack.call("billing", "balance", tenant_id=tenant) == before
    assert (await stack.run(tenant, done["id"]))["status"] == "COMPLETED_WITH_ERRORS"
