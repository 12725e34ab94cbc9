"""Webhook delivery: the ``deliveries`` outbox posted over HTTP, with its own retries.

Each pass claims due deliveries under a lease (a short transaction), posts them
concurrently with no database connection held, then records each outcome only if the
delivery is still at the attempt that was made. A crash mid-post means the delivery is
posted again after its lease: receivers dedupe on ``X-Redrive-Delivery``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.backoff import backoff_delay_ms
from services.notifier import repository
from services.notifier.destinations import Destinations
from services.notifier.signing import HEADER, sign

log = structlog.get_logger(__name__)

BATCH = 50


class WebhookSender:
    def __init__(self, engine: AsyncEngine, *, timeout_s: float, max_attempts: int, base_ms: int = 1000,
                 max_ms: int = 300_000, poll_s: float = 1.0, destinations: Destinations = Destinations()) -> None:
        self._engine = engine
        self._destinations = destinations
        self._timeout_s, self._max_attempts = timeout_s, max_attempts
        self._base_ms, self._max_ms, self._poll_s = base_ms, max_ms, poll_s
        self._lease_s = timeout_s + 30  # longer than any post can take
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None

    def kick(self) -> None:
        """New deliveries were committed: look now rather than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="notifier-webhooks")

    async def stop(self, grace_s: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:  # posts still in flight after the grace are cancelled: their lease brings them back
                await asyncio.wait_for(self._task, grace_s)
            except asyncio.TimeoutError:
                log.warning("webhooks.stop_cancelled_posts")

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        resolver = self._destinations.resolver()
        connector = aiohttp.TCPConnector(resolver=resolver)
        async with aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": "redrive-webhooks"},
                                         connector=connector) as session:
            while not self._stopping:
                self._wake.clear()
                wait_s = self._poll_s
                try:
                    claimed, soonest_retry_s = await self.deliver_due(session)
                    if claimed >= BATCH:
                        continue  # more may be due
                    wait_s = min(wait_s, soonest_retry_s)
                except Exception as exc:  # database down: try again at the next poll
                    log.warning("webhooks.pass_failed", error=repr(exc)[:500])
                try:
                    await asyncio.wait_for(self._wake.wait(), max(wait_s, 0.01))
                except asyncio.TimeoutError:
                    pass
        if resolver is not None:  # ours, not the connector's, to close
            await resolver.close()

    async def deliver_due(self, session: aiohttp.ClientSession) -> tuple[int, float]:
        """One pass: returns how many deliveries were attempted and the delay of the
        soonest retry it scheduled (infinity if none)."""
        claimed = await repository.claim_due(self._engine, BATCH, self._lease_s)
        if not claimed:
            return 0, float("inf")
        outcomes = await asyncio.gather(*(self._post(session, d) for d in claimed))
        delivered = [params for ok, params in outcomes if ok]
        not_delivered = [params for ok, params in outcomes if not ok]
        await repository.finish(self._engine, delivered, not_delivered)
        retries = [o["delay_s"] for o in not_delivered if o["status"] == "pending"]
        return len(claimed), min(retries, default=float("inf"))

    async def _post(self, session: aiohttp.ClientSession, d: Mapping[str, Any]) -> tuple[bool, dict]:
        outcome: dict[str, Any] = {"id": d["id"], "attempts": d["attempts"], "url": d["url"]}
        if d["url"] is None:
            return False, {**outcome, "status": "failed", "error": "the webhook was removed", "delay_s": 0.0}
        refusal = self._destinations.refusal(d["url"])
        if refusal is not None:  # set before the rule, or the operator changed it: never post
            return False, {**outcome, "status": "failed", "error": f"url {refusal}", "delay_s": 0.0}
        body = bytes(d["body"])
        headers = {"Content-Type": "application/json", HEADER: sign(d["secret"], body, int(time.time())),
                   "X-Redrive-Delivery": str(d["id"])}
        retry_after_s = None
        try:
            # No redirects: a signed body goes only where the tenant said.
            async with session.post(d["url"], data=body, headers=headers, allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    return True, outcome
                error, retry_after_s = f"HTTP {resp.status}", _retry_after(resp.headers.get("Retry-After"))
        except Exception as exc:  # refused, timed out, DNS…: all worth another attempt
            error = repr(exc)[:300]
        final = d["attempts"] >= self._max_attempts
        delay_ms = 0 if final else backoff_delay_ms(d["attempts"], base_ms=self._base_ms, max_ms=self._max_ms,
                                                    retry_after_s=retry_after_s)
        log.info("webhooks.not_delivered", delivery=d["id"], attempt=d["attempts"], error=error, final=final)
        return False, {**outcome, "status": "failed" if final else "pending", "error": error, "delay_s": delay_ms / 1000}


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
