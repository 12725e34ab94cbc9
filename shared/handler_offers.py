"""Which step handlers the executors offer, so that a template naming none of them is
refused when it is made (422), not after its run was charged and every file ended ERROR.

Each executor puts its handler names into a KV bucket when it starts and again every
``REFRESH_S``; entries live ``TTL_S``, so a handler no deployed executor has offered for a
week is forgotten. The coordinator keeps a watched copy. While the bucket is empty (no
executor has ever started, e.g. templates made before the first deploy) nothing can be
judged and every handler is accepted.

Keys are the names hex-encoded (KV keys allow few characters; handler names allow any).

Each executor also puts its slots (``REDRIVE_EXECUTOR_CONCURRENCY``) under
``executors.<its id>`` when it starts and again every ``ALIVE_S``, and deletes it when it
stops; the coordinator counts the slots of the executors heard from within ``LIVE_S``
(a crashed executor stops counting then: the bucket's TTL is a week). The tenants' windows
follow them (services/coordinator/jobs.py: Window). An entry without ``slots`` counts as the
default concurrency; no live entry at all (executors of a release before this one, or none
started), the slots are unknown. Coordinators of that release take such a key for a
handler's name: harmless (one more name offered).
"""

from __future__ import annotations

import asyncio
import datetime
import time
import uuid
from collections.abc import Iterable

import orjson

import structlog
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError
from nats.js.api import KeyValueConfig, StorageType

from shared.kv import BucketMirror, ensure_kv
from shared.settings import Settings
from shared.subjects import Names

log = structlog.get_logger(__name__)

TTL_S = 7 * 24 * 3600
REFRESH_S = 12 * 3600
# An executor's slots: put every ALIVE_S, counted until LIVE_S after the last put was seen.
ALIVE_S = 10.0
LIVE_S = 3 * ALIVE_S
# An entry found already this old (by the server's clock) when the coordinator starts is
# an executor gone; the margin is for the clocks of the coordinator and the server.
_STALE_S = LIVE_S + 60.0
EXECUTOR_KEY_PREFIX = "executors."
# An executor's entry without ``slots``.
DEFAULT_SLOTS: int = Settings.model_fields["executor_concurrency"].default


async def ensure_bucket(js: JetStreamContext, names: Names, replicas: int = 1):
    return await ensure_kv(js, KeyValueConfig(bucket=names.handlers_bucket, history=1, ttl=TTL_S,
                                              storage=StorageType.FILE, replicas=replicas))


class HandlerOffer:
    """An executor's side: offer ``handler_names`` now and every REFRESH_S, and its ``slots``
    (None: not announced) now and every ALIVE_S until ``stop``."""

    def __init__(self, js: JetStreamContext, names: Names, handler_names: Iterable[str], replicas: int = 1,
                 *, slots: int | None = None) -> None:
        self._js, self._names, self._replicas = js, names, replicas
        self._handler_names = sorted(handler_names)
        self._slots = slots
        self._key = f"{EXECUTOR_KEY_PREFIX}{uuid.uuid4().hex}"
        self._kv = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._kv = kv = await ensure_bucket(self._js, self._names, self._replicas)
        # Put again and again: the handler entries live a week (TTL_S), the slots are counted
        # only LIVE_S after they were last put.
        await put_until_answered(self._put, kv)
        self._tasks.append(asyncio.create_task(self._again(self._put, kv, REFRESH_S), name="handler-offer"))
        if self._slots is not None:
            await put_until_answered(self._put_slots, kv)
            self._tasks.append(asyncio.create_task(self._again(self._put_slots, kv, ALIVE_S),
                                                   name="handler-offer-slots"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._slots is not None and self._kv is not None:
            try:  # gone now, not LIVE_S from now; failing that, it stops counting then
                await asyncio.wait_for(self._kv.delete(self._key), 2.0)
            except Exception as exc:
                log.warning("handler_offer.slots_not_withdrawn", error=repr(exc))

    async def _put(self, kv) -> None:
        for name in self._handler_names:
            await kv.put(name.encode().hex(), name.encode())

    async def _put_slots(self, kv) -> None:
        await kv.put(self._key, orjson.dumps({"slots": self._slots}))

    @staticmethod
    async def _again(put, kv, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await put(kv)
            except Exception as exc:  # NATS away: next time
                log.warning("handler_offer.put_failed", what=put.__name__, error=repr(exc))


async def put_until_answered(put, kv, *, attempts: int = 20, delay_s: float = 0.5) -> None:
    """``put(kv)`` at start, again while the bucket's stream cannot answer. On a cluster a
    bucket that has a leader can lose it for a moment (an election while the nodes are
    busy), and a put then gets "no response from stream": the executor must not die of
    that at start (seen under load, tests/chaos/test_nats_cluster.py). Anything else, or
    no answer for ``attempts`` tries, is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return await put(kv)
        except (NoStreamResponseError, nats.errors.TimeoutError) as exc:
            if attempt == attempts:
                raise
            log.warning("handler_offer.put_unanswered", what=getattr(put, "__name__", "put"), attempt=attempt,
                        error=repr(exc))
            await asyncio.sleep(delay_s)


def _slots_of(value: bytes) -> int:
    try:
        slots = orjson.loads(value).get("slots")
    except (orjson.JSONDecodeError, AttributeError):
        slots = None
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        return DEFAULT_SLOTS
    return min(slots, 1_000_000)


class OfferedHandlers(BucketMirror):
    """The coordinator's side: a watched copy of what the executors offer, and of the slots
    of those alive (:meth:`slots`)."""

    label = "handlers"

    def __init__(self, js: JetStreamContext, names: Names, replicas: int = 1, *, clock=time.monotonic) -> None:
        super().__init__(js, names, replicas)
        # name → when it was last offered (the server's time of the put): the bucket's TTL
        # removes a name no executor offers any more, but a watcher hears nothing of that,
        # so a long-lived process must age the names itself.
        self._offered: dict[str, float] = {}
        self._clock = clock
        self._executors: dict[str, tuple[int, float]] = {}  # key: (slots, when last heard of)

    async def _bucket(self):
        return await ensure_bucket(self._js, self._names, self._replicas)

    def _apply(self, entry) -> None:
        if entry.key.startswith(EXECUTOR_KEY_PREFIX):
            self._apply_executor(entry)
            return
        try:
            name = bytes.fromhex(entry.key).decode(errors="replace")
        except ValueError:  # not put by an executor of ours: taken as it is
            name = entry.key
        if entry.value:
            created = getattr(entry, "created", None)
            self._offered[name] = created.timestamp() if isinstance(created, datetime.datetime) else time.time()
        else:  # deleted or purged
            self._offered.pop(name, None)

    def _apply_executor(self, entry) -> None:
        created = getattr(entry, "created", None)
        if isinstance(created, datetime.datetime):
            age = (datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()
            if age > _STALE_S:  # put before this process started, by an executor gone since
                self._executors.pop(entry.key, None)
                return
        if entry.value:
            self._executors[entry.key] = (_slots_of(entry.value), self._clock())
        else:  # the executor stopped
            self._executors.pop(entry.key, None)

    def slots(self) -> int | None:
        """The slots of the executors alive now (heard from within LIVE_S), together; None
        while none is known."""
        cutoff = self._clock() - LIVE_S
        for key in [k for k, (_, seen) in self._executors.items() if seen < cutoff]:
            del self._executors[key]
        return sum(slots for slots, _ in self._executors.values()) or None

    def unknown(self, handlers: Iterable[str]) -> dict[int, str]:
        """{position: why} for each of ``handlers`` no executor offers (none while nothing is known)."""
        cutoff = time.time() - TTL_S
        for name in [n for n, at in self._offered.items() if at < cutoff]:
            del self._offered[name]
        if not self._offered:
            return {}
        offered = ", ".join(sorted(self._offered)[:20])
        return {i: f"no executor offers the handler {h[:100]!r} (offered: {offered})"
                for i, h in enumerate(handlers) if h not in self._offered}

