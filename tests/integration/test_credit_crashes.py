"""Money under crashes: a coordinator killed between charging and updating the run, and
billing killed in the middle of a reservation. Nothing is charged twice or lost."""

from __future__ import annotations

import asyncio

from shared.messages import ServiceError
from tests.procs import ProcStack
from tests.stack import counts_add_up


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


async def test_billing_killed_mid_reservation_charges_nothing(make_settings, tmp_path):
    marker = tmp_path / "crash-billing"
    settings = await make_settings(recovery_interval_s=0.3, credit_intent_timeout_s=1.0, request_timeout_s=3)
    stack = await ProcStack(settings, env={"REDRIVE_CRASH_AT_BILLING_BEFORE_COMMIT": str(marker)}).start(
        "billing", "coordinator", "executor")
    try:
        tenant = await stack.tenant(monthly=10)
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
        marker.touch()
        try:
            await stack.submit(tenant, template, 2)
            raise AssertionError("billing should have died")
        except ServiceError as exc:
            assert exc.code == "service_unavailable"
        await stack.wait_services("billing")
        assert (await stack.call("coordinator", "list_runs", tenant_id=tenant))["items"] == []
        assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 10
        assert not [e for e in await stack.ledger(tenant) if e["kind"] == "charge"]
        run = await stack.submit(tenant, template, 2)  # and the system goes on
        assert (await stack.wait_run(tenant, run["id"]))["status"] == "COMPLETED"
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()
