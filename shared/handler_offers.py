"""Which step handlers the executors offer, so that a template naming none of them is
refused when it is made (422), not after its run was charged and every file ended ERROR.

Each executor puts its handler names into a KV bucket when it starts and again every
``REFRESH_S``; entries live ``TTL_S``, so a handler no deployed executor has offered for a
week is forgotten. The coordinator keeps a watched copy. While the bucket is empty (no
executor has ever started, e.g. templates made before the first deploy) nothing can be
judged and every handler is accepted.

Keys are the names hex-encoded (KV keys allow few characters; handler names allow any).

Each executor also puts its slots (``REDRIVE_EXECUTOR_CONCURRENCY``) and its handlers'
names under ``executors.<its id>`` when it starts and again every ``ALIVE_S``, and deletes
it when it stops. Work is admitted by the week's names (a pool of executors scaled to
zero, or being deployed, still has its work queued); an executor that fetched a job whose
handler it lacks asks where it is offered (:meth:`OfferedHandlers.where_offered`): by an
executor alive (the job goes back for it at once), within the week (it waits for one), or
nowhere (the file's ERROR). The executors' entries: the coordinator counts the slots of the executors heard from within ``LIVE_S``
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
from typing import Literal

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

    @property
    def key(self) -> str:
        """This executor's entry (``executors.<its id>``)."""
        return self._key

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
        await kv.put(self._key, orjson.dumps({"slots": self._slots, "handlers": self._handler_names}))

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


def _slots_and_handlers(value: bytes) -> tuple[int, frozenset[str] | None]:
    """An executor's entry: its slots (DEFAULT_SLOTS when it names none), and its handlers
    (None when it does not name them: an executor of an older release)."""
    try:
        data = orjson.loads(value)
        slots, handlers = data.get("slots"), data.get("handlers")
    except (orjson.JSONDecodeError, AttributeError):
        slots = handlers = None
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        slots = DEFAULT_SLOTS
    named = (frozenset(h for h in handlers if isinstance(h, str))
             if isinstance(handlers, list) else None)
    return min(slots, 1_000_000), named


class OfferedHandlers(BucketMirror):
    """The coordinator's side: a watched copy of what the executors offer, and of the slots
    of those alive (:meth:`slots`)."""

    label = "handlers"

    def __init__(self, js: JetStreamContext, names: Names, replicas: int = 1, *, clock=time.monotonic) -> None:
        super().__init__(js, names, replicas)
        self._offered: set[str] = set()
        self._clock = clock
        # key: (slots, when last heard of, its handlers or None)
        self._executors: dict[str, tuple[int, float, frozenset[str] | None]] = {}

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
            self._offered.add(name)
        else:  # deleted or expired
            self._offered.discard(name)

    def _apply_executor(self, entry) -> None:
        created = getattr(entry, "created", None)
        if isinstance(created, datetime.datetime):
            age = (datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()
            if age > _STALE_S:  # put before this process started, by an executor gone since
                self._executors.pop(entry.key, None)
                return
        if entry.value:
            slots, handlers = _slots_and_handlers(entry.value)
            self._executors[entry.key] = (slots, self._clock(), handlers)
        else:  # the executor stopped
            self._executors.pop(entry.key, None)

    def _alive(self) -> list[tuple[int, float, frozenset[str] | None]]:
        """The executors heard from within LIVE_S (the others are forgotten)."""
        cutoff = self._clock() - LIVE_S
        for key in [k for k, (_, seen, _) in self._executors.items() if seen < cutoff]:
            del self._executors[key]
        return list(self._executors.values())

    def slots(self) -> int | None:
        """The slots of the executors alive now (heard from within LIVE_S), together; None
        while none is known."""
        return sum(slots for slots, _, _ in self._alive()) or None

    def where_offered(self, handler: str, me: str) -> Literal["alive", "week"] | None:
        """Where ``handler``, which the executor ``me`` (its entry's key) lacks, is offered:
        by another executor alive ("alive": a rolling deploy adding it, a fleet of two
        kinds), by one within the week ("week": a pool scaled to zero, or deployed without
        it by mistake), or nowhere (None)."""
        self._alive()  # forgets the silent ones
        if any(handler in (named or ()) for key, (_, _, named) in self._executors.items() if key != me):
            return "alive"
        return "week" if handler in self._offered else None

    def unknown(self, handlers: Iterable[str]) -> dict[int, str]:
        """{position: why} for each of ``handlers`` no executor offered within the week (none
        while nothing is known)."""
        if not self._offered:
            return {}
        listed = ", ".join(sorted(self._offered)[:20])
        return {i: f"no executor offers the handler {h[:100]!r} (offered: {listed})"
                for i, h in enumerate(handlers) if h not in self._offered}

