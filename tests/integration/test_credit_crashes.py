"""Money under crashes: a coordinator killed between charging and updating the run, and
billing killed in the middle of a reservation. Nothing is charged twice or lost."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from shared.messages import ServiceError
from tests.procs import ProcStack
from tests.stack import counts_add_up, expect_error


async def wait_for(predicate, timeout=30.0):
    for _ in range(int(timeout / 0.1)):
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached")


async def test_a_crash_between_reservation_and_run_update_is_refunded_exactly_once(make_settings, tmp_path):
    marker = tmp_path / "crash-after-reserve"
    settings = await make_settings(recovery_interval_s=0.3, credit_intent_timeout_s=1.0)
    stack = await ProcStack(settings, env={"REDRIVE_CRASH_AT_AFTER_RESERVE": str(marker)}).start(
        "billing", "coordinator", "executor")
    try:
        tenant = await stack.tenant(monthly=10)
        await stack.call("coordinator", "put_settings", tenant_id=tenant, auto_retries=0)
        template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_rounds": 1}}])
        run = await stack.submit(tenant, template, 3)
        await stack.wait_run(tenant, run["id"])
        marker.touch()
        try:
            await stack.rpc.call("coordinator", "retry_failed", {"tenant_id": tenant, "run_id": run["id"]}, timeout=5)
            raise AssertionError("the coordinator should have died mid-request")
        except ServiceError as exc:
            assert exc.code == "service_unavailable"
        assert stack.procs["coordinator"][0].poll() is not None or stack.deaths.get("coordinator")

        async def refunded():
            return [e for e in await stack.ledger(tenant) if e["kind"] == "refund"]

        refunds = await wait_for(refunded)
        charges = [e for e in await stack.ledger(tenant) if e["kind"] == "charge"]
        assert [(e["idempotency_key"], e["amount"]) for e in charges] == [(f"{run['id']}:retry:1", -3), (f"{run['id']}:initiate", -3)]
        assert [(e["idempotency_key"], e["amount"]) for e in refunds] == [(f"{run['id']}:refund:1", 3)]
        log = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]
        assert [(e["actor"], e["details"]["amount"]) for e in log if e["kind"] == "refund"] == [("system:compensation", 3)]
        after = await stack.run(tenant, run["id"])
        assert after["round"] == 0 and after["status"] == "COMPLETED_WITH_ERRORS"
        assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 7
        # The next press works, with a fresh key, and is charged once.
        pressed = await stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=run["id"])
        assert pressed["round"] == 1
        done = await stack.wait_run(tenant, run["id"])
        assert done["status"] == "COMPLETED" and counts_add_up(done)
        assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 4
        await asyncio.sleep(1.5)  # two more sweeps: still exactly one refund
        assert len(await refunded()) == 1
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()


async def test_a_submission_that_died_after_its_charge_is_refunded_and_leaves_no_trace_of_a_run(make_settings, tmp_path):
    """The refund of a run that was never made wrote its "refund" timeline entry under the
    run's id: nobody's rows, which retention (it prunes by run) kept for ever."""
    marker = tmp_path / "crash-after-reserve"
    settings = await make_settings(recovery_interval_s=0.3, credit_intent_timeout_s=1.0)
    stack = await ProcStack(settings, env={"REDRIVE_CRASH_AT_AFTER_RESERVE": str(marker)}).start("billing", "coordinator")
    try:
        tenant = await stack.tenant(monthly=10)
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
        run_id = uuid.uuid4().hex
        marker.touch()
        await expect_error("service_unavailable", stack.rpc.call(
            "coordinator", "create_run", {"tenant_id": tenant, "actor": "t", "template_id": template, "run_id": run_id,
                                          "files": [{"name": "a"}, {"name": "b"}]}, timeout=5))

        async def refunded():
            return [e for e in await stack.ledger(tenant) if e["kind"] == "refund"]

        assert [(e["idempotency_key"], e["amount"]) for e in await wait_for(refunded)] == [(f"{run_id}:refund:0", 2)]
        conn = await asyncpg.connect(settings.database_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM coordinator.runs WHERE id = $1", run_id) == 0
            assert await conn.fetchval("SELECT count(*) FROM coordinator.timeline WHERE run_id = $1", run_id) == 0
            assert await conn.fetchval("SELECT state FROM coordinator.credit_intents WHERE run_id = $1",
                                       run_id) == "compensated"
        finally:
            await conn.close()
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()


async def test_billing_killed_mid_reservation_charges_nothing(make_settings, tmp_path):
    marker = tmp_path / "crash-billing"
    settings = await make_settings(recovery_interval_s=0.3, credit_intent_timeout_s=1.0, request_timeout_s=3)
    stack = await ProcStack(settings, env={"REDRIVE_CRASH_AT_BILLING_BEFORE_COMMIT": str(marker)}).start(
        "billing", "coordinator", "executor")
    try:
        tenant = await stack.tenant(monthly=10)
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
        marker.touch()
        run_id = uuid.uuid4().hex  # as the gateway names it from an Idempotency-Key
        try:
            await stack.submit(tenant, template, 2, run_id=run_id)
            raise AssertionError("billing should have died")
        except ServiceError as exc:
            assert exc.code == "service_unavailable"
        await stack.wait_services("billing")
        assert (await stack.call("coordinator", "list_runs", tenant_id=tenant))["items"] == []
        assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 10
        assert not [e for e in await stack.ledger(tenant) if e["kind"] == "charge"]

        async def voided():  # the sweep settled the reservation whose outcome was unknown
            return [e for e in await stack.ledger(tenant) if e["kind"] == "void"]

        await wait_for(voided)
        # The client's retry under the same Idempotency-Key (the same run id) makes the run,
        # charged once, under a key of its own: the first one is voided for good.
        run = await stack.submit(tenant, template, 2, run_id=run_id)
        assert run["id"] == run_id
        assert (await stack.wait_run(tenant, run["id"]))["status"] == "COMPLETED"
        charges = [(e["idempotency_key"], e["amount"]) for e in await stack.ledger(tenant) if e["kind"] == "charge"]
        assert charges == [(f"{run_id}:initiate.1", -2)]
        assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 8
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()



async def after_an_unknown_outcome(make_settings, tmp_path, crash_at: str, dies: str):
    """A stack whose first submission, under a run id (as the gateway names one from an
    Idempotency-Key), died with the ``dies`` service at crash point ``crash_at``; that
    service is back. The sweep leaves the pending charge alone (its timeout is long).
    Returns (stack, tenant, template, run_id)."""
    marker = tmp_path / "crash"
    settings = await make_settings(credit_intent_timeout_s=600, request_timeout_s=3)
    stack = await ProcStack(settings, env={f"REDRIVE_CRASH_AT_{crash_at.upper()}": str(marker)}).start(
        "billing", "coordinator", "executor")
    try:
        tenant = await stack.tenant(monthly=10)
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
        run_id = uuid.uuid4().hex
        marker.touch()
        await expect_error("service_unavailable", stack.submit(tenant, template, 2, run_id=run_id))
        await stack.wait_services(dies)
    except BaseException:
        await stack.stop()
        raise
    return stack, tenant, template, run_id


async def compensation_unanswered(stack, tenant: str, run_id: str) -> None:
    """What the coordinator's compensation of the run's charge asks of billing, answered to no one."""
    await stack.call("billing", "refund", tenant_id=tenant, idempotency_key=f"{run_id}:refund:0",
                     of_key=f"{run_id}:initiate", run_id=run_id, actor="system:compensation")


async def made_at_the_next_try(stack, tenant: str, template: str, run_id: str) -> None:
    """The same request again is a 503 that made and charged nothing; the one after makes the run."""
    refused = await expect_error("service_unavailable", stack.submit(tenant, template, 2, run_id=run_id))
    assert refused.details["outcome"] == "none" and "nothing was made or charged" in refused.message
    run = await stack.submit(tenant, template, 2, run_id=run_id)
    assert run["id"] == run_id
    assert (await stack.wait_run(tenant, run_id))["status"] == "COMPLETED"


async def test_a_submission_retried_after_its_charge_was_settled_elsewhere_goes_through(make_settings, tmp_path):
    """The first attempt's outcome is unknown (billing died mid-reservation) and its
    compensation reached billing, but not its answer: the coordinator still holds the
    reservation as pending when the client sends the request again under the same
    Idempotency-Key (the same run id). That attempt must not end for good (billing refuses
    the spent key): a 503 that makes and charges nothing, and the next attempt goes through."""
    stack, tenant, template, run_id = await after_an_unknown_outcome(make_settings, tmp_path, "billing_before_commit",
                                                                     "billing")
    try:
        db = await asyncpg.connect(stack.settings.database_url)
        try:
            async def intent_state():
                return await db.fetchval("SELECT state FROM coordinator.credit_intents WHERE key = $1",
                                         f"{run_id}:initiate")

            if await intent_state() == "pending":  # billing was back before the compensation was sent: send it
                await compensation_unanswered(stack, tenant, run_id)
            else:  # the compensation was done: its answer is what we lose
                assert await intent_state() == "compensated"
                await db.execute("UPDATE coordinator.credit_intents SET state = 'pending' WHERE key = $1",
                                 f"{run_id}:initiate")
        finally:
            await db.close()
        assert [e["kind"] for e in await stack.ledger(tenant) if e["kind"] in ("charge", "void")] == ["void"]
        await made_at_the_next_try(stack, tenant, template, run_id)
        charges = [(e["idempotency_key"], e["amount"]) for e in await stack.ledger(tenant) if e["kind"] == "charge"]
        assert charges == [(f"{run_id}:initiate.1", -2)]
        assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 8
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()


async def test_a_submission_replayed_after_its_charge_was_refunded_is_charged_again_not_free(make_settings, tmp_path):
    """Charged, then the coordinator died before the run was made, and its compensation
    (a refund) reached billing without an answer: the same request again must not make the
    run on the refunded charge."""
    stack, tenant, template, run_id = await after_an_unknown_outcome(make_settings, tmp_path, "after_reserve",
                                                                     "coordinator")
    try:
        await compensation_unanswered(stack, tenant, run_id)
        await made_at_the_next_try(stack, tenant, template, run_id)
        ledger = [(e["kind"], e["idempotency_key"], e["amount"]) for e in await stack.ledger(tenant)
                  if e["kind"] in ("charge", "refund")]
        assert sorted(ledger) == sorted([("charge", f"{run_id}:initiate", -2), ("refund", f"{run_id}:refund:0", 2),
                                         ("charge", f"{run_id}:initiate.1", -2)])
        assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 8
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()
