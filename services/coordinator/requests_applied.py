"""Keyed requests applied once: a Continue or a file retry sent with an Idempotency-Key
carries the gateway's name for that use of the key (``request_id``). Recorded in the
transaction that applies it, it makes a second copy (the gateway died after the first was
applied, and the client retried) answer with the run instead of charging again.

The gateway keeps a key's record 24 h; ids are kept twice that, then forgotten.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.db import delete_in_batches

RETENTION_S = 2 * 24 * 3600.0

_SEEN = text("SELECT run_id FROM coordinator.requests_applied WHERE tenant_id = :t AND request_id = :r")
_RECORD = text("INSERT INTO coordinator.requests_applied (tenant_id, request_id, run_id) VALUES (:t, :r, :run)")
_PRUNE = text(
    "DELETE FROM coordinator.requests_applied WHERE ctid = ANY(ARRAY("
    " SELECT ctid FROM coordinator.requests_applied WHERE applied_at < now() - make_interval(secs => :age) "
    " LIMIT :batch))"
)


async def applied(conn: AsyncConnection, tenant_id: str, request_id: str | None) -> bool:
    return request_id is not None and (await conn.execute(_SEEN, {"t": tenant_id, "r": request_id})).first() is not None


async def record(conn: AsyncConnection, tenant_id: str, request_id: str | None, run_id: str) -> None:
    if request_id is not None:
        await conn.execute(_RECORD, {"t": tenant_id, "r": request_id, "run": run_id})


async def prune(engine: AsyncEngine, *, older_than_s: float = RETENTION_S) -> tuple[int, bool]:
    return await delete_in_batches(engine, _PRUNE, {"age": older_than_s}, batch=10_000, max_batches=10)
