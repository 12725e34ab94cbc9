"""The ``notifier`` consumer: events in, notifications (and webhook deliveries) out, in one
transaction per batch; commit, then ack. The message id is the dedupe key, so a
redelivered event never notifies twice."""

from __future__ import annotations

import uuid

import orjson
import structlog
from nats.aio.msg import Msg
from sqlalchemy import text

from shared.db import transaction
from shared.errors import TransientError
from shared.subjects import Names
from services.notifier import texts

log = structlog.get_logger(__name__)

_INSERT = text(
    "INSERT INTO notifier.notifications (id, tenant_id, kind, run_id, file_index, message, dedupe_key) "
    "VALUES (:id, :tenant_id, :kind, :run_id, :file_index, :message, :dedupe_key) "
    "ON CONFLICT (dedupe_key) DO NOTHING RETURNING id, tenant_id"
)
_DELIVER = text(
    "INSERT INTO notifier.deliveries (notification_id, tenant_id) "
    "SELECT :id, tenant_id FROM notifier.webhooks WHERE tenant_id = :tenant_id"
)


def notification_for(names: Names, msg: Msg) -> dict | None:
    """Decide from the subject first: most events (every succeeded file) need no parsing."""
    tail = msg.subject[len(names.prefix) + len(".events."):]
    if tail == "file.failed":
        event = orjson.loads(msg.data)
        kind, message = "file_failed", texts.file_failed_text(event)
    elif tail.startswith("run."):
        kind = tail[4:]
        if kind not in texts.RUN_TEXTS:
            return None
        event = orjson.loads(msg.data)
        message = texts.run_text(kind, event)
        kind = f"run_{kind}"
    else:
        return None
    dedupe = (msg.headers or {}).get("Nats-Msg-Id") or f"{msg.subject}:{msg.metadata.sequence.stream}"
    return {"id": uuid.uuid4().hex, "tenant_id": event["tenant_id"], "kind": kind, "run_id": event.get("run_id"),
            "file_index": event.get("file_index"), "message": message, "dedupe_key": dedupe}


def make_handler(engine, names: Names, on_deliveries):
    async def handle(msgs: list[Msg]) -> None:
        rows = []
        for msg in msgs:
            try:
                row = notification_for(names, msg)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("notifier.bad_event", subject=msg.subject, error=repr(exc))
                await msg.term()
                continue
            if row:
                rows.append(row)
        try:
            if rows:
                async with transaction(engine) as conn:
                    created = 0
                    for row in rows:
                        if (await conn.execute(_INSERT, row)).first() is not None:
                            created += (await conn.execute(_DELIVER, {"id": row["id"], "tenant_id": row["tenant_id"]})).rowcount
                if created:
                    on_deliveries()
        except TransientError as exc:
            log.warning("notifier.retry_batch", error=str(exc))
            for msg in msgs:
                await msg.nak(delay=1)
            return
        for msg in msgs:
            await msg.ack()

    return handle
