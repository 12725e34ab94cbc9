"""Operator actions against each other and against a running run: whatever the order, a
run's counters add up, every credit is consumed or refunded once, and a cancelled run
stays cancelled."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from shared.messages import ServiceError
from tests.stack import Stack, counts_add_up, expect_error

FAST = dict(auto_retries=0, backoff_base_ms=10, backoff_max_ms=40, jitter=True, breaker_failure_threshold=50,
            breaker_reset_s=1)


@pytest.fixture(scope="module")
async def stack(make_settings):
    s = await Stack(await make_settings()).start("billing", "coordinator", "executor")
    yield s
    await s.stop()


async def failed_run(stack, tenant, params, n=2, credits_per_file=2, **kw):
    """A run whose every file is FAILED (no automatic retries), and its template."""
    await stack.call("coordinator", "put_settings", tenant_id=tenant, **FAST)
    template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": params}],
                                    credits_per_file=credits_per_file, **kw)
    run = await stack.submit(tenant, template, n)
    done = await stack.wait_run(tenant, run["id"])
    assert done["counts"]["failed"] + done["counts"]["errored"] == n, done["counts"]
    return done, template


async def sql(stack, *statements):
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        for statement, *args in statements:
            await conn.execute(statement, *args)
    finally:
        await conn.close()


def call(stack, verb, tenant, run_id, **kw):
    return stack.call("coordinator", verb, tenant_id=tenant, run_id=run_id, **kw)


async def balance(stack, tenant) -> int:
    b = await stack.call("billing", "balance", tenant_id=tenant)
    return b["monthly"]["remaining"] + b["purchased"]["remaining"]


async def test_restore_refuses_files_whose_jobs_are_out_unless_the_run_is_stuck(stack):
    tenant = await stack.tenant(monthly=100)
    await stack.call("coordinator", "put_settings", tenant_id=tenant, **FAST)
    slow = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"sleep_ms": 5_000}}])
    run = await stack.submit(tenant, slow, 2)
    # Restored now, a file whose job is out would run twice: refused, and nothing changes.
    refused = await expect_error("file_pending", call(stack, "restore", tenant, run["id"], file_index=0, checkpoint_step=-1))
    assert "file 0 is still running" in refused.message
    await expect_error("run_running", call(stack, "restore", tenant, run["id"], checkpoint_step=-1))
    assert (await stack.run(tenant, run["id"]))["round"] == 0
    # A stuck run (no progress for the recovery lease) is what a restore is for.
    await sql(stack, ("UPDATE coordinator.runs SET last_progress_at = now() - interval '1 day' WHERE id = $1", run["id"]))
    restored = await call(stack, "restore", tenant, run["id"], file_index=1, checkpoint_step=-1)
    assert restored["status"] == "RUNNING" and restored["round"] == 1 and counts_add_up(restored)
    await call(stack, "cancel", tenant, run["id"])
    await stack.assert_books_balance(tenant)


async def test_cancel_and_continue_at_once_leave_the_run_cancelled_or_continued_and_the_books_even(stack):
    tenant = await stack.tenant(monthly=100)
    done, _ = await failed_run(stack, tenant, {"fail_rounds": 1, "sleep_ms": 1500})
    results = await asyncio.gather(call(stack, "cancel", tenant, done["id"]),
                                   call(stack, "retry_failed", tenant, done["id"]), return_exceptions=True)
    if not isinstance(results[0], dict):
        # The cancel came first, to a finished run with nothing pending: refused, and the
        # Continue went on, charged once.
        assert getattr(results[0], "code", None) == "conflict" and isinstance(results[1], dict), results
        run = await stack.wait_run(tenant, done["id"])
        assert run["status"] == "COMPLETED" and counts_add_up(run) and run["credits"]["consumed"] == 8
        assert await balance(stack, tenant) == 92
        await stack.assert_books_balance(tenant)
        return
    # The Continue came first: the cancel stops the files it reopened and refunds their charge.
    run = await stack.run(tenant, done["id"])
    assert run["status"] == "CANCELLED" and counts_add_up(run)
    # Whichever came first, only the initial charge is kept: a Continue that got in is refunded.
    assert run["credits"]["consumed"] - run["credits"]["refunded"] == 4
    assert await balance(stack, tenant) == 96
    # A cancelled run is finished: it is neither continued nor has a file retried.
    await expect_error("conflict", call(stack, "retry_failed", tenant, done["id"]))
    failed = [f["index"] for f in run["files"] if f["status"] == "FAILED"]
    if failed:
        await expect_error("conflict", call(stack, "retry_file", tenant, done["id"], file_index=failed[0]))
    run = await stack.run(tenant, done["id"])
    assert run["status"] == "CANCELLED" and await balance(stack, tenant) == 96
    await stack.assert_books_balance(tenant)


async def test_cancel_twice_at_once_cancels_and_refunds_once(stack):
    tenant = await stack.tenant(monthly=20)
    await stack.call("coordinator", "put_settings", tenant_id=tenant, **FAST)
    slow = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"sleep_ms": 3000}}])
    run = await stack.submit(tenant, slow, 3)
    results = await asyncio.gather(*[call(stack, "cancel", tenant, run["id"]) for _ in range(4)], return_exceptions=True)
    assert sum(isinstance(r, dict) for r in results) == 1
    assert all(r.code == "conflict" for r in results if isinstance(r, ServiceError))
    run = await stack.run(tenant, run["id"])
    assert run["status"] == "CANCELLED" and run["counts"]["cancelled"] == 3 and run["credits"]["refunded"] == 3
    assert await balance(stack, tenant) == 20
    await stack.assert_books_balance(tenant)


async def test_retries_of_several_failed_files_of_a_run_pressed_together_all_take(stack):
    """Each is meant (api.md: 409 only while that file is PENDING): they queue on the run,
    each is charged once, and each file runs again."""
    tenant = await stack.tenant(monthly=100)
    done, _ = await failed_run(stack, tenant, {"fail_rounds": 1}, n=4, credits_per_file=2)
    retried = await asyncio.gather(*(call(stack, "retry_file", tenant, done["id"], file_index=i) for i in range(4)),
                                   return_exceptions=True)
    assert all(isinstance(r, dict) for r in retried), retried
    finished = await stack.wait_run(tenant, done["id"])
    assert finished["status"] == "COMPLETED" and finished["counts"]["succeeded"] == 4 and counts_add_up(finished)
    assert finished["credits"]["consumed"] == 16 and await balance(stack, tenant) == 100 - 16
    await stack.assert_books_balance(tenant)


async def test_retry_file_skip_and_continue_on_one_file_at_once_one_wins(stack):
    tenant = await stack.tenant(monthly=100)
    await stack.call("coordinator", "put_settings", tenant_id=tenant, **FAST)
    steps = [{"name": "nice", "handler": "flaky", "optional": True, "params": {"fail_rounds": 1, "sleep_ms": 300}}]
    template = await stack.template(tenant, steps, credits_per_file=2)
    run = await stack.submit(tenant, template, 2)
    done = await stack.wait_run(tenant, run["id"])
    assert done["counts"]["failed"] == 2
    results = await asyncio.gather(call(stack, "retry_file", tenant, run["id"], file_index=0),
                                   call(stack, "skip_file", tenant, run["id"], file_index=0),
                                   call(stack, "retry_failed", tenant, run["id"]), return_exceptions=True)
    assert sum(isinstance(r, dict) for r in results) >= 1, results
    finished = await stack.wait_run(tenant, run["id"])
    assert counts_add_up(finished) and finished["counts"]["failed"] + finished["counts"]["pending"] <= 1
    charges = [e for e in await stack.ledger(tenant) if e["kind"] == "charge"]
    # The initial 4, plus at most one retry charge for file 0 (Continue's covers both files).
    assert sum(-e["amount"] for e in charges) == finished["credits"]["consumed"]
    assert finished["credits"]["consumed"] - finished["credits"]["refunded"] == 100 - await balance(stack, tenant)
    await stack.assert_books_balance(tenant)


async def test_restore_then_cancel_refunds_nothing_already_consumed(stack):
    tenant = await stack.tenant(monthly=10)
    await stack.call("coordinator", "put_settings", tenant_id=tenant, **FAST)
    slow = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"sleep_ms": 1500}}],
                                credits_per_file=2)
    run = await stack.submit(tenant, slow, 2)
    done = await stack.wait_run(tenant, run["id"])
    assert done["status"] == "COMPLETED" and await balance(stack, tenant) == 6
    # Support re-runs the finished files (free); the customer cancels the re-run at once.
    await call(stack, "restore", tenant, run["id"], checkpoint_step=-1)
    cancelled = await call(stack, "cancel", tenant, run["id"])
    assert cancelled["status"] == "CANCELLED" and cancelled["counts"]["cancelled"] == 2 and counts_add_up(cancelled)
    # Both files ran (and used their credits) in round 0: nothing is owed back.
    assert cancelled["credits"]["refunded"] == 0 and await balance(stack, tenant) == 6
    await stack.assert_books_balance(tenant)


async def test_cancel_after_a_continue_refunds_the_free_pending_file_its_first_charge(stack):
    tenant = await stack.tenant(monthly=100)
    done, _ = await failed_run(stack, tenant, {"fail_rounds": 1, "sleep_ms": 1500}, n=3)
    # File 2 is PENDING again, as if its job had been lost with a crash before any result.
    await sql(stack, ("UPDATE coordinator.files SET status = 'PENDING' WHERE run_id = $1 AND idx = 2", done["id"]),
              ("UPDATE coordinator.runs SET failed = 2, pending = 1, status = 'FAILED' WHERE id = $1", done["id"]))
    resumed = await call(stack, "retry_failed", tenant, done["id"])
    assert resumed["credits"]["consumed"] == 6 + 4  # files 0 and 1 charged again, file 2 free
    cancelled = await call(stack, "cancel", tenant, done["id"])
    assert cancelled["counts"]["cancelled"] == 3 and counts_add_up(cancelled)
    # Files 0 and 1: their Continue charge; file 2: its initial charge, never used.
    assert cancelled["credits"]["refunded"] == 4 + 2
    assert await balance(stack, tenant) == 100 - 4
    await stack.assert_books_balance(tenant)


def lost(run_id, *idxs):
    """Statements that make FAILED files PENDING in round 2, a round whose jobs never ran (lost
    with a crash); the run is in round 2 too (its status and counts are the caller's)."""
    return [(f"UPDATE coordinator.files SET status = 'PENDING', round = 2 WHERE run_id = $1 AND idx = {i}", run_id)
            for i in idxs] + [("UPDATE coordinator.runs SET round = 2, fanin_round = 2 WHERE id = $1", run_id)]


async def test_retry_one_file_of_a_failed_run_resumes_its_other_pending_files(stack):
    tenant = await stack.tenant(monthly=100)
    done, _ = await failed_run(stack, tenant, {"fail_rounds": 1}, n=3, credits_per_file=1)
    # As recovery leaves a run it gave up on (or fail_fast one it stopped): FAILED, one FAILED
    # file, the others PENDING with no live job.
    await sql(stack, *lost(done["id"], 1, 2),
              ("UPDATE coordinator.runs SET failed = 1, pending = 2, status = 'FAILED', needs_attention = true, "
               "attention_reason = 'recovery_failed' WHERE id = $1", done["id"]))
    retried = await call(stack, "retry_file", tenant, done["id"], file_index=0)
    assert retried["status"] == "RUNNING" and counts_add_up(retried)
    finished = await stack.wait_run(tenant, done["id"], timeout=20)
    # File 0 runs in round 3, files 1 and 2 in their own round 2: every file is done once.
    assert [f["status"] for f in finished["files"]] == ["SUCCEEDED"] * 3, finished["counts"]
    assert finished["status"] == "COMPLETED" and counts_add_up(finished)
    assert finished["round"] == 3 and finished["credits"]["consumed"] == 3 + 1
    kinds = [e["kind"] for e in (await call(stack, "timeline", tenant, done["id"]))["items"]]
    assert kinds.count("run_completed") == 1
    await stack.assert_books_balance(tenant)


async def test_restore_one_file_of_a_failed_run_finishes_the_run(stack):
    tenant = await stack.tenant(monthly=100)
    done, _ = await failed_run(stack, tenant, {"fail_rounds": 1}, n=3, credits_per_file=1)
    await sql(stack, *lost(done["id"], 1, 2),
              ("UPDATE coordinator.runs SET failed = 1, pending = 2, status = 'FAILED' WHERE id = $1", done["id"]))
    restored = await call(stack, "restore", tenant, done["id"], file_index=0, checkpoint_step=-1)
    assert restored["status"] == "RUNNING" and counts_add_up(restored)
    finished = await stack.wait_run(tenant, done["id"], timeout=20)
    assert [f["status"] for f in finished["files"]] == ["SUCCEEDED"] * 3, finished["counts"]
    assert finished["status"] == "COMPLETED" and counts_add_up(finished)
    assert finished["credits"]["consumed"] == 3 and finished["credits"]["refunded"] == 0
    await stack.assert_books_balance(tenant)


async def test_actions_on_finished_runs_and_archived_templates(stack):
    tenant = await stack.tenant(monthly=100)
    done, template = await failed_run(stack, tenant, {"fail_rounds": 1, "poison": "f1"}, n=2)
    assert [f["status"] for f in done["files"]] == ["FAILED", "ERROR"]
    await stack.call("coordinator", "archive_template", tenant_id=tenant, template_id=template)
    await expect_error("run_not_recoverable", call(stack, "recover", tenant, done["id"]))
    await expect_error("file_not_failed", call(stack, "retry_file", tenant, done["id"], file_index=1))
    await expect_error("bad_request", call(stack, "restore", tenant, done["id"], checkpoint_step=1))
    await expect_error("not_found", call(stack, "restore", tenant, done["id"], file_index=7, checkpoint_step=-1))
    retried = await call(stack, "retry_file", tenant, done["id"], file_index=0)  # archived: still retried
    assert retried["round"] == 1
    finished = await stack.wait_run(tenant, done["id"])
    assert [f["status"] for f in finished["files"]] == ["SUCCEEDED", "ERROR"] and counts_add_up(finished)
    await expect_error("nothing_to_retry", call(stack, "retry_failed", tenant, done["id"]))
    await stack.assert_books_balance(tenant)


async def test_a_tenant_short_of_credits_halfway_changes_nothing_and_can_go_on_after_a_grant(stack):
    tenant = await stack.tenant(monthly=8)
    done, _ = await failed_run(stack, tenant, {"fail_rounds": 1}, n=3, credits_per_file=2)
    assert await balance(stack, tenant) == 2
    await call(stack, "retry_file", tenant, done["id"], file_index=0)  # the last 2 credits
    await stack.wait_run(tenant, done["id"])
    err = await expect_error("insufficient_credits", call(stack, "retry_file", tenant, done["id"], file_index=1))
    assert err.details == {"needed": 2, "available": 0}
    await expect_error("insufficient_credits", call(stack, "retry_failed", tenant, done["id"]))
    run = await stack.run(tenant, done["id"])
    assert run["status"] == "COMPLETED_WITH_ERRORS" and run["counts"]["failed"] == 2 and counts_add_up(run)
    await stack.call("billing", "grant", tenant_id=tenant, purchased=4)
    again = await call(stack, "retry_failed", tenant, done["id"])
    assert again["credits"]["from_purchased"] == 4
    finished = await stack.wait_run(tenant, done["id"])
    assert finished["status"] == "COMPLETED" and finished["credits"]["consumed"] == 6 + 2 + 4
    await stack.assert_books_balance(tenant)


async def test_the_sweep_resumes_files_left_in_an_earlier_round_by_a_single_file_retry(make_settings):
    settings = await make_settings(recovery_interval_s=0.2, recovery_lease_s=1.0, recovery_max_failures=3)
    stack = await Stack(settings).start("billing", "coordinator", "executor")
    try:
        tenant = await stack.tenant(monthly=100)
        done, _ = await failed_run(stack, tenant, {"fail_rounds": 1}, n=2, credits_per_file=1)
        # File 1's round-2 job was lost (a crash) while the run was RUNNING; file 0 is retried
        # meanwhile, which moves the run to round 3 and leaves file 1 in round 2.
        await sql(stack, *lost(done["id"], 1),
                  ("UPDATE coordinator.runs SET failed = 1, pending = 1, status = 'RUNNING', fanin_round = 1, "
                   "last_progress_at = now() WHERE id = $1", done["id"]))
        await call(stack, "retry_file", tenant, done["id"], file_index=0)
        finished = await stack.wait_run(tenant, done["id"], timeout=20)
        assert finished["status"] == "COMPLETED" and counts_add_up(finished), finished
        assert [f["status"] for f in finished["files"]] == ["SUCCEEDED", "SUCCEEDED"]
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()



async def test_thirty_continues_of_thirty_runs_at_once_all_go_through(stack):
    """Each Continue held a pooled connection, its run locked, while it committed its credit
    intent on a second one from the same pool (10 + 10): thirty at once each held one and
    waited for another, all of them answered 503 at their deadline (some of them charged),
    and the results consumer, the relay and the sweep of every tenant waited with them."""
    tenant = await stack.tenant(monthly=0, purchased=1000)
    await stack.call("coordinator", "put_settings", tenant_id=tenant, **FAST)
    template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_rounds": 1}}])
    runs = [await stack.submit(tenant, template, 1) for _ in range(30)]
    for run in runs:
        await stack.wait_run(tenant, run["id"])
    results = await asyncio.gather(*(call(stack, "retry_failed", tenant, run["id"]) for run in runs),
                                   return_exceptions=True)
    assert [r for r in results if not isinstance(r, dict)] == []
    for run in runs:
        assert (await stack.wait_run(tenant, run["id"]))["status"] == "COMPLETED"
    assert await balance(stack, tenant) == 1000 - 60
    await stack.assert_books_balance(tenant)


async def test_a_request_whose_earlier_attempt_still_holds_its_run_is_told_to_send_it_again(stack):
    """A Continue answered 503 (billing slow), sent again under its Idempotency-Key as the
    503 says, met its first attempt still holding the run: a 409, which the gateway then
    replayed for that key for a day, whatever the first attempt came to. An attempt of the
    same request is a 503 (not kept); another request holding the run is api.md's 409."""
    tenant = await stack.tenant(monthly=100)
    done, _ = await failed_run(stack, tenant, {"fail_rounds": 1}, n=2)
    held = await asyncpg.connect(stack.settings.database_url)
    try:
        async with held.transaction():  # as the first attempts of k1 and k2 hold them, with the run
            for claim in ("coordinator.request:k1", "coordinator.request:k2", f"coordinator.run:{done['id']}"):
                assert await held.fetchval("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))", claim)
            await expect_error("service_unavailable", call(stack, "retry_failed", tenant, done["id"], request_id="k1"))
            await expect_error("service_unavailable",
                               call(stack, "retry_file", tenant, done["id"], file_index=0, request_id="k2"))
            await expect_error("run_running", call(stack, "retry_failed", tenant, done["id"], request_id="k3"))
            await expect_error("run_running", call(stack, "retry_failed", tenant, done["id"]))
    finally:
        await held.close()
    again = await call(stack, "retry_failed", tenant, done["id"], request_id="k1")
    assert again["status"] == "RUNNING" and (await stack.wait_run(tenant, done["id"]))["status"] == "COMPLETED"
    await stack.assert_books_balance(tenant)


async def test_a_continue_whose_retry_key_was_charged_another_amount_says_send_again_not_a_billing_key(stack):
    """An attempt that died after its charge left the round's retry key charged; a skip then
    changed what a Continue charges, and the next Continue answered 422
    idempotency_key_reused naming billing's own key. Now: that charge is refunded, the
    answer is a 503 (send it again), and the next attempt goes through under a fresh key."""
    tenant = await stack.tenant(monthly=100)
    done, _ = await failed_run(stack, tenant, {"fail_rounds": 1}, n=3, credits_per_file=2)
    key = f"{done['id']}:retry:{done['round'] + 1}"
    await sql(stack, ("INSERT INTO coordinator.credit_intents (key, run_id, tenant_id, amount) VALUES ($1, $2, $3, 2)",
                      key, done["id"], tenant))
    await stack.call("billing", "reserve", tenant_id=tenant, amount=2, idempotency_key=key, run_id=done["id"],
                     actor="a dead attempt")
    error = await expect_error("service_unavailable", call(stack, "retry_failed", tenant, done["id"]))
    assert key not in str(error)
    assert (await call(stack, "retry_failed", tenant, done["id"]))["status"] == "RUNNING"
    finished = await stack.wait_run(tenant, done["id"])
    assert finished["status"] == "COMPLETED" and finished["credits"]["consumed"] == 6 + 6
    assert await balance(stack, tenant) == 100 - 12
    await stack.assert_books_balance(tenant)


async def test_another_tenant_naming_a_run_its_owner_is_changing_is_told_404_and_takes_nothing(stack):
    """The run's claim is keyed by its id alone, and was taken before the tenant check:
    another tenant got 409 (the run exists: a probe; a file retry after a 5 s wait) while
    the owner acted on it, and its requests made the owner's own Continue 409 too."""
    owner, other = await stack.tenant(monthly=100), await stack.tenant()
    done, _ = await failed_run(stack, owner, {"fail_rounds": 1}, n=2)
    claim = await asyncpg.connect(stack.settings.database_url)
    try:
        async with claim.transaction():  # as the owner's own Continue holds it while it runs
            await claim.execute("SELECT pg_advisory_xact_lock(hashtextextended('coordinator.run:' || $1, 0))",
                                done["id"])
            await expect_error("not_found", call(stack, "retry_failed", other, done["id"]))
            await expect_error("not_found", call(stack, "retry_file", other, done["id"], file_index=0))
            await expect_error("not_found", call(stack, "skip_file", other, done["id"], file_index=0))
    finally:
        await claim.close()
    assert (await call(stack, "retry_failed", owner, done["id"]))["status"] == "RUNNING"
    await stack.wait_run(owner, done["id"])
    await stack.assert_books_balance(owner)
