"""Refunds owed by cancels (coordinator.refunds_due): the sweep's look for unpaid ones reads
only those, however many were paid before (the soak test: a sequential scan of every
refund ever owed, every 15 s), and paid ones are pruned once past their retention."""

from __future__ import annotations

import asyncio
import types

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from shared.messages import ServiceError
from services.coordinator.commands.cancel import PAID_REFUNDS_RETENTION_S, REFUND_WAIT_S, pay_refunds_due, prune_paid_refunds
from services.coordinator.recovery import RecoverySweeper
from tests.integration.test_query_plans import indexes, plans, seeded_engine, sent
from tests.stack import Stack

# 200,000 refunds paid over the last 30 days and 40 owed, some to the run 'cancelled-now'.
_SEED = """
INSERT INTO coordinator.refunds_due (key, of_key, run_id, tenant_id, amount, paid, created_at, paid_at)
SELECT 'paid-' || g, 'charge-' || g, 'run-' || (g / 10), 'tenant-a', 5, true,
       now() - g * interval '12 seconds', now() - g * interval '12 seconds'
FROM generate_series(1, 200000) g;
INSERT INTO coordinator.refunds_due (key, of_key, run_id, tenant_id, amount, created_at)
SELECT 'owed-' || g, 'charge-owed-' || g, CASE WHEN g % 4 = 0 THEN 'cancelled-now' ELSE 'run-owed-' || g END,
       'tenant-a', 5, now() - g * interval '1 minute'
FROM generate_series(1, 40) g;
ANALYZE coordinator.refunds_due;
"""


class _BillingAway:
    """Every refund refused: the sweep's look for owed refunds is all these tests want of it."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def call(self, service: str, verb: str, payload: dict) -> dict:
        self.asked.append(payload["idempotency_key"])
        raise ServiceError("unavailable", "billing is away")


@pytest.fixture(scope="module")
async def db(make_settings):
    engine = await seeded_engine(make_settings, _SEED)
    yield engine
    await engine.dispose()


@pytest.mark.parametrize("run_id", [None, "cancelled-now"])  # the sweep's look, and a cancel's for its run
async def test_owed_refunds_are_found_through_the_unpaid_index_not_among_the_paid(db, run_id):
    billing = _BillingAway()
    with sent(db) as seen:
        assert await pay_refunds_due(types.SimpleNamespace(engine=db, billing=billing), run_id=run_id) == 0
    owed = [f"owed-{g}" for g in range(40, 0, -1)]  # oldest first
    assert billing.asked == (owed if run_id is None else [k for k in owed if int(k[5:]) % 4 == 0])
    [(statement, parameters)] = [(s, p) for s, p in seen if "FROM coordinator.refunds_due" in s]
    for mode, plan in (await plans(db, statement, parameters)).items():
        assert indexes(plan) == {"refunds_due_unpaid"}, (mode, plan)


# ---- pruning paid refunds -------------------------------------------------------------------

DAY = 24 * 3600

# key: (paid, owed days ago, paid days ago or None): what c0012 found paid has no paid_at.
_AGES = {
    "paid-long-ago": (True, 40, 35),
    "paid-before-paid-at": (True, 40, None),
    "owed-long-ago-paid-lately": (True, 40, 10),
    "paid-lately": (True, 2, 2),
    "paid-lately-before-paid-at": (True, 5, None),
    "owed-long-ago-unpaid": (False, 90, None),
}


async def _owe(database_url: str, prefix: str, ages: dict) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO coordinator.refunds_due (key, of_key, run_id, tenant_id, amount, paid, created_at, paid_at) "
            "VALUES ($1, $1, 'r', 't', 1, $2, now() - make_interval(days => $3), "
            " now() - make_interval(days => $4))",
            [(prefix + key, paid, owed, paid_ago) for key, (paid, owed, paid_ago) in ages.items()])
    finally:
        await conn.close()


async def _kept(database_url: str, prefix: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return [r[0][len(prefix):] for r in await conn.fetch(
            "SELECT key FROM coordinator.refunds_due WHERE key LIKE $1 ORDER BY key", prefix + "%")]
    finally:
        await conn.close()


async def test_paid_refunds_are_pruned_a_retention_after_they_were_paid_a_batch_at_a_time(make_settings):
    settings = await make_settings()
    await _owe(settings.database_url, "", _AGES)
    await _owe(settings.database_url, "more-", {f"paid-long-ago-{i}": (True, 50, 31) for i in range(3)})
    engine = create_async_engine(settings.sqlalchemy_url)
    try:
        assert PAID_REFUNDS_RETENTION_S == 30 * DAY
        assert await prune_paid_refunds(engine, batch=2, max_batches=2) == (4, True)  # bounded pass: some left
        assert await prune_paid_refunds(engine, batch=2, max_batches=2) == (1, False)
        assert await prune_paid_refunds(engine) == (0, False)
    finally:
        await engine.dispose()
    assert await _kept(settings.database_url, "") == sorted(
        ["owed-long-ago-paid-lately", "paid-lately", "paid-lately-before-paid-at", "owed-long-ago-unpaid"])


@pytest.fixture(scope="module")
async def stack(make_settings):
    s = await Stack(await make_settings()).start("billing", "coordinator")
    yield s
    await s.stop()


async def test_a_cancels_refund_is_paid_with_its_time_and_the_sweeper_prunes_old_paid_ones(stack):
    tenant = await stack.tenant(monthly=100)
    template = await stack.template(tenant, [{"name": "s", "handler": "noop"}], credits_per_file=2)
    run = await stack.submit(tenant, template, 3)  # no executor: its files stay PENDING
    cancelled = await stack.call("coordinator", "cancel", tenant_id=tenant, run_id=run["id"], actor="test")
    assert cancelled["status"] == "CANCELLED"
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        refund = await conn.fetchrow("SELECT paid, paid_at >= created_at AS dated, amount FROM coordinator.refunds_due "
                                     "WHERE run_id = $1", run["id"])
    finally:
        await conn.close()
    assert tuple(refund) == (True, True, 6)

    coordinator = stack.services["coordinator"][0]
    deadline = asyncio.get_running_loop().time() + 10
    while coordinator.sweeper.prune_passes < 1:  # its own first prune (at start) must not race ours
        assert asyncio.get_running_loop().time() < deadline, "the coordinator never pruned at start"
        await asyncio.sleep(0.02)
    await _owe(stack.settings.database_url, "sweep-", _AGES)
    sweeper = RecoverySweeper(coordinator.deps)  # as a coordinator starting now
    sweeper.start()
    try:
        while len(await _kept(stack.settings.database_url, "sweep-")) != 4:
            assert asyncio.get_running_loop().time() < deadline + 10, "the old paid refunds were never pruned"
            await asyncio.sleep(0.05)
    finally:
        await sweeper.stop()
    assert await _kept(stack.settings.database_url, "sweep-") == sorted(
        ["owed-long-ago-paid-lately", "paid-lately", "paid-lately-before-paid-at", "owed-long-ago-unpaid"])
    # The cancel's refund, paid just now, is kept.
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM coordinator.refunds_due WHERE run_id = $1", run["id"]) == 1
    finally:
        await conn.close()


async def test_a_cancel_answers_though_billing_does_not_and_the_sweep_pays_its_refund(make_settings, monkeypatch):
    """Billing frozen (a GC pause, a stopped process): the cancel has committed, so it must
    answer, not hold the caller until a 503 that says nothing was done."""
    from services.coordinator import credits

    billing_back, real_refund = asyncio.Event(), credits.refund
    stack = await Stack(await make_settings(recovery_interval_s=0.2)).start("billing", "coordinator")
    try:
        tenant = await stack.tenant(monthly=100)
        template = await stack.template(tenant, [{"name": "s", "handler": "noop"}], credits_per_file=2)
        run = await stack.submit(tenant, template, 3)  # no executor: its files stay PENDING

        async def frozen_billing(*args, **kwargs):
            await billing_back.wait()
            return await real_refund(*args, **kwargs)

        monkeypatch.setattr(credits, "refund", frozen_billing)
        loop = asyncio.get_running_loop()
        asked = loop.time()
        cancelled = await stack.call("coordinator", "cancel", tenant_id=tenant, run_id=run["id"], actor="test")
        assert loop.time() - asked < REFUND_WAIT_S + 1.0
        assert (cancelled["status"], cancelled["credits"]["refunded"]) == ("CANCELLED", 0)
        billing_back.set()  # billing is back: the sweep pays what the cancel owed, once
        paid = await stack.wait_run(tenant, run["id"], until=lambda r: r["credits"]["refunded"] == 6, timeout=10)
        assert paid["status"] == "CANCELLED"
        await stack.assert_books_balance(tenant)
        assert sum(e["amount"] for e in await stack.ledger(tenant) if e["kind"] == "refund") == 6
    finally:
        billing_back.set()
        await stack.stop()
