"""The run's execution log: append-only, written in the transaction of the change it records."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.coordinator import pages

_INSERT = text(
    "INSERT INTO coordinator.timeline (run_id, tenant_id, kind, actor, file_index, details) "
    "VALUES (:run_id, :tenant_id, :kind, :actor, :file_index, CAST(:details AS jsonb))"
)


def entry(run_id: str, tenant_id: str, kind: str, actor: str, file_index: int | None = None, **details: Any) -> dict:
    return {
        "run_id": run_id,
        "tenant_id": tenant_id,
        "kind": kind,
        "actor": actor,
        "file_index": file_index,
        "details": orjson.dumps(details, default=str).decode(),
    }


async def append(conn: AsyncConnection, *entries: dict) -> None:
    if entries:
        await conn.execute(_INSERT, list(entries))


async def read(conn: AsyncConnection, run_id: str, limit: int = 1000, after_id: int = 0) -> tuple[list[dict], int | None]:
    """Up to ``limit`` entries after entry ``after_id``, oldest first, and the id to read on
    after (None when this page ends the log). Ids are shared by every run: a caller hands
    them out enciphered (commands/queries.get_timeline), never as they are."""
    rows = await conn.execute(
        text(
            "SELECT id, at, kind, actor, file_index, details FROM coordinator.timeline "
            "WHERE run_id = :run_id AND id > :after ORDER BY id LIMIT :limit"
        ),
        {"run_id": run_id, "after": after_id, "limit": limit + 1},
    )
    rows = rows.mappings().all()
    ids = [row["id"] for row in rows]
    items, cut = pages.within_page(_entry(row) for row in rows[:limit])
    more = cut or len(rows) > limit
    return items, (ids[len(items) - 1] if more else None)


def _entry(row) -> dict:
    item = {"at": row["at"].isoformat(), "kind": row["kind"], "actor": row["actor"], "details": row["details"]}
    if row["file_index"] is not None:
        item["file_index"] = row["file_index"]
    return item
