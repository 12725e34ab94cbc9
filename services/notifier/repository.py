"""The notifier's SQL: notifications, webhooks and the deliveries outbox (schema ``notifier``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

import orjson
from sqlalchemy import (BigInteger, Boolean, Column, DateTime, Integer, LargeBinary, MetaData, Table, Text, Uuid,
                        delete, insert, select, text, tuple_, update)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import database_errors, transaction

_meta = MetaData(schema="notifier")
notifications = Table(
    "notifications", _meta, Column("id", Text, primary_key=True), Column("tenant_id", Text), Column("at", DateTime(True)),
    Column("kind", Text), Column("run_id", Text), Column("file_index", Integer), Column("message", Text),
    Column("read", Boolean), Column("dedupe_key", Text))
webhooks = Table("webhooks", _meta, Column("tenant_id", Text, primary_key=True), Column("url", Text),
                 Column("secret", Text), Column("updated_at", DateTime(True)))
# A delivery's ``id`` (bigserial) is ours alone: shared by every tenant, its values would tell
# one tenant how many deliveries the others got. Tenants see ``public_id`` (a random UUID,
# drawn by PostgreSQL at insert, migration n0005): the X-Redrive-Delivery header, the id in
# GET /webhook/deliveries and in POST …/{id}/redeliver.
deliveries = Table("deliveries", _meta, Column("id", BigInteger, primary_key=True),
                   Column("public_id", Uuid(as_uuid=True)), Column("created_at", DateTime(True)),
                   Column("notification_id", Text),
                   Column("tenant_id", Text), Column("url", Text), Column("body", LargeBinary),
                   Column("attempts", Integer), Column("next_attempt_at", DateTime(True)), Column("status", Text),
                   Column("last_error", Text), Column("delivered_at", DateTime(True)))

_N = notifications.c
_VIEW = (_N.id, _N.at, _N.kind, _N.run_id, _N.file_index, _N.message, _N.read)


def _fields(n: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": n["id"], "tenant_id": n["tenant_id"], "at": n["at"].isoformat(), "kind": n["kind"],
            "run_id": n["run_id"], "file_index": n["file_index"], "message": n["message"]}


def webhook_body(n: Mapping[str, Any]) -> bytes:
    """What a webhook receives: the notification, as JSON."""
    return orjson.dumps(_fields(n))


def live_body(n: Mapping[str, Any]) -> bytes:
    """What a live stream (SSE ``event: notification``) carries: a new notification, as
    ``GET /notifications`` lists it, with its tenant and, as every body on the bus, its
    schema version."""
    return orjson.dumps({"v": 1, **_fields(n), "read": False})


class Recorded(NamedTuple):
    created: list[Mapping[str, Any]]  # the notifications that were new (not a redelivered event's)
    queued: int  # webhook deliveries queued for them


async def record(engine: AsyncEngine, rows: Sequence[dict]) -> Recorded:
    """Insert the notifications whose dedupe key is new, and for those of tenants with a
    webhook their deliveries, in one transaction (outbox)."""
    async with transaction(engine) as conn:
        stmt = pg_insert(notifications).values(list(rows)).on_conflict_do_nothing(index_elements=["dedupe_key"])
        created = (await conn.execute(stmt.returning(_N.id, _N.tenant_id, _N.at, _N.kind, _N.run_id, _N.file_index,
                                                     _N.dedupe_key,
                                                     _N.message))).mappings().all()
        tenants = {n["tenant_id"] for n in created}
        if not tenants:
            return Recorded([], 0)
        hooks = dict((await conn.execute(select(webhooks.c.tenant_id, webhooks.c.url)
                                         .where(webhooks.c.tenant_id.in_(tenants)))).all())
        queued = [{"notification_id": n["id"], "tenant_id": n["tenant_id"], "url": hooks[n["tenant_id"]],
                   "body": webhook_body(n)} for n in created if n["tenant_id"] in hooks]
        if queued:
            await conn.execute(insert(deliveries), queued)
        return Recorded(list(created), len(queued))


async def page(engine: AsyncEngine, tenant_id: str, *, limit: int, after: tuple[datetime, str] | None,
               unread: bool | None = None, unread_only: bool = False) -> list[Mapping[str, Any]]:
    """Up to ``limit`` notifications of the tenant, newest first, after the position ``after``:
    all of them (``unread`` None), the unread ones only (True) or the read ones only (False).
    ``unread_only=True`` is ``unread=True``."""
    if unread_only:
        unread = True
    query = select(*_VIEW).where(_N.tenant_id == tenant_id)
    if unread is True:
        # ``read IS false``, as the partial index notifications_unread_by_tenant (n0004) is
        # written: PostgreSQL matches it in any plan, the generic one of a prepared statement too.
        query = query.where(_N.read.is_(False))
    elif unread is False:
        query = query.where(_N.read.is_(True))
    if after is not None:
        query = query.where(tuple_(_N.at, _N.id) < tuple_(*after))
    async with database_errors(), engine.connect() as conn:
        return list((await conn.execute(query.order_by(_N.at.desc(), _N.id.desc()).limit(limit))).mappings().all())


async def mark_read(engine: AsyncEngine, tenant_id: str, notification_id: str) -> Mapping[str, Any] | None:
    async with transaction(engine) as conn:
        stmt = update(notifications).where(_N.id == notification_id, _N.tenant_id == tenant_id).values(read=True)
        return (await conn.execute(stmt.returning(*_VIEW))).mappings().first()


async def put_webhook(engine: AsyncEngine, tenant_id: str, url: str, secret: str) -> Mapping[str, Any]:
    async with transaction(engine) as conn:
        stmt = pg_insert(webhooks).values(tenant_id=tenant_id, url=url, secret=secret)
        stmt = stmt.on_conflict_do_update(index_elements=["tenant_id"], set_={
            "url": stmt.excluded.url, "secret": stmt.excluded.secret, "updated_at": text("now()")})
        return (await conn.execute(stmt.returning(webhooks.c.url, webhooks.c.updated_at))).mappings().one()


async def get_webhook(engine: AsyncEngine, tenant_id: str) -> Mapping[str, Any] | None:
    async with database_errors(), engine.connect() as conn:
        query = select(webhooks.c.url, webhooks.c.updated_at).where(webhooks.c.tenant_id == tenant_id)
        return (await conn.execute(query)).mappings().first()


async def delete_webhook(engine: AsyncEngine, tenant_id: str) -> bool:
    """Remove the webhook; its pending deliveries fail now rather than at their next attempt."""
    async with transaction(engine) as conn:
        deleted = (await conn.execute(delete(webhooks).where(webhooks.c.tenant_id == tenant_id))).rowcount
        await conn.execute(text("UPDATE notifier.deliveries SET status = 'failed', last_error = 'the webhook was removed' "
                                "WHERE tenant_id = :t AND status = 'pending'"), {"t": tenant_id})
        return bool(deleted)


# ---- deliveries: claimed under a lease, finished only by the claim that made the attempt ----

_CLAIM = text("""
WITH due AS (
    SELECT d.id, w.url, w.secret FROM notifier.deliveries d LEFT JOIN notifier.webhooks w ON w.tenant_id = d.tenant_id
    WHERE d.status = 'pending' AND d.next_attempt_at <= now() AND NOT (d.tenant_id = ANY(:busy))
      AND (NOT (d.tenant_id = ANY(:one_each)) OR d.id IN (
          SELECT min(o.id) FROM notifier.deliveries o
          WHERE o.tenant_id = ANY(:one_each) AND o.status = 'pending' AND o.next_attempt_at <= now()
          GROUP BY o.tenant_id))
    ORDER BY d.id LIMIT :limit FOR UPDATE OF d SKIP LOCKED)
UPDATE notifier.deliveries d SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => :lease)
FROM due WHERE d.id = due.id
RETURNING d.id, d.public_id, d.tenant_id, d.attempts, d.body, due.url, due.secret""")
_DELIVERED = text("UPDATE notifier.deliveries SET status = 'delivered', delivered_at = now(), url = :url, "
                  "last_error = NULL WHERE id = :id AND attempts = :attempts AND status = 'pending'")
_NOT_DELIVERED = text("UPDATE notifier.deliveries SET status = :status, last_error = :error, url = coalesce(:url, url), "
                      "next_attempt_at = now() + make_interval(secs => :delay_s) "
                      "WHERE id = :id AND attempts = :attempts AND status = 'pending'")


async def claim_due(engine: AsyncEngine, limit: int, lease_s: float, busy: Sequence[str] = (),
                    one_each: Sequence[str] = ()) -> list[Mapping[str, Any]]:
    """Due deliveries (none of the ``busy`` tenants, at most the oldest one of each of the
    ``one_each`` tenants), their attempt counted and leased for ``lease_s``: another sender
    (or this one after a crash) takes a delivery again only once its lease has run out."""
    async with transaction(engine) as conn:
        rows = (await conn.execute(_CLAIM, {"limit": limit, "lease": float(lease_s), "busy": list(busy),
                                            "one_each": list(one_each)})).mappings().all()
    return sorted(rows, key=lambda r: r["id"])


async def finish(engine: AsyncEngine, delivered: list[dict], not_delivered: list[dict]) -> None:
    """Write outcomes, each only if its delivery is still at the attempt that was made."""
    async with transaction(engine) as conn:
        if delivered:
            await conn.execute(_DELIVERED, delivered)
        if not_delivered:
            await conn.execute(_NOT_DELIVERED, not_delivered)


# ---- deliveries as the tenant sees them: listed, and sent again on request ----------------

_D = deliveries.c
_DELIVERY_VIEW = (_D.public_id, _D.created_at, _D.notification_id, _D.status, _D.attempts, _D.url, _D.last_error,
                  _D.next_attempt_at, _D.delivered_at, _N.kind, _N.run_id, _N.at)
_WITH_NOTIFICATION = deliveries.outerjoin(notifications, _N.id == _D.notification_id)


async def delivery_page(engine: AsyncEngine, tenant_id: str, *, status: str | None, limit: int,
                        after: tuple[datetime, UUID] | None) -> list[Mapping[str, Any]]:
    """Up to ``limit`` of the tenant's deliveries, newest first, after the position ``after``
    ((created_at, public_id) of the last one of the page before: nothing in it is ours alone),
    along the index deliveries_by_tenant_created (n0005)."""
    query = select(*_DELIVERY_VIEW).select_from(_WITH_NOTIFICATION).where(_D.tenant_id == tenant_id)
    if status is not None:
        query = query.where(_D.status == status)
    if after is not None:
        query = query.where(tuple_(_D.created_at, _D.public_id) < tuple_(*after))
    async with database_errors(), engine.connect() as conn:
        return list((await conn.execute(query.order_by(_D.created_at.desc(), _D.public_id.desc()).limit(limit)))
                    .mappings().all())


class RedeliveryRefused(Exception):
    """Why a delivery cannot be sent again now (a sentence for the caller)."""


async def _webhook_set(conn, tenant_id: str) -> None:
    if (await conn.execute(select(webhooks.c.tenant_id).where(webhooks.c.tenant_id == tenant_id))).first() is None:
        raise RedeliveryRefused("no webhook is set: PUT /webhook first")


# Sent again as the same delivery (same X-Redrive-Delivery, so a receiver that did get it
# the first time drops it), to the webhook's current URL, with a fresh attempt budget.
_AGAIN = {"status": "pending", "attempts": 0, "next_attempt_at": text("now()"), "delivered_at": None}


async def redeliver(engine: AsyncEngine, tenant_id: str, public_id: UUID) -> Mapping[str, Any] | None:
    """Queue one delivered or failed delivery again (its public id unchanged); None when the
    tenant has no such delivery."""
    async with transaction(engine) as conn:
        row = (await conn.execute(select(_D.id, _D.status).where(_D.public_id == public_id, _D.tenant_id == tenant_id)
                                  .with_for_update())).first()
        if row is None:
            return None
        if row.status == "pending":
            raise RedeliveryRefused(f"delivery {public_id} is still pending: it is being sent")
        await _webhook_set(conn, tenant_id)
        await conn.execute(update(deliveries).where(_D.id == row.id).values(**_AGAIN))
        return (await conn.execute(select(*_DELIVERY_VIEW).select_from(_WITH_NOTIFICATION)
                                   .where(_D.id == row.id))).mappings().one()


async def redeliver_failed(engine: AsyncEngine, tenant_id: str) -> int:
    """Queue every failed delivery of the tenant again; returns how many."""
    async with transaction(engine) as conn:
        await _webhook_set(conn, tenant_id)
        stmt = update(deliveries).where(_D.tenant_id == tenant_id, _D.status == "failed").values(**_AGAIN)
        return (await conn.execute(stmt)).rowcount
