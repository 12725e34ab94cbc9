"""What a run's timeline records (product.md item 11: every state change, retry, charge,
refund, recovery, with time and actor), over the real services: charges with the actor of
the request, Continue, file errors and failures, cancel and its refund, fail_fast, and the
executor's own time (``details.occurred_at``) next to when the coordinator recorded it."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

import pytest

from shared import bus
from shared.messages import ErrorInfo, FileEvent, job_id_for
from tests.stack import Stack, counts_add_up

FAST = dict(auto_retries=3, backoff_base_ms=10, backoff_max_ms=40, jitter=True, breaker_failure_threshold=50, breaker_reset_s=1)
# A file that fails once waits a minute for its next attempt: its job is back in JetStream
# (nak with a delay), not held by the executor, and the file stays PENDING meanwhile.
PARKED = dict(auto_retries=3, backoff_base_ms=60_000, backoff_max_ms=60_000, jitter=False,
              breaker_failure_threshold=50, breaker_reset_s=1)
EXECUTOR_KINDS = ("file_retrying", "file_failed", "file_errored", "file_deferred")


@pytest.fixture(scope="module")
async def stack(make_settings):
    s = await Stack(await make_settings()).start("billing", "coordinator", "executor")
    yield s
    await s.stop()


async def tenant_with(stack, policy=FAST, **kw) -> str:
    tenant = await stack.tenant(**kw)
    await stack.call("coordinator", "put_settings", tenant_id=tenant, **policy)
    return tenant


async def timeline(stack, tenant, run_id) -> list[dict]:
    return (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run_id))["items"]


async def timeline_until(stack, tenant, run_id, until, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        items = await timeline(stack, tenant, run_id)
        if until(items):
            return items
        if time.monotonic() > deadline:
            raise AssertionError(f"timeline of {run_id}: {[(e['kind'], e.get('file_index')) for e in items]}")
        await asyncio.sleep(0.05)


def of_kind(items: list[dict], kind: str) -> list[dict]:
    return [e for e in items if e["kind"] == kind]


def when(value: str) -> datetime:
    return datetime.fromisoformat(value)


def assert_occurred_at_not_after_at(entry: dict) -> None:
    """An executor's event happened before the coordinator recorded it (one clock here)."""
    occurred = entry["details"].get("occurred_at")
    assert occurred is not None, f"{entry['kind']} without details.occurred_at: {entry}"
    assert when(occurred) <= when(entry["at"]) + timedelta(seconds=1), entry


async def test_a_new_run_logs_its_charge_with_the_actor_of_the_request(stack):
    tenant = await tenant_with(stack, monthly=10, purchased=10)
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}], credits_per_file=5)
    run = await stack.call("coordinator", "create_run", tenant_id=tenant, actor="alice@example.com",
                           template_id=template, files=[{"name": f"f{i}.pdf"} for i in range(3)])
    items = await timeline(stack, tenant, run["id"])
    [created] = of_kind(items, "run_created")
    [charge] = of_kind(items, "charge")
    assert (created["actor"], created["details"]["files"]) == ("alice@example.com", 3)
    assert charge["actor"] == "alice@example.com" and "file_index" not in charge
    # 3 files × 5 credits: the monthly 10 first, then 5 of the purchased.
    assert charge["details"] == {"amount": 15, "from_monthly": 10, "from_purchased": 5, "key": f"{run['id']}:initiate"}
    assert items.index(created) < items.index(charge) and charge["at"]
    done = await stack.wait_run(tenant, run["id"])
    assert done["status"] == "COMPLETED"
    assert len(of_kind(await timeline(stack, tenant, run["id"]), "charge")) == 1  # charged once, not per file


async def test_continue_logs_its_press_and_a_charge_for_the_failed_files_only(stack):
    tenant = await tenant_with(stack, monthly=100)
    template = await stack.template(tenant, [{"name": "a", "handler": "flaky",
                                              "params": {"fail_rounds": 1, "poison": "bad"}}], credits_per_file=2)
    files = [{"name": "f0.pdf"}, {"name": "bad.pdf"}, {"name": "f2.pdf"}]
    run = await stack.call("coordinator", "create_run", tenant_id=tenant, actor="bob", template_id=template, files=files)
    done = await stack.wait_run(tenant, run["id"])
    assert [f["status"] for f in done["files"]] == ["FAILED", "ERROR", "FAILED"]
    items = await timeline(stack, tenant, run["id"])

    failed = of_kind(items, "file_failed")
    assert sorted(e["file_index"] for e in failed) == [0, 2]
    for e in failed:
        assert e["actor"] == "system:executor"
        assert e["details"]["attempt"] == FAST["auto_retries"] + 1 and e["details"]["step"] == 0
        assert e["details"]["error"]["class"] == "TransientError" and e["details"]["error"]["transient"] is True
    [errored] = of_kind(items, "file_errored")
    assert (errored["file_index"], errored["actor"], errored["details"]["attempt"]) == (1, "system:executor", 1)
    assert errored["details"]["error"] == {"class": "PermanentError", "message": "flaky: 'bad.pdf' is poison",
                                           "transient": False}
    retrying = of_kind(items, "file_retrying")
    assert sorted(e["file_index"] for e in retrying) == [0] * 3 + [2] * 3  # never the ERROR file
    for e in failed + [errored] + retrying:
        assert_occurred_at_not_after_at(e)
    [ended] = of_kind(items, "run_completed_with_errors")
    assert ended["actor"] == "system" and (ended["details"]["failed"], ended["details"]["errored"]) == (2, 1)

    await stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=run["id"], actor="carol")
    after = await timeline(stack, tenant, run["id"])
    [press] = of_kind(after, "retry_failed")
    assert press["actor"] == "carol"
    assert press["details"] == {"round": 1, "failed_files": 2, "pending_files": 0}
    charges = of_kind(after, "charge")
    assert [c["actor"] for c in charges] == ["bob", "carol"]
    # Two FAILED files × 2 credits; the ERROR file is neither retried nor charged.
    assert charges[1]["details"]["amount"] == 4 and charges[1]["details"]["key"] == f"{run['id']}:retry:1"
    assert charges[0]["details"]["amount"] == 6
    assert after.index(press) < after.index(charges[1])
    ledger = [e for e in await stack.ledger(tenant) if e["kind"] == "charge"]
    assert sorted(e["amount"] for e in ledger) == [-6, -4]

    done = await stack.wait_run(tenant, run["id"])
    assert [f["status"] for f in done["files"]] == ["SUCCEEDED", "ERROR", "SUCCEEDED"]
    final = await timeline(stack, tenant, run["id"])
    assert sorted(i for e in of_kind(final, "files_succeeded") for i in e["details"]["files"]) == [0, 2]
    assert len(of_kind(final, "file_errored")) == 1 and len(of_kind(final, "charge")) == 2
    assert [e["details"]["round"] for e in of_kind(final, "run_completed_with_errors")] == [0, 1]


async def test_cancel_logs_the_cancel_and_a_refund_of_the_pending_files(stack):
    tenant = await tenant_with(stack, PARKED, monthly=100)
    # The ERROR file ends at once; the others fail their first attempt and wait a minute:
    # PENDING (charged, unused) when the cancel lands, with no job held by the executor.
    template = await stack.template(tenant, [{"name": "a", "handler": "flaky",
                                              "params": {"fail_attempts": 99, "poison": "bad"}}], credits_per_file=3)
    files = [{"name": "bad.pdf"}, {"name": "f1.pdf"}, {"name": "f2.pdf"}]
    run = await stack.call("coordinator", "create_run", tenant_id=tenant, actor="dave", template_id=template, files=files)
    await stack.wait_run(tenant, run["id"], until=lambda r: r["counts"]["errored"] == 1, timeout=10)
    await timeline_until(stack, tenant, run["id"], lambda items: len(of_kind(items, "file_retrying")) == 2)
    cancelled = await stack.call("coordinator", "cancel", tenant_id=tenant, run_id=run["id"], actor="erin")
    assert cancelled["status"] == "CANCELLED" and counts_add_up(cancelled)
    assert (cancelled["counts"]["cancelled"], cancelled["credits"]["refunded"]) == (2, 6)
    items = await timeline(stack, tenant, run["id"])
    [cancel] = of_kind(items, "run_cancelled")
    assert cancel["actor"] == "erin"
    assert cancel["details"] == {"files_cancelled": 2, "refund_owed": 6}
    [refund] = of_kind(items, "refund")
    assert refund["actor"] == "system:cancel"
    assert refund["details"]["amount"] == 6 and refund["details"]["to_monthly"] == 6
    assert refund["details"]["key"] == f"{run['id']}:initiate:cancel"
    assert items.index(cancel) < items.index(refund)
    [charge] = of_kind(items, "charge")
    assert (charge["actor"], charge["details"]["amount"]) == ("dave", 9)
    await stack.assert_books_balance(tenant)
    assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 100 - 9 + 6


async def test_a_fail_fast_failure_logs_run_failed(stack):
    tenant = await tenant_with(stack)
    template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_attempts": 99}}],
                                    failure_policy="fail_fast")
    run = await stack.submit(tenant, template, 2)
    done = await stack.wait_run(tenant, run["id"])
    assert done["status"] == "FAILED"
    items = await timeline(stack, tenant, run["id"])
    [failed] = of_kind(items, "run_failed")
    assert failed["actor"] == "system" and failed["details"] == {"reason": "fail_fast", "round": 0}
    assert of_kind(items, "file_failed") and items.index(of_kind(items, "file_failed")[0]) < items.index(failed)
    assert not [e for e in items if e["kind"].startswith("run_completed")]


async def test_executor_entries_carry_when_it_happened_apart_from_when_they_were_recorded(stack):
    """Results that queued up: events the executor sent an hour ago, applied now. Each entry's
    ``at`` is now (recorded); its ``details.occurred_at`` is the event's own time."""
    tenant = await tenant_with(stack, PARKED, monthly=100)
    template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_attempts": 99}}])
    run = await stack.submit(tenant, template, 3)
    run_id = run["id"]
    # Every file's first attempt failed and waits a minute: all three PENDING, no job running.
    await timeline_until(stack, tenant, run_id, lambda items: len(of_kind(items, "file_retrying")) == 3)
    hour_ago = datetime.now(timezone.utc).replace(microsecond=123456) - timedelta(hours=1)
    err = ErrorInfo.model_validate({"class": "TransientError", "message": "late", "transient": True})

    def event(kind: str, idx: int, attempt: int, seconds: int, **kw) -> FileEvent:
        return FileEvent(kind=kind, job_id=job_id_for(run_id, idx, 0), run_id=run_id, tenant_id=tenant,
                         file_index=idx, round=0, attempt=attempt, step=0, at=hour_ago + timedelta(seconds=seconds), **kw)

    events = [
        event("retrying", 0, 2, 0, error=err, next_delay_ms=50),
        event("failed", 0, 3, 1, error=err),
        event("errored", 1, 2, 2, error=ErrorInfo.model_validate({"class": "PermanentError", "message": "no",
                                                                  "transient": False})),
        event("deferred", 2, 2, 3, dependency="ocr.example", next_delay_ms=1000, breaker_opened_at=hour_ago),
    ]
    sent = datetime.now(timezone.utc)
    await bus.publish_many(stack.js, [bus.Outgoing(stack.names.file_event(e.kind), e.to_bytes(), e.msg_id)
                                      for e in events])
    items = await timeline_until(stack, tenant, run_id,
                                 lambda items: all(of_kind(items, k) for k in EXECUTOR_KINDS))
    by_kind = {
        "file_retrying": [e for e in of_kind(items, "file_retrying") if e["details"]["attempt"] == 2],
        "file_failed": of_kind(items, "file_failed"),
        "file_errored": of_kind(items, "file_errored"),
        "file_deferred": of_kind(items, "file_deferred"),
    }
    for seconds, (kind, entries) in enumerate(by_kind.items()):
        [entry] = entries
        assert entry["actor"] == "system:executor"
        assert entry["details"].get("occurred_at") is not None, f"{kind} has no details.occurred_at: {entry}"
        occurred, at = when(entry["details"]["occurred_at"]), when(entry["at"])
        assert occurred == hour_ago + timedelta(seconds=seconds), (kind, entry)
        assert at >= sent - timedelta(seconds=5), (kind, entry)  # recorded now, not an hour ago
        assert at - occurred > timedelta(minutes=59), (kind, entry)
    assert by_kind["file_deferred"][0]["file_index"] == 2
    assert by_kind["file_deferred"][0]["details"]["dependency"] == "ocr.example"
    # The executor's own first attempts, applied at once: their time is close to ``at``.
    for entry in [e for e in of_kind(items, "file_retrying") if e["details"]["attempt"] == 1]:
        assert_occurred_at_not_after_at(entry)
        assert when(entry["at"]) - when(entry["details"]["occurred_at"]) < timedelta(minutes=1)
    # Tidy: the last PENDING file's job would come back in a minute.
    await stack.call("coordinator", "cancel", tenant_id=tenant, run_id=run_id, actor="test")
