"""Automatic retries, error classification and "Continue" over the real services."""

from __future__ import annotations

import asyncio

import pytest

from tests.stack import Stack, counts_add_up, expect_error

FAST = dict(auto_retries=3, backoff_base_ms=10, backoff_max_ms=40, jitter=True, breaker_failure_threshold=50, breaker_reset_s=1)


@pytest.fixture(scope="module")
async def stack(make_settings):
    s = await Stack(await make_settings()).start("billing", "coordinator", "executor", "notifier")
    yield s
    await s.stop()


async def fast_tenant(stack, **kw):
    tenant = await stack.tenant(**kw)
    await stack.call("coordinator", "put_settings", tenant_id=tenant, **FAST)
    return tenant


async def notifications(stack, tenant, run_id, kind, n=1):
    for _ in range(200):
        items = (await stack.call("notifier", "list", tenant_id=tenant))["items"]
        found = [i for i in items if i["run_id"] == run_id and i["kind"] == kind]
        if len(found) >= n:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind} notification for {run_id}")


async def test_a_file_failing_its_first_two_attempts_succeeds_on_the_third(stack):
    tenant = await fast_tenant(stack)
    template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_attempts": 2}}])
    run = await stack.submit(tenant, template, 3)
    done = await stack.wait_run(tenant, run["id"])
    assert done["status"] == "COMPLETED"
    assert [f["attempts"] for f in done["files"]] == [3, 3, 3]
    # A success shows no error; the failed attempts' errors are in the timeline.
    assert [(f["last_error"], f["skippable"]) for f in done["files"]] == [(None, False)] * 3
    timeline = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]
    retries = [e for e in timeline if e["kind"] == "file_retrying"]
    assert len(retries) == 6
    assert all(e["details"]["error"]["class"] == "TransientError" for e in retries)
    assert all(0 <= e["details"]["next_delay_ms"] <= FAST["backoff_max_ms"] for e in retries)


async def test_exhausted_retries_fail_the_file_and_notify(stack):
    tenant = await fast_tenant(stack)
    template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_attempts": 99}}])
    run = await stack.submit(tenant, template, 1)
    done = await stack.wait_run(tenant, run["id"])
    assert done["status"] == "COMPLETED_WITH_ERRORS" and done["needs_attention"]
    f = done["files"][0]
    assert f["status"] == "FAILED" and f["attempts"] == FAST["auto_retries"] + 1
    assert f["last_error"]["transient"] is True
    [note] = await notifications(stack, tenant, run["id"], "file_failed")
    assert note["message"].startswith("Step failed after multiple attempts")


async def test_a_permanent_failure_is_an_error_after_one_attempt(stack):
    tenant = await fast_tenant(stack)
    template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"poison": "bad"}}])
    run = await stack.submit(tenant, template, 0, files=[{"name": "bad.pdf"}, {"name": "good.pdf"}])
    done = await stack.wait_run(tenant, run["id"])
    assert [f["status"] for f in done["files"]] == ["ERROR", "SUCCEEDED"]
    assert done["files"][0]["attempts"] == 1 and done["files"][0]["last_error"]["transient"] is False
    await expect_error("nothing_to_retry", stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=run["id"]))


async def test_continue_charges_only_failed_files_once_and_reaches_max_retry_count(stack):
    tenant = await fast_tenant(stack, monthly=100)
    # Every attempt of rounds 0..2 fails: three Continue presses are needed, the fourth is refused.
    template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_rounds": 3}}],
                                    credits_per_file=2)
    run = await stack.submit(tenant, template, 2, max_retry_count=2)
    done = await stack.wait_run(tenant, run["id"])
    assert done["counts"]["failed"] == 2
    presses = await asyncio.gather(*[stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=run["id"])
                                     for _ in range(20)], return_exceptions=True)
    ok = [p for p in presses if isinstance(p, dict)]
    refused = [p for p in presses if not isinstance(p, dict)]
    assert len(ok) == 1 and all(e.code == "run_running" for e in refused)
    assert ok[0]["round"] == 1 and all(f["retry_attempt"] == 1 for f in ok[0]["files"])
    charges = [e for e in await stack.ledger(tenant) if e["kind"] == "charge"]
    assert sorted(e["amount"] for e in charges) == [-4, -4]  # initiate + one Continue
    done = await stack.wait_run(tenant, run["id"])
    await stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=run["id"])
    done = await stack.wait_run(tenant, run["id"])
    assert done["round"] == 2 and done["counts"]["failed"] == 2 and counts_add_up(done)
    err = await expect_error("max_retry_count_exceeded",
                             stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=run["id"]))
    assert err.details["file_indexes"] == [0, 1]
    assert (await stack.run(tenant, run["id"]))["credits"]["consumed"] == 12
    await stack.assert_books_balance(tenant)


async def test_continue_refusals(stack):
    tenant = await fast_tenant(stack, monthly=3)
    ok_template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    run = await stack.submit(tenant, ok_template, 1)
    await stack.wait_run(tenant, run["id"])
    await expect_error("run_completed", stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=run["id"]))
    failing = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_rounds": 1}}])
    run = await stack.submit(tenant, failing, 2)
    await stack.wait_run(tenant, run["id"])
    # Archived templates still retry (AC15); 2 FAILED files need 2 credits, 0 are left.
    await stack.call("coordinator", "archive_template", tenant_id=tenant, template_id=failing)
    err = await expect_error("insufficient_credits", stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=run["id"]))
    assert err.details == {"needed": 2, "available": 0}
    await stack.call("billing", "grant", tenant_id=tenant, purchased=5)
    again = await stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=run["id"])
    assert again["status"] == "RUNNING" and again["credits"]["from_purchased"] == 2
    done = await stack.wait_run(tenant, run["id"])
    assert done["status"] == "COMPLETED"
    await stack.assert_books_balance(tenant)


async def test_cancel_refunds_what_was_charged_and_never_ran(stack):
    tenant = await fast_tenant(stack, monthly=10)
    slow = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"sleep_ms": 3000}}])
    run = await stack.submit(tenant, slow, 4)
    cancelled = await stack.call("coordinator", "cancel", tenant_id=tenant, run_id=run["id"])
    assert cancelled["status"] == "CANCELLED" and counts_add_up(cancelled)
    assert cancelled["credits"]["refunded"] == cancelled["counts"]["cancelled"] == 4
    bal = await stack.call("billing", "balance", tenant_id=tenant)
    assert bal["monthly"]["remaining"] == 10
    await stack.assert_books_balance(tenant)


async def test_batch_mode_retries_in_process_and_continue_charges_only_its_failed_files(stack):
    """Seed 001 asks for Continue in batch mode too: one job carries every file; automatic
    retries happen inside it; Continue re-runs and charges the FAILED files only."""
    tenant = await fast_tenant(stack, monthly=100)
    retried = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_attempts": 2}}])
    run = await stack.submit(tenant, retried, 3, mode="batch")
    done = await stack.wait_run(tenant, run["id"])
    assert done["status"] == "COMPLETED" and [f["attempts"] for f in done["files"]] == [3, 3, 3]
    failing = await stack.template(tenant, [{"name": "a", "handler": "flaky",
                                             "params": {"fail_rounds": 1, "poison": "bad"}}], credits_per_file=2)
    files = [{"name": "f0.pdf"}, {"name": "bad.pdf"}, {"name": "f2.pdf"}]
    run = await stack.submit(tenant, failing, 0, files=files, mode="batch")
    done = await stack.wait_run(tenant, run["id"])
    assert [f["status"] for f in done["files"]] == ["FAILED", "ERROR", "FAILED"]
    assert [f["attempts"] for f in done["files"]] == [FAST["auto_retries"] + 1, 1, FAST["auto_retries"] + 1]
    resumed = await stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=run["id"])
    assert resumed["round"] == 1 and resumed["credits"]["consumed"] == 6 + 2 * 2  # the ERROR file is never retried
    done = await stack.wait_run(tenant, run["id"])
    assert [f["status"] for f in done["files"]] == ["SUCCEEDED", "ERROR", "SUCCEEDED"] and counts_add_up(done)
    assert done["status"] == "COMPLETED_WITH_ERRORS"
    await stack.assert_books_balance(tenant)


async def test_another_tenants_run_cannot_be_continued_recovered_or_cancelled(stack):
    owner, stranger = await fast_tenant(stack), await fast_tenant(stack)
    failing = await stack.template(owner, [{"name": "a", "handler": "flaky", "params": {"fail_rounds": 1}}])
    run = await stack.submit(owner, failing, 1)
    await stack.wait_run(owner, run["id"])
    for verb in ("retry_failed", "recover", "cancel"):
        await expect_error("not_found", stack.call("coordinator", verb, tenant_id=stranger, run_id=run["id"]))
    for verb in ("retry_file", "skip_file"):
        await expect_error("not_found", stack.call("coordinator", verb, tenant_id=stranger, run_id=run["id"], file_index=0))
    untouched = await stack.run(owner, run["id"])
    assert untouched["status"] == "COMPLETED_WITH_ERRORS" and untouched["round"] == 0
    assert [e["kind"] for e in await stack.ledger(stranger) if e["kind"] == "charge"] == []


async def test_a_step_may_set_its_own_retry_limit(stack):
    """Seed 004's per-operation retry limit: the step's auto_retries, in place of the tenant's."""
    tenant = await fast_tenant(stack)  # the tenant retries 3 times
    steps = [{"name": "cheap", "handler": "flaky", "params": {"fail_attempts": 99}, "auto_retries": 1},
             {"name": "never", "handler": "noop"}]
    template = await stack.template(tenant, steps)
    run = await stack.submit(tenant, template, 1)
    done = await stack.wait_run(tenant, run["id"])
    assert done["files"][0]["status"] == "FAILED" and done["files"][0]["attempts"] == 2
    once = await stack.template(tenant, [{"name": "once", "handler": "flaky", "params": {"fail_attempts": 1},
                                          "auto_retries": 0}])
    run = await stack.submit(tenant, once, 1)
    done = await stack.wait_run(tenant, run["id"])
    assert done["files"][0]["status"] == "FAILED" and done["files"][0]["attempts"] == 1
