"""Run retention (services/coordinator/run_retention.py): a run finished longer ago than
``run_retention_days`` is deleted with all the coordinator keeps of it; an unfinished run,
a recent one and one still owed a refund stay; billing's books are not touched."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from services.coordinator import run_retention
from services.coordinator.recovery import RecoverySweeper
from tests.integration.test_query_plans import indexes, nodes, plans, seeded_engine, sent
from tests.stack import Stack, expect_error

DAY = run_retention.DAY_S
_PER_RUN = {table: f"SELECT count(*) FROM coordinator.{table} WHERE run_id = $1"
            for table in ("files", "timeline", "credit_intents", "refunds_due")}


@pytest.fixture  # its own per test: an executor one test starts would hold run locks in the next
async def stack(make_settings):
    s = await Stack(await make_settings()).start("billing", "coordinator")
    yield s
    await s.stop()


async def _sql(stack: Stack, statement: str, *args):
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()


async def _finished_days_ago(stack: Stack, run_id: str, days: float) -> None:
    await _sql(stack, "UPDATE coordinator.runs SET finished_at = now() - make_interval(days => $2) WHERE id = $1",
               run_id, days)


async def _rows(stack: Stack, run_id: str) -> dict[str, int]:
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        return {table: await conn.fetchval(statement, run_id) for table, statement in _PER_RUN.items()}
    finally:
        await conn.close()


async def _cancelled_run(stack: Stack, tenant: str, template: str, n: int = 3) -> str:
    run = await stack.submit(tenant, template, n)  # no executor yet: its files stay PENDING
    cancelled = await stack.call("coordinator", "cancel", tenant_id=tenant, run_id=run["id"], actor="test")
    assert cancelled["status"] == "CANCELLED"
    return run["id"]


async def _prune(stack: Stack, **kw) -> tuple[int, bool]:
    engine = create_async_engine(stack.settings.sqlalchemy_url)
    try:
        return await run_retention.prune(engine, older_than_s=stack.settings.run_retention_days * DAY, **kw)
    finally:
        await engine.dispose()


async def test_only_finished_runs_past_their_retention_go_with_everything_the_coordinator_keeps_of_them(stack):
    assert stack.settings.run_retention_days == 90
    tenant = await stack.tenant(monthly=1000)
    template = await stack.template(tenant, [{"name": "s", "handler": "noop"}], credits_per_file=2)
    old, recent, owed = [await _cancelled_run(stack, tenant, template) for _ in range(3)]
    unfinished = (await stack.submit(tenant, template, 2))["id"]
    await _finished_days_ago(stack, old, 91)
    await _finished_days_ago(stack, recent, 89)
    await _finished_days_ago(stack, owed, 91)
    await _sql(stack, "UPDATE coordinator.runs SET created_at = now() - interval '200 days', "
                      "last_progress_at = now() - interval '200 days' WHERE id = $1", unfinished)
    # A refund the sweep has not paid yet: the run waits for it.
    await _sql(stack, "INSERT INTO coordinator.refunds_due (key, of_key, run_id, tenant_id, amount) "
                      "VALUES ('owed-refund', 'owed-charge', $1, $2, 1)", owed, tenant)
    before = {run: await _rows(stack, run) for run in (old, recent, owed, unfinished)}
    assert before[old]["files"] == 3 and before[old]["timeline"] > 0 and before[old]["credit_intents"] > 0
    assert before[old]["refunds_due"] > 0

    assert await _prune(stack) == (1, False)

    await expect_error("not_found", stack.run(tenant, old))
    assert await _rows(stack, old) == dict.fromkeys(_PER_RUN, 0)
    for kept in (recent, owed, unfinished):
        assert (await stack.run(tenant, kept))["id"] == kept
        assert await _rows(stack, kept) == before[kept]
    listed = await stack.call("coordinator", "list_runs", tenant_id=tenant, limit=50)
    assert sorted(r["id"] for r in listed["items"]) == sorted([recent, owed, unfinished])

    # Once paid, the owed run goes on the next pass; the unfinished run completes as usual.
    await _sql(stack, "UPDATE coordinator.refunds_due SET paid = true, paid_at = now() WHERE key = 'owed-refund'")
    assert await _prune(stack) == (1, False)
    await expect_error("not_found", stack.run(tenant, owed))
    await stack.start("executor")
    done = await stack.wait_run(tenant, unfinished)
    assert done["status"] == "COMPLETED"
    assert await _prune(stack) == (0, False)
    await stack.assert_books_balance(tenant)  # billing's record of the pruned runs is whole
    entries = await stack.ledger(tenant)
    assert {e["run_id"] for e in entries if e.get("run_id")} >= {old, owed}


async def test_a_pass_is_bounded_by_files_but_always_takes_the_oldest_run(stack):
    tenant = await stack.tenant(monthly=1000)
    template = await stack.template(tenant, [{"name": "s", "handler": "noop"}])
    big, small, smaller = [await _cancelled_run(stack, tenant, template, n) for n in (5, 3, 1)]
    for days, run in ((93, big), (92, small), (91, smaller)):
        await _finished_days_ago(stack, run, days)
    # The oldest run alone is over the budget: it goes alone; then the next two fit together.
    assert await _prune(stack, files_per_batch=4, max_batches=1) == (1, True)
    await expect_error("not_found", stack.run(tenant, big))
    assert (await stack.run(tenant, small))["id"] == small
    assert await _prune(stack, files_per_batch=4, max_batches=1) == (2, False)
    for run in (small, smaller):
        await expect_error("not_found", stack.run(tenant, run))


async def test_the_coordinators_sweeper_prunes_finished_runs_past_their_retention(stack):
    tenant = await stack.tenant(monthly=100)
    template = await stack.template(tenant, [{"name": "s", "handler": "noop"}])
    coordinator = stack.services["coordinator"][0]
    deadline = asyncio.get_running_loop().time() + 10
    while coordinator.sweeper.prune_passes < 1:  # its own first prune (at start) must not race ours
        assert asyncio.get_running_loop().time() < deadline, "the coordinator never pruned at start"
        await asyncio.sleep(0.02)
    old = await _cancelled_run(stack, tenant, template)
    await _finished_days_ago(stack, old, 91)
    sweeper = RecoverySweeper(coordinator.deps)  # as a coordinator starting now
    sweeper.start()
    try:
        while sweeper.prune_passes < 1:
            assert asyncio.get_running_loop().time() < deadline + 10, "the sweeper never pruned"
            await asyncio.sleep(0.02)
    finally:
        await sweeper.stop()
    await expect_error("not_found", stack.run(tenant, old))


# ---- at scale: what a pass reads ------------------------------------------------------------

# 20,000 runs finished over the last 89 days, 30 past 90 days, 2,000 running; a charge's
# credit intent for each, 10 still pending; 50,000 paid refunds and a few owed.
_SEED = """
INSERT INTO coordinator.templates (id, tenant_id, name, steps, credits_per_file, failure_policy)
VALUES ('tpl', 'tenant-a', 'ocr', '[{"name": "fetch", "handler": "noop"}]', 1, 'continue');
INSERT INTO coordinator.runs (id, tenant_id, template_id, status, mode, total, pending, succeeded, finished_at)
SELECT 'done-' || g, 'tenant-a', 'tpl', 'COMPLETED', 'per_file', 2, 0, 2, now() - g * interval '380 seconds'
FROM generate_series(1, 20000) g;
INSERT INTO coordinator.runs (id, tenant_id, template_id, status, mode, total, pending, succeeded, finished_at)
SELECT 'old-' || g, 'tenant-a', 'tpl', 'COMPLETED', 'per_file', 2, 0, 2, now() - interval '91 days' - g * interval '1 hour'
FROM generate_series(1, 30) g;
INSERT INTO coordinator.runs (id, tenant_id, template_id, status, mode, total, pending)
SELECT 'running-' || g, 'tenant-a', 'tpl', 'RUNNING', 'per_file', 2, 2 FROM generate_series(1, 2000) g;
INSERT INTO coordinator.files (run_id, idx, name, status)
SELECT id, i, 'f' || i, CASE WHEN status = 'RUNNING' THEN 'PENDING' ELSE 'SUCCEEDED' END
FROM coordinator.runs, generate_series(0, 1) i;
INSERT INTO coordinator.timeline (run_id, tenant_id, kind, actor) SELECT id, tenant_id, 'created', 'test' FROM coordinator.runs;
INSERT INTO coordinator.credit_intents (key, run_id, tenant_id, amount, state)
SELECT 'charge-' || id, id, tenant_id, 2, CASE WHEN id IN ('old-1', 'running-1') THEN 'pending' ELSE 'applied' END
FROM coordinator.runs;
INSERT INTO coordinator.refunds_due (key, of_key, run_id, tenant_id, amount, paid, paid_at)
SELECT 'paid-' || g, 'charge-' || g, 'done-' || (g % 20000 + 1), 'tenant-a', 1, true, now()
FROM generate_series(1, 50000) g;
INSERT INTO coordinator.refunds_due (key, of_key, run_id, tenant_id, amount)
VALUES ('owed-old-2', 'charge-old-2', 'old-2', 'tenant-a', 1);
ANALYZE coordinator.runs; ANALYZE coordinator.files; ANALYZE coordinator.timeline;
ANALYZE coordinator.credit_intents; ANALYZE coordinator.refunds_due;
"""


@pytest.fixture(scope="module")
async def db(make_settings):
    engine = await seeded_engine(make_settings, _SEED)
    yield engine
    await engine.dispose()


async def test_a_pass_reads_the_expired_runs_through_indexes_not_every_run(db):
    with sent(db) as seen:
        assert await run_retention.prune(db, older_than_s=90 * DAY) == (28, False)  # old-1 and old-2 are unsettled
    async with db.connect() as conn:
        left = set((await conn.exec_driver_sql(
            "SELECT id FROM coordinator.runs WHERE id LIKE 'old-%'")).scalars())
    assert left == {"old-1", "old-2"}
    statements = {s: p for s, p in seen if "coordinator." in s}
    [(select, parameters)] = [(s, p) for s, p in statements.items() if s.lstrip().startswith("SELECT")]
    for mode, plan in (await plans(db, select, parameters)).items():
        scanned = {n.get("Relation Name") for n in nodes(plan) if n["Node Type"] == "Seq Scan"}
        assert "runs" not in scanned and "refunds_due" not in scanned and "credit_intents" not in scanned, (mode, plan)
        assert {"runs_finished", "refunds_due_unpaid", "credit_intents_pending"} <= indexes(plan), (mode, plan)
    deletes = [(s, p) for s, p in statements.items() if s.lstrip().startswith("DELETE")]
    assert len(deletes) == 5
    for statement, parameters in deletes:
        for mode, plan in (await plans(db, statement, parameters)).items():
            assert not [n for n in nodes(plan) if n["Node Type"] == "Seq Scan"], (mode, plan)
