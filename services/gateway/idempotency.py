"""Idempotency-Key: the same key and the same request within 24 h replays the first
response; another request under that key is 422 ``idempotency_key_reused``; a duplicate
while the first is still in flight is 409 ``idempotency_in_progress``.

The ``in_progress`` row is inserted before the work (INSERT … ON CONFLICT DO NOTHING
decides who goes ahead) and the response stored after it. A row left ``in_progress`` by a
gateway that died mid-request is taken over after a lease, so a crash does not lock the key
for 24 h.

The row carries a random ``nonce``, drawn when the key is first recorded: what the request
makes is named by tenant, key and nonce (routes.py), never by the key alone. So a retry
while the row lives reaches what the first attempt made, even one whose answer was lost,
and the same key after its window (the row expired: a new nonce) makes something new
rather than finding the old run. For the same reason a 5xx does not delete the row: it is
``released``, and the same request may go ahead at once, under the same nonce, to find
what the failed attempt may have made.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
import structlog
from aiohttp import web
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import delete_in_batches
from shared.messages import ServiceError

log = structlog.get_logger(__name__)

WINDOW_S = 24 * 3600
MAX_KEY_LENGTH = 255
REPLAYED_HEADER = "Idempotent-Replayed"


def request_hash(method: str, path: str, body: object | None) -> str:
    """Of the method, the path and the body as parsed JSON (key order and spacing do not count)."""
    canonical = b"" if body is None else orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(method.upper().encode() + b" " + path.encode() + b"\n" + canonical).hexdigest()


def check_key(key: str) -> str:
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ServiceError("validation_error", "Idempotency-Key must be 1 to 255 printable characters",
                           {"fields": {"Idempotency-Key": "1 to 255 printable characters"}})
    return key


@dataclass(frozen=True, slots=True)
class Begun:
    """Either ``replay`` (status, body) to send back, or go ahead (``taken_over``: an earlier
    attempt under this key died or failed mid-request, so its effect may already exist).
    ``nonce`` names this use of the key; None for a row recorded before nonces existed,
    whose effect is named by the key alone."""

    replay: tuple[int, bytes] | None = None
    taken_over: bool = False
    nonce: str | None = None


_CLAIM = text("INSERT INTO gateway.idempotency (tenant_id, key, request_hash, state, nonce) "
              "VALUES (:t, :k, :h, 'in_progress', :n) ON CONFLICT DO NOTHING RETURNING key")
_EXPIRE = text("DELETE FROM gateway.idempotency WHERE tenant_id = :t AND key = :k "
               "AND created_at < now() - make_interval(secs => :window)")
_READ = text("SELECT request_hash, state, status, body, nonce, "
             "created_at < now() - make_interval(secs => :lease) AS stale "
             "FROM gateway.idempotency WHERE tenant_id = :t AND key = :k FOR UPDATE")
_TAKE_OVER = text("UPDATE gateway.idempotency SET state = 'in_progress', created_at = now() "
                  "WHERE tenant_id = :t AND key = :k")


async def begin(engine: AsyncEngine, tenant_id: str, key: str, digest: str, lease_s: float) -> Begun:
    ids = {"t": tenant_id, "k": key}
    async with engine.begin() as conn:
        await conn.execute(_EXPIRE, {**ids, "window": WINDOW_S})
        nonce = secrets.token_hex(16)
        if (await conn.execute(_CLAIM, {**ids, "h": digest, "n": nonce})).first() is not None:
            return Begun(nonce=nonce)
        row = (await conn.execute(_READ, {**ids, "lease": lease_s})).first()
        if row is None:  # purged as expired between our insert and read: ask again
            raise ServiceError("idempotency_in_progress", "a request with this Idempotency-Key is in progress")
        if row.request_hash != digest:
            # Released rows too: the failed attempt may have made something under this key.
            raise ServiceError("idempotency_key_reused", "this Idempotency-Key was used with a different request")
        if row.state == "done":
            return Begun(replay=(row.status, bytes(row.body)))
        if row.state == "in_progress" and not row.stale:
            raise ServiceError("idempotency_in_progress", "a request with this Idempotency-Key is in progress")
        await conn.execute(_TAKE_OVER, ids)
        log.warning("idempotency.taken_over", tenant_id=tenant_id, key=key, after=row.state)
        return Begun(taken_over=True, nonce=row.nonce)


async def finish(engine: AsyncEngine, tenant_id: str, key: str, status: int, body: bytes) -> None:
    ids = {"t": tenant_id, "k": key}
    async with engine.begin() as conn:
        if status >= 500:  # not an answer worth replaying: a retry may go ahead, under the same nonce
            await conn.execute(text("UPDATE gateway.idempotency SET state = 'released' "
                                    "WHERE tenant_id = :t AND key = :k AND state = 'in_progress'"), ids)
        else:
            await conn.execute(text("UPDATE gateway.idempotency SET state = 'done', status = :s, body = :b "
                                    "WHERE tenant_id = :t AND key = :k"), {**ids, "s": status, "b": body})


_PURGE_BATCH = text(
    "DELETE FROM gateway.idempotency WHERE ctid = ANY(ARRAY("
    " SELECT ctid FROM gateway.idempotency WHERE created_at < now() - make_interval(secs => :w) LIMIT :batch))"
)


async def purge_expired(engine: AsyncEngine, *, batch: int = 5_000, max_batches: int = 100) -> int:
    """Forget records past the window, a batch per transaction: each is short, inside the
    gateway's statement timeout, however many have piled up (the rest go next time)."""
    removed, _ = await delete_in_batches(engine, _PURGE_BATCH, {"w": WINDOW_S}, batch=batch, max_batches=max_batches)
    return removed


def replay_response(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json", headers={REPLAYED_HEADER: "true"})


async def once(engine: AsyncEngine, tenant_id: str, key: str, digest: str, lease_s: float,
               work: Callable[[Begun], Awaitable[web.Response]]) -> web.Response:
    """Run ``work(begun)`` at most once per (tenant, key) and request, replaying its answer."""
    begun = await begin(engine, tenant_id, key, digest, lease_s)
    if begun.replay is not None:
        return replay_response(*begun.replay)
    try:
        response = await work(begun)
    except BaseException:
        await _shielded(finish(engine, tenant_id, key, 500, b""))
        raise
    await _shielded(finish(engine, tenant_id, key, response.status, response.body or b""))
    return response


async def _shielded(write: Awaitable[None]) -> None:
    """The record must be written even if the request is being cancelled; if the database is
    gone, the row stays in_progress and its lease lets a later retry take over."""
    try:
        await asyncio.shield(write)
    except Exception as exc:
        log.warning("idempotency.record_failed", error=repr(exc))
