"""Which step handlers the executors offer, so that a template naming none of them is
refused when it is made (422), not after its run was charged and every file ended ERROR.

Each executor puts its handler names into a KV bucket when it starts and again every
``REFRESH_S``; entries live ``TTL_S``, so a handler no deployed executor has offered for a
week is forgotten. The coordinator keeps a watched copy. While the bucket is empty (no
executor has ever started, e.g. templates made before the first deploy) nothing can be
judged and every handler is accepted.

Keys are the names hex-encoded (KV keys allow few characters; handler names allow any).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType

from shared.kv import BucketMirror, ensure_kv
from shared.subjects import Names

log = structlog.get_logger(__name__)

TTL_S = 7 * 24 * 3600
REFRESH_S = 12 * 3600


async def ensure_bucket(js: JetStreamContext, names: Names, replicas: int = 1):
    return await ensure_kv(js, KeyValueConfig(bucket=names.handlers_bucket, history=1, ttl=TTL_S,
                                              storage=StorageType.FILE, replicas=replicas))


class HandlerOffer:
    """An executor's side: offer ``handler_names`` now and every REFRESH_S."""

    def __init__(self, js: JetStreamContext, names: Names, handler_names: Iterable[str], replicas: int = 1) -> None:
        self._js, self._names, self._replicas = js, names, replicas
        self._handler_names = sorted(handler_names)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        kv = await ensure_bucket(self._js, self._names, self._replicas)
        await self._put(kv)
        self._task = asyncio.create_task(self._refresh(kv), name="handler-offer")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _put(self, kv) -> None:
        for name in self._handler_names:
            await kv.put(name.encode().hex(), name.encode())

    async def _refresh(self, kv) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self._put(kv)
            except Exception as exc:  # NATS away: the entries live a week; next time
                log.warning("handler_offer.refresh_failed", error=repr(exc))


class OfferedHandlers(BucketMirror):
    """The coordinator's side: a watched copy of what the executors offer."""

    label = "handlers"

    def __init__(self, js: JetStreamContext, names: Names, replicas: int = 1) -> None:
        super().__init__(js, names, replicas)
        self._offered: set[str] = set()

    async def _bucket(self):
        return await ensure_bucket(self._js, self._names, self._replicas)

    def _apply(self, entry) -> None:
        try:
            name = bytes.fromhex(entry.key).decode(errors="replace")
        except ValueError:  # not put by an executor of ours: taken as it is
            name = entry.key
        if entry.value:
            self._offered.add(name)
        else:  # deleted or expired
            self._offered.discard(name)

    def unknown(self, handlers: Iterable[str]) -> dict[int, str]:
        """{position: why} for each of ``handlers`` no executor offers (none while nothing is known)."""
        if not self._offered:
            return {}
        offered = ", ".join(sorted(self._offered)[:20])
        return {i: f"no executor offers the handler {h[:100]!r} (offered: {offered})"
                for i, h in enumerate(handlers) if h not in self._offered}

