"""Idempotency-Key: the same key and body within 24 h replays the first response; another
body is 422 ``idempotency_key_reused``; a duplicate still in flight is 409."""

from __future__ import annotations

import hashlib

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.messages import ServiceError

WINDOW = "24 hours"


def request_hash(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).hexdigest()


async def begin(engine: AsyncEngine, tenant_id: str, key: str, digest: str) -> tuple[int, bytes] | None:
    """None: go ahead (we own the key now). Otherwise the stored (status, body) to replay."""
    async with engine.begin() as conn:
        await conn.execute(text(f"DELETE FROM gateway.idempotency WHERE tenant_id = :t AND key = :k "
                                f"AND created_at < now() - interval '{WINDOW}'"), {"t": tenant_id, "k": key})
        won = await conn.execute(text("INSERT INTO gateway.idempotency (tenant_id, key, request_hash, state) "
                                      "VALUES (:t, :k, :h, 'in_progress') ON CONFLICT DO NOTHING RETURNING key"),
                                 {"t": tenant_id, "k": key, "h": digest})
        if won.first() is not None:
            return None
        row = (await conn.execute(text("SELECT request_hash, state, status, body FROM gateway.idempotency "
                                       "WHERE tenant_id = :t AND key = :k"), {"t": tenant_id, "k": key})).first()
    if row is None:
        raise ServiceError("idempotency_in_progress", "a request with this Idempotency-Key is in progress")
    if row.request_hash != digest:
        raise ServiceError("idempotency_key_reused", "this Idempotency-Key was used with a different request")
    if row.state != "done":
        raise ServiceError("idempotency_in_progress", "a request with this Idempotency-Key is in progress")
    return row.status, bytes(row.body)


async def finish(engine: AsyncEngine, tenant_id: str, key: str, status: int, body: bytes) -> None:
    async with engine.begin() as conn:
        if status >= 500:  # not an answer worth replaying: let a retry run again
            await conn.execute(text("DELETE FROM gateway.idempotency WHERE tenant_id = :t AND key = :k"), {"t": tenant_id, "k": key})
        else:
            await conn.execute(text("UPDATE gateway.idempotency SET state = 'done', status = :s, body = :b "
                                    "WHERE tenant_id = :t AND key = :k"), {"s": status, "b": body, "t": tenant_id, "k": key})
