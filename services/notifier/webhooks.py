"""Webhook delivery: the ``deliveries`` outbox posted over HTTP, with its own retries.

Each pass claims due deliveries under a lease (a short transaction) and starts their posts,
with no database connection held; each post records its own outcome when it ends, only if
the delivery is still at the attempt that was made. A pass never waits for the posts of an
earlier one, so a receiver that hangs until the timeout holds back nobody else: a tenant
with ``PER_TENANT`` posts in flight is not claimed from until some end, and at most
``MAX_IN_FLIGHT`` posts are in flight at all. A tenant whose receiver did not answer its
last post (timed out, refused the connection) gets one post at a time until it answers
again: a few dead receivers with backlogs cannot take every slot, timeout after timeout.
A crash mid-post means the delivery is posted again after its lease: receivers dedupe on
``X-Redrive-Delivery`` (the delivery's public id, a random UUID: repository.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import aiohttp
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.backoff import backoff_delay_ms, parse_retry_after
from services.notifier import repository
from services.notifier.destinations import Destinations, NonPublicAddress
from services.notifier.signing import HEADER, sign

log = structlog.get_logger(__name__)

BATCH = 50
MAX_IN_FLIGHT = 4 * BATCH  # posts at once, all tenants together (and the connection pool's size)
PER_TENANT = BATCH  # a tenant with this many posts in flight waits for some to end before more are claimed


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
        self._posts: set[asyncio.Task] = set()
        self._by_tenant: Counter[str] = Counter()  # posts in flight
        self._unanswered: set[str] = set()  # tenants whose receiver did not answer the last post

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
        connector = aiohttp.TCPConnector(resolver=resolver, limit=MAX_IN_FLIGHT)
        try:
            async with aiohttp.ClientSession(timeout=timeout, headers={"User-Agent": "redrive-webhooks"},
                                             connector=connector) as session:
                while not self._stopping:
                    self._wake.clear()
                    try:
                        if await self.deliver_due(session) >= BATCH and len(self._posts) < MAX_IN_FLIGHT:
                            continue  # more may be due
                    except Exception as exc:  # database down: try again at the next poll
                        log.warning("webhooks.pass_failed", error=repr(exc)[:500])
                    try:
                        await asyncio.wait_for(self._wake.wait(), self._poll_s)
                    except asyncio.TimeoutError:
                        pass
                # Stopping: let the posts in flight end (stop's grace cancels them, and this, after).
                await asyncio.gather(*self._posts, return_exceptions=True)
        finally:
            if resolver is not None:  # ours, not the connector's, to close
                await resolver.close()

    async def deliver_due(self, session: aiohttp.ClientSession) -> int:
        """One pass: claim what is due (within the limits of posts in flight) and start
        posting it; returns how many deliveries were claimed."""
        room = MAX_IN_FLIGHT - len(self._posts)
        if room <= 0:
            return 0
        busy = [tenant for tenant, n in self._by_tenant.items()
                if n >= (1 if tenant in self._unanswered else PER_TENANT)]
        claimed = await repository.claim_due(self._engine, min(BATCH, room), self._lease_s, busy,
                                             one_each=sorted(self._unanswered))
        for d in claimed:
            self._by_tenant[d["tenant_id"]] += 1
            post = asyncio.create_task(self._deliver(session, d), name=f"webhook-{d['id']}")
            self._posts.add(post)
        return len(claimed)

    async def _deliver(self, session: aiohttp.ClientSession, d: Mapping[str, Any]) -> None:
        """Post one delivery and record its outcome; wake the loop when a retry is due."""
        try:
            ok, outcome = await self._post(session, d)
            if outcome.pop("answered"):
                self._unanswered.discard(d["tenant_id"])
            else:
                self._unanswered.add(d["tenant_id"])
            await repository.finish(self._engine, [outcome] if ok else [], [] if ok else [outcome])
            if not ok and outcome["status"] == "pending":
                asyncio.get_running_loop().call_later(max(outcome["delay_s"], 0.01), self._wake.set)
        except Exception as exc:  # database down: the lease brings the delivery back
            log.warning("webhooks.finish_failed", delivery=str(d["public_id"]), error=repr(exc)[:500])
        finally:
            self._posts.discard(asyncio.current_task())
            self._by_tenant[d["tenant_id"]] -= 1
            if self._by_tenant[d["tenant_id"]] <= 0:
                del self._by_tenant[d["tenant_id"]]
            self._wake.set()  # room for more

    async def _post(self, session: aiohttp.ClientSession, d: Mapping[str, Any]) -> tuple[bool, dict]:
        outcome: dict[str, Any] = {"id": d["id"], "attempts": d["attempts"], "url": d["url"], "answered": True}
        if d["url"] is None:
            return False, {**outcome, "status": "failed", "error": "the webhook was removed", "delay_s": 0.0}
        refusal = self._destinations.refusal(d["url"])
        if refusal is not None:  # set before the rule, or the operator changed it: never post
            return False, {**outcome, "status": "failed", "error": f"url {refusal}", "delay_s": 0.0}
        body = bytes(d["body"])
        # The public id (a random UUID, the same on every attempt and redelivery), never the
        # bigserial: its values would tell the receiver how many deliveries other tenants got.
        headers = {"Content-Type": "application/json", HEADER: sign(d["secret"], body, int(time.time())),
                   "X-Redrive-Delivery": str(d["public_id"])}
        retry_after_s = None
        try:
            # No redirects: a signed body goes only where the tenant said.
            async with session.post(d["url"], data=body, headers=headers, allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    return True, outcome
                error, retry_after_s = f"HTTP {resp.status}", parse_retry_after(resp.headers.get("Retry-After"))
        except Exception as exc:  # refused, timed out, DNS…: all worth another attempt
            error = _said(exc, self._timeout_s)
            outcome["answered"] = False
        final = d["attempts"] >= self._max_attempts
        delay_ms = 0 if final else backoff_delay_ms(d["attempts"], base_ms=self._base_ms, max_ms=self._max_ms,
                                                    retry_after_s=retry_after_s)
        log.info("webhooks.not_delivered", delivery=str(d["public_id"]), attempt=d["attempts"], error=error, final=final)
        return False, {**outcome, "status": "failed" if final else "pending", "error": error, "delay_s": delay_ms / 1000}


def _said(exc: Exception, timeout_s: float) -> str:
    """A failed post in words for the deliveries list: ``"ClientConnectorError: Cannot
    connect to host …"`` rather than a repr of the exception's constructor arguments."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer within {timeout_s:g} s"
    refused = getattr(exc, "os_error", None) or exc.__cause__
    if isinstance(refused, NonPublicAddress):  # aiohttp's own words for it say "[None]"
        return f"refused: {refused} (REDRIVE_WEBHOOK_ALLOW_PRIVATE)"[:300]
    text = str(exc) or "no detail"
    return f"{type(exc).__name__}: {text}"[:300]
