"""Reads: one run with its files, a page of runs, a run's timeline, runs needing attention."""

from __future__ import annotations


from sqlalchemy import text

from shared import opaque_cursor
from services.coordinator import cursor, store, timeline
from services.coordinator.context import Deps
from services.coordinator.schemas import GetRun, ListRuns, TimelinePage
from services.coordinator.views import run_view

TIMELINE_CURSOR_KEY = opaque_cursor.StoredKey("coordinator.cursor_key")  # migration c0017


async def get_run(deps: Deps, cmd: GetRun) -> dict:
    async with deps.engine.connect() as conn:
        run = await store.load_run(conn, cmd.tenant_id, cmd.run_id)
        return await store.run_body(conn, run, offset=cmd.file_offset, limit=cmd.file_limit, statuses=cmd.file_status)


async def list_runs(deps: Deps, cmd: ListRuns) -> dict:
    where, params = ["true"], {"limit": cmd.limit + 1}
    if cmd.tenant_id is not None:
        where.append("tenant_id = :tenant_id")
        params["tenant_id"] = cmd.tenant_id
    if cmd.status:
        where.append("status = :status")
        params["status"] = cmd.status.upper()
    if cmd.needs_attention is not None:
        where.append("needs_attention = :na")
        params["na"] = cmd.needs_attention
    if cmd.cursor:
        params["c_at"], params["c_id"] = cursor.decode(cmd.cursor)
        where.append("(created_at, id) < (:c_at, :c_id)")
    async with deps.engine.connect() as conn:
        rows = (await conn.execute(text(
            f"SELECT * FROM coordinator.runs WHERE {' AND '.join(where)} ORDER BY created_at DESC, id DESC LIMIT :limit"),
            params)).mappings().all()
    items = [run_view(r) for r in rows[: cmd.limit]]
    next_cursor = None
    if len(rows) > cmd.limit:
        last = rows[cmd.limit - 1]
        next_cursor = cursor.encode(last["created_at"], last["id"])
    return {"items": items, "next_cursor": next_cursor}


async def get_timeline(deps: Deps, cmd: TimelinePage) -> dict:
    """``{"items": [...], "next_cursor"}``: a page of the run's log, oldest first. The cursor
    is the page's last entry id, enciphered (shared/opaque_cursor.py): entry ids are one
    sequence for every run, and their gaps would tell a tenant how busy the others are."""
    scope = ("coordinator.timeline", cmd.run_id)  # a cursor reads on this run's log only
    async with deps.engine.connect() as conn:
        await store.load_run(conn, cmd.tenant_id, cmd.run_id)
        key = await TIMELINE_CURSOR_KEY.get(conn)
        after_id = opaque_cursor.reveal_or_refuse(key, cmd.cursor, *scope) if cmd.cursor else 0
        items, last_id = await timeline.read(conn, cmd.run_id, cmd.limit, after_id)
    return {"items": items, "next_cursor": opaque_cursor.hide(key, last_id, *scope) if last_id is not None else None}


async def attention(deps: Deps, cmd: ListRuns) -> dict:
    """Runs needing attention, most recently changed first, a page at a time, with how many
    each tenant has: a platform admin's list is every tenant's, and one tenant with many
    flagged runs must not hide the others' (the counts say whose they are; X-Tenant-Id
    lists one tenant's). Ordered by a column that changes, the pages are a live view: a
    run changed meanwhile can move between them."""
    where, params = ["needs_attention"], {"limit": cmd.limit + 1}
    if cmd.tenant_id is not None:
        where.append("tenant_id = :t")
        params["t"] = cmd.tenant_id
    counts_sql = f"SELECT tenant_id, count(*) AS n FROM coordinator.runs WHERE {' AND '.join(where)} GROUP BY tenant_id"
    if cmd.cursor:
        params["c_at"], params["c_id"] = cursor.decode(cmd.cursor)
        where.append("(updated_at, id) < (:c_at, :c_id)")
    async with deps.engine.connect() as conn:
        rows = (await conn.execute(text(
            f"SELECT * FROM coordinator.runs WHERE {' AND '.join(where)} ORDER BY updated_at DESC, id DESC LIMIT :limit"),
            params)).mappings().all()
        counts = {r["tenant_id"]: r["n"] for r in (await conn.execute(text(counts_sql), params)).mappings()}
    items = [{**run_view(r), "reason": r["attention_reason"] or "failed"} for r in rows[: cmd.limit]]
    next_cursor = None
    if len(rows) > cmd.limit:
        last = rows[cmd.limit - 1]
        next_cursor = cursor.encode(last["updated_at"], last["id"])
    return {"items": items, "next_cursor": next_cursor, "total": sum(counts.values()), "by_tenant": counts}
