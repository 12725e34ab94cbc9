"""Reads that must not grow with the data: the plans PostgreSQL makes for them, both the
custom plan of a first execution and the generic plan it may cache for a prepared
statement (asyncpg prepares every statement; PostgreSQL may switch to a generic plan from
the sixth execution on a connection).

The statements are captured as the code sends them (store.run_body, the notifier's
repository.page) and explained with the same parameters, on tables shaped like
production's: mostly finished runs whose files all succeeded, a run with some failures, a
cancelled run, a running run with most of its files PENDING; a tenant that reads its
notifications next to one that does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.coordinator import store
from services.notifier import repository

_SEED = """
INSERT INTO coordinator.templates (id, tenant_id, name, steps, credits_per_file, failure_policy)
VALUES ('tpl', 'tenant-a', 'ocr', '[{"name": "fetch", "handler": "noop"}]', 1, 'continue');
INSERT INTO coordinator.files (run_id, idx, name, status)
SELECT 'done-' || r, i, 'f' || i, 'SUCCEEDED' FROM generate_series(1, 1000) r, generate_series(0, 199) i;
INSERT INTO coordinator.files (run_id, idx, name, status)
SELECT 'with-errors', i, 'f' || i, CASE WHEN i % 50 = 3 THEN 'FAILED' WHEN i % 97 = 5 THEN 'ERROR' ELSE 'SUCCEEDED' END
FROM generate_series(0, 4999) i;
INSERT INTO coordinator.files (run_id, idx, name, status)
SELECT 'cancelled', i, 'f' || i, CASE WHEN i >= 1500 THEN 'CANCELLED' WHEN i % 300 = 7 THEN 'SKIPPED' ELSE 'SUCCEEDED' END
FROM generate_series(0, 2999) i;
INSERT INTO coordinator.files (run_id, idx, name, status)
SELECT 'running', i, 'f' || i, CASE WHEN i < 5000 THEN 'SUCCEEDED' ELSE 'PENDING' END FROM generate_series(0, 19999) i;
INSERT INTO coordinator.runs (id, tenant_id, template_id, status, mode, total, pending, succeeded, failed, errored,
                              skipped, cancelled)
SELECT run_id, 'tenant-a', 'tpl',
       CASE run_id WHEN 'running' THEN 'RUNNING' WHEN 'cancelled' THEN 'CANCELLED' ELSE 'COMPLETED_WITH_ERRORS' END,
       'per_file', count(*), count(*) FILTER (WHERE status = 'PENDING'), count(*) FILTER (WHERE status = 'SUCCEEDED'),
       count(*) FILTER (WHERE status = 'FAILED'), count(*) FILTER (WHERE status = 'ERROR'),
       count(*) FILTER (WHERE status = 'SKIPPED'), count(*) FILTER (WHERE status = 'CANCELLED')
FROM coordinator.files WHERE run_id IN ('with-errors', 'cancelled', 'running') GROUP BY run_id;
INSERT INTO notifier.notifications (id, tenant_id, at, kind, message, read, dedupe_key)
SELECT 'keeps-up-' || g, 'keeps-up', now() - g * interval '1 minute', 'file_failed', 'Step failed', g < 20000, 'k' || g
FROM generate_series(0, 20002) g;
INSERT INTO notifier.notifications (id, tenant_id, at, kind, message, read, dedupe_key)
SELECT 'busy-' || g, 'busy', now() - g * interval '1 minute', 'file_failed', 'Step failed', false, 'b' || g
FROM generate_series(0, 19999) g;
ANALYZE coordinator.files;
ANALYZE coordinator.runs;
ANALYZE notifier.notifications;
"""


async def seeded_engine(make_settings, seed: str) -> AsyncEngine:
    """An engine on a fresh, migrated database that ``seed`` (SQL) filled."""
    settings = await make_settings()
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(seed)
    finally:
        await conn.close()
    return create_async_engine(settings.sqlalchemy_url)


@pytest.fixture(scope="module")
async def db(make_settings):
    engine = await seeded_engine(make_settings, _SEED)
    yield engine
    await engine.dispose()


@contextlib.contextmanager
def sent(engine: AsyncEngine):
    """The statements the code sends through ``engine``, with their parameters."""
    seen: list[tuple[str, tuple]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, tuple(parameters or ())))

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


def _literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        value = value.isoformat()
    if isinstance(value, (list, tuple)):
        return "ARRAY[" + ", ".join(_literal(v) for v in value) + "]"
    return "'" + str(value).replace("'", "''") + "'"


async def plans(engine: AsyncEngine, statement: str, parameters: tuple) -> dict[str, dict]:
    """The custom plan of ``statement`` and the generic plan PostgreSQL would cache for it
    (a statement without parameters has the one plan)."""
    async with engine.connect() as conn:
        custom = (await conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters)).scalar()
        if not parameters:
            return {"custom": _loaded(custom)[0]["Plan"]}
        raw = (await conn.get_raw_connection()).driver_connection
        await raw.execute("PREPARE audited AS " + statement)
        try:
            await raw.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            generic = await raw.fetchval("EXPLAIN (FORMAT JSON) EXECUTE audited("
                                         + ", ".join(_literal(p) for p in parameters) + ")")
        finally:
            await raw.execute("DEALLOCATE audited")
            await conn.rollback()
    return {"custom": _loaded(custom)[0]["Plan"], "generic": _loaded(generic)[0]["Plan"]}


def _loaded(plan):
    return json.loads(plan) if isinstance(plan, str) else plan


def nodes(plan: dict) -> list[dict]:
    return [plan] + [n for child in plan.get("Plans", []) for n in nodes(child)]


def indexes(plan: dict) -> set[str]:
    return {n["Index Name"] for n in nodes(plan) if "Index Name" in n}


# ---- a run's files in some statuses: GET /workflow-runs/{id}?file_status= ------------------------

async def _page_of_files(engine: AsyncEngine, run_id: str, statuses, offset=0, limit=1000):
    with sent(engine) as seen:
        async with engine.connect() as conn:
            run = await store.load_run(conn, "tenant-a", run_id)
            body = await store.run_body(conn, run, offset=offset, limit=limit, statuses=statuses)
    [(statement, parameters)] = [(s, p) for s, p in seen if "FROM coordinator.files" in s]
    return body, statement, parameters


@pytest.mark.parametrize("run_id, status", [("with-errors", "ERROR"), ("with-errors", "FAILED"),
                                            ("cancelled", "CANCELLED"), ("cancelled", "SKIPPED")])
async def test_a_runs_files_in_one_status_come_from_the_partial_index(db, run_id, status):
    body, statement, parameters = await _page_of_files(db, run_id, [status], limit=20)
    assert body["files"] and all(f["status"] == status for f in body["files"])
    for mode, plan in (await plans(db, statement, parameters)).items():
        # Only the files in the status are read (not the whole run, as through files_pkey).
        assert indexes(plan) == {"files_ended_without_success"}, (mode, plan)


async def test_several_statuses_come_from_the_partial_index_too(db):
    body, statement, parameters = await _page_of_files(db, "with-errors", ["FAILED", "ERROR"])
    assert {f["status"] for f in body["files"]} == {"FAILED", "ERROR"}
    for mode, plan in (await plans(db, statement, parameters)).items():
        assert indexes(plan) == {"files_ended_without_success"}, (mode, plan)


_BEFORE = ("SELECT idx, status FROM coordinator.files WHERE run_id = :r AND idx >= :o AND status = ANY(:s) "
           "ORDER BY idx LIMIT :l")


@pytest.mark.parametrize("statuses", [
    ["FAILED"], ["ERROR"], ["ERROR", "FAILED"], ["FAILED", "ERROR", "FAILED"], ["SUCCEEDED"], ["PENDING"], ["SKIPPED"],
    ["CANCELLED"], ["SKIPPED", "CANCELLED"], ["SUCCEEDED", "FAILED"],
    ["PENDING", "SUCCEEDED", "FAILED", "ERROR", "SKIPPED", "CANCELLED"],
])
async def test_the_page_holds_the_files_the_former_any_of_the_statuses_gave(db, statuses):
    for run_id in ("with-errors", "cancelled", "running"):
        for offset, limit in ((0, 1000), (0, 1), (0, 3), (4, 7), (1499, 50), (2999, 1000), (19999, 5), (25000, 10)):
            body, _, _ = await _page_of_files(db, run_id, statuses, offset, limit)
            async with db.connect() as conn:
                before = (await conn.execute(text(_BEFORE), {"r": run_id, "o": offset, "l": limit, "s": statuses})).all()
            assert [(f["index"], f["status"]) for f in body["files"]] == [tuple(r) for r in before], \
                (run_id, statuses, offset, limit)


# ---- unread notifications: the dashboard's unread count ----------------------------------------

@pytest.mark.parametrize("after", [None, "a-cursor"])
async def test_a_tenants_unread_notifications_come_from_their_own_index(db, after):
    """A tenant that read all but 3 of its 20,003 notifications: its unread ones are found
    without walking the 20,000 it read."""
    if after is not None:
        after = (datetime.now(timezone.utc) + timedelta(days=1), "zzz")
    with sent(db) as seen:
        rows = await repository.page(db, "keeps-up", unread_only=True, limit=201, after=after)
    assert [r["id"] for r in rows] == ["keeps-up-20000", "keeps-up-20001", "keeps-up-20002"]
    [(statement, parameters)] = seen
    for mode, plan in (await plans(db, statement, parameters)).items():
        assert indexes(plan) == {"notifications_unread_by_tenant"}, (mode, plan)


async def test_a_page_of_all_notifications_still_uses_the_tenants_index(db):
    with sent(db) as seen:
        rows = await repository.page(db, "keeps-up", unread_only=False, limit=21, after=None)
    assert [r["id"] for r in rows] == [f"keeps-up-{g}" for g in range(21)]
    [(statement, parameters)] = seen
    for mode, plan in (await plans(db, statement, parameters)).items():
        assert indexes(plan) == {"notifications_by_tenant"}, (mode, plan)


# ---- the migrations themselves -----------------------------------------------------------------

async def test_the_migrations_go_down_and_up_again(make_settings):
    from alembic import command

    from shared.migrations import alembic_config, migrate

    settings = await make_settings()

    async def present() -> set[str]:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return {r[0] for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE indexname IN "
                "('files_ended_without_success', 'notifications_unread_by_tenant')")}
        finally:
            await conn.close()

    everything = {"files_ended_without_success", "notifications_unread_by_tenant"}
    assert await present() == everything
    await asyncio.to_thread(command.downgrade, alembic_config("coordinator", settings.sqlalchemy_url), "c0010")
    await asyncio.to_thread(command.downgrade, alembic_config("notifier", settings.sqlalchemy_url), "n0003")
    assert await present() == set()
    await migrate(settings)
    assert await present() == everything
