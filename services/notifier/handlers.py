"""The notifier's verbs: list and mark notifications read; set, show and remove the webhook;
list its deliveries and send them again.

Each is a plain ``async def verb(engine, request)``; bootstrap binds them to the bus.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.ext.asyncio import AsyncEngine

from shared.messages import ServiceError
from services.notifier import repository
from services.notifier.destinations import Destinations
from services.notifier.schemas import (DeliveryRef, ListDeliveries, ListNotifications, MarkRead, PutWebhook, TenantCmd,
                                       decode_cursor, decode_delivery_cursor, encode_cursor)


def _item(n: Mapping[str, Any]) -> dict:
    return {"id": n["id"], "at": n["at"].isoformat(), "kind": n["kind"], "run_id": n["run_id"],
            "file_index": n["file_index"], "message": n["message"], "read": n["read"]}


async def list_notifications(engine: AsyncEngine, cmd: ListNotifications) -> dict:
    """``{"items": [...], "next_cursor"}``, newest first; ``next_cursor`` is None on the last page."""
    after = decode_cursor(cmd.cursor) if cmd.cursor else None
    rows = await repository.page(engine, cmd.tenant_id, unread=cmd.unread, limit=cmd.limit + 1, after=after)
    more, rows = len(rows) > cmd.limit, rows[: cmd.limit]
    return {"items": [_item(r) for r in rows],
            "next_cursor": encode_cursor(rows[-1]["at"], rows[-1]["id"]) if more else None}


async def mark_read(engine: AsyncEngine, cmd: MarkRead) -> dict:
    row = await repository.mark_read(engine, cmd.tenant_id, cmd.id)
    if row is None:  # another tenant's id looks exactly like a missing one
        raise ServiceError("not_found", f"notification {cmd.id} was not found", {"id": cmd.id})
    return _item(row)


async def put_webhook(engine: AsyncEngine, cmd: PutWebhook, destinations: Destinations = Destinations()) -> dict:
    """Set (or replace) the tenant's webhook. The secret is stored, never sent back."""
    refusal = await destinations.resolved_refusal(cmd.url)
    if refusal is not None:
        raise ServiceError("validation_error", f"url {refusal}", {"fields": {"url": refusal}})
    row = await repository.put_webhook(engine, cmd.tenant_id, cmd.url, cmd.secret)
    return {"url": row["url"], "updated_at": row["updated_at"].isoformat()}


async def get_webhook(engine: AsyncEngine, cmd: TenantCmd) -> dict | None:
    row = await repository.get_webhook(engine, cmd.tenant_id)
    return {"url": row["url"], "updated_at": row["updated_at"].isoformat()} if row else None


async def delete_webhook(engine: AsyncEngine, cmd: TenantCmd) -> dict:
    return {"deleted": await repository.delete_webhook(engine, cmd.tenant_id)}


def origin_of(url: str) -> str:
    """Where a delivery went, for anyone who may list deliveries (members too): scheme, host
    and port. The rest of a webhook URL is often a secret (Slack's path, a token in the query,
    user:pass@), shown only to tenant admins (GET /webhook)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "(not a valid URL)"
    if not host:
        return "(a URL without a host)"
    netloc = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{netloc}" + (f":{port}" if port is not None else "")


def _delivery(d: Mapping[str, Any]) -> dict:
    def iso(value):
        return value.isoformat() if value is not None else None

    # The public id (a random UUID), never the bigserial: that one counts every tenant's deliveries.
    return {"id": str(d["public_id"]), "notification_id": d["notification_id"], "kind": d["kind"], "run_id": d["run_id"],
            "at": iso(d["at"]), "status": d["status"], "attempts": d["attempts"], "url": origin_of(d["url"]),
            "last_error": d["last_error"], "delivered_at": iso(d["delivered_at"]),
            "next_attempt_at": iso(d["next_attempt_at"]) if d["status"] == "pending" else None}


async def list_deliveries(engine: AsyncEngine, cmd: ListDeliveries) -> dict:
    """The webhook's deliveries, newest first: what was sent, what is still trying, what gave up and why."""
    rows = await repository.delivery_page(engine, cmd.tenant_id, status=cmd.status, limit=cmd.limit + 1,
                                          after=decode_delivery_cursor(cmd.cursor) if cmd.cursor else None)
    more, rows = len(rows) > cmd.limit, rows[: cmd.limit]
    return {"items": [_delivery(r) for r in rows],
            "next_cursor": encode_cursor(rows[-1]["created_at"], str(rows[-1]["public_id"])) if more else None}


async def redeliver(engine: AsyncEngine, cmd: DeliveryRef, on_queued=lambda: None) -> dict:
    """Send one delivered or failed delivery again (e.g. after mending the receiver)."""
    public_id = cmd.public_id()
    try:
        row = await repository.redeliver(engine, cmd.tenant_id, public_id) if public_id is not None else None
    except repository.RedeliveryRefused as exc:
        raise ServiceError("conflict", str(exc), {"delivery_id": cmd.delivery_id}) from None
    if row is None:  # another tenant's id (or one that is no id of ours) looks exactly like a missing one
        raise ServiceError("not_found", f"delivery {cmd.delivery_id} was not found", {"delivery_id": cmd.delivery_id})
    on_queued()
    return _delivery(row)


async def redeliver_failed(engine: AsyncEngine, cmd: TenantCmd, on_queued=lambda: None) -> dict:
    """Send every failed delivery again: the answer to a receiver that was down for a while."""
    try:
        queued = await repository.redeliver_failed(engine, cmd.tenant_id)
    except repository.RedeliveryRefused as exc:
        raise ServiceError("conflict", str(exc)) from None
    on_queued()
    return {"queued": queued}


VERBS = {
    "list": (ListNotifications, list_notifications),
    "mark_read": (MarkRead, mark_read),
    "put_webhook": (PutWebhook, put_webhook),
    "get_webhook": (TenantCmd, get_webhook),
    "delete_webhook": (TenantCmd, delete_webhook),
    "list_deliveries": (ListDeliveries, list_deliveries),
    "redeliver": (DeliveryRef, redeliver),
    "redeliver_failed": (TenantCmd, redeliver_failed),
}
