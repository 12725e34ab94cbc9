"""Webhook delivery: an outbox of HTTP posts with its own retries and backoff."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import structlog
from sqlalchemy import text

from shared.backoff import backoff_delay_ms
from shared.db import transaction
from services.notifier.signing import sign

log = structlog.get_logger(__name__)

_DUE = text(
    "SELECT d.id, d.attempts, n.id AS nid, n.tenant_id, n.at, n.kind, n.run_id, n.file_index, n.message, w.url, w.secret "
    "FROM notifier.deliveries d JOIN notifier.notifications n ON n.id = d.notification_id "
    "JOIN notifier.webhooks w ON w.tenant_id = d.tenant_id "
    "WHERE d.status = 'pending' AND d.next_attempt_at <= now() ORDER BY d.id LIMIT 50 FOR UPDATE OF d SKIP LOCKED"
)


class WebhookSender:
    def __init__(self, engine, *, timeout_s: float, max_attempts: int, base_ms: int = 1000) -> None:
        self._engine, self._timeout, self._max, self._base = engine, timeout_s, max_attempts, base_ms
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None

    def kick(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task:
            await self._task

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout)) as session:
            while not self._stopping:
                try:
                    await self.deliver_due(session)
                except Exception as exc:
                    log.warning("webhooks.pass_failed", error=repr(exc))
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

    async def deliver_due(self, session: aiohttp.ClientSession) -> int:
        async with transaction(self._engine) as conn:
            rows = (await conn.execute(_DUE)).mappings().all()
            for row in rows:
                body = orjson.dumps({"id": row["nid"], "tenant_id": row["tenant_id"], "at": row["at"].isoformat(),
                                     "kind": row["kind"], "run_id": row["run_id"], "file_index": row["file_index"],
                                     "message": row["message"]})
                headers = {"Content-Type": "application/json", "X-Redrive-Signature": sign(row["secret"], body),
                           "X-Redrive-Delivery": str(row["id"])}
                try:
                    async with session.post(row["url"], data=body, headers=headers) as resp:
                        ok, error = 200 <= resp.status < 300, f"HTTP {resp.status}"
                except Exception as exc:
                    ok, error = False, repr(exc)[:300]
                attempts = row["attempts"] + 1
                if ok:
                    await conn.execute(text("UPDATE notifier.deliveries SET status = 'delivered', attempts = :a WHERE id = :id"),
                                       {"a": attempts, "id": row["id"]})
                else:
                    delay = backoff_delay_ms(attempts, base_ms=self._base, max_ms=300_000)
                    await conn.execute(text(
                        "UPDATE notifier.deliveries SET attempts = :a, last_error = :e, "
                        " status = CASE WHEN :a >= :max THEN 'failed' ELSE 'pending' END, "
                        " next_attempt_at = now() + make_interval(secs => :d) WHERE id = :id"),
                        {"a": attempts, "e": error, "max": self._max, "d": delay / 1000, "id": row["id"]})
        return len(rows)
