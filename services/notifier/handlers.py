"""Notifier verbs: list, mark read, webhook settings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text

from shared.db import transaction
from shared.messages import ServiceError


class _Cmd(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tenant_id: str


class ListCmd(_Cmd):
    unread_only: bool = False
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = None


class MarkRead(_Cmd):
    id: str


class PutWebhook(_Cmd):
    url: str = Field(pattern=r"^https?://", max_length=2000)
    secret: str = Field(min_length=16, max_length=200)


def _view(r) -> dict:
    return {"id": r["id"], "at": r["at"].isoformat(), "kind": r["kind"], "run_id": r["run_id"],
            "file_index": r["file_index"], "message": r["message"], "read": r["read"]}


async def list_notifications(engine, cmd: ListCmd) -> dict:
    sql, params = "SELECT * FROM notifier.notifications WHERE tenant_id = :t", {"t": cmd.tenant_id, "limit": cmd.limit + 1}
    if cmd.unread_only:
        sql += " AND NOT read"
    if cmd.cursor:
        at, _, nid = cmd.cursor.partition("|")
        if not nid:
            raise ServiceError("bad_request", "invalid cursor")
        sql += " AND (at, id) < (CAST(:at AS timestamptz), :nid)"
        params.update(at=at, nid=nid)
    async with engine.connect() as conn:
        rows = (await conn.execute(text(sql + " ORDER BY at DESC, id DESC LIMIT :limit"), params)).mappings().all()
    items = [_view(r) for r in rows[: cmd.limit]]
    more = len(rows) > cmd.limit
    return {"items": items, "next_cursor": f"{items[-1]['at']}|{items[-1]['id']}" if more else None}


async def mark_read(engine, cmd: MarkRead) -> dict:
    async with transaction(engine) as conn:
        row = (await conn.execute(text("UPDATE notifier.notifications SET read = true WHERE id = :id AND tenant_id = :t "
                                       "RETURNING *"), {"id": cmd.id, "t": cmd.tenant_id})).mappings().first()
    if row is None:
        raise ServiceError("not_found", f"notification {cmd.id} was not found")
    return _view(row)


async def put_webhook(engine, cmd: PutWebhook) -> dict:
    async with transaction(engine) as conn:
        row = (await conn.execute(text(
            "INSERT INTO notifier.webhooks (tenant_id, url, secret) VALUES (:t, :u, :s) ON CONFLICT (tenant_id) "
            "DO UPDATE SET url = EXCLUDED.url, secret = EXCLUDED.secret, updated_at = now() RETURNING url, updated_at"),
            {"t": cmd.tenant_id, "u": cmd.url, "s": cmd.secret})).mappings().one()
    return {"url": row["url"], "updated_at": row["updated_at"].isoformat()}


async def get_webhook(engine, cmd: _Cmd) -> dict | None:
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT url FROM notifier.webhooks WHERE tenant_id = :t"), {"t": cmd.tenant_id})).first()
    return {"url": row.url} if row else None
