"""How many large request bodies one gateway process reads and holds at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from shared.messages import ServiceError

# How long a large body waits for a slot (LargeBodies) before it is a 503: a burst (a client
# sending a few large runs at once) goes through one after another, while a gateway that
# stays full answers soon enough for the client to back off.
LARGE_BODY_WAIT_S = 5.0


class LargeBodies:
    """At most ``limit`` large request bodies read and held at once by this gateway process
    (REDRIVE_MAX_CONCURRENT_LARGE_BODIES). aiohttp reads a body whole, and the request holds
    a few times its size (the bytes, the parsed JSON, the message sent on) until answered,
    so the slot is held that long. Large: more than one bus message (a run sent ahead in
    parts, up to REDRIVE_MAX_REQUEST_BYTES); smaller ones cost what any request costs. A body
    whose size is not known before it is read (chunked, or Content-Encoding: gzip, which
    inflates up to that limit) counts as large.

    One more waits up to ``wait_s`` for a slot, its body unread (TCP holds the client back),
    then is a 503 with Retry-After: the gateway as a whole is busy, not this caller over a
    quota of its own (that would be a 429)."""

    def __init__(self, limit: int = 4, wait_s: float = LARGE_BODY_WAIT_S) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self.in_use = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(limit)

    @staticmethod
    def is_large(request: web.Request, threshold: int) -> bool:
        if not request.body_exists:
            return False
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        return encoding not in ("", "identity") or request.content_length is None or request.content_length > threshold

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait_s):
                await self._slots.acquire()
        except TimeoutError:
            raise ServiceError("service_unavailable", f"this gateway is reading as many large request bodies as it "
                               f"reads at once ({self.limit}, REDRIVE_MAX_CONCURRENT_LARGE_BODIES); send it again "
                               "shortly", {"limit": self.limit}) from None
        finally:
            self.waiting -= 1
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
            self._slots.release()
