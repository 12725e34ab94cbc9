"""Live events for browsers (Server-Sent Events).

Core NATS subscriptions per process on ``<prefix>.events.>`` and on the notifier's new
notifications (``<prefix>.notifications``, sent as ``event: notification``), fanned out to connected
clients through bounded queues. Each event is parsed once, whatever the number of
clients, and goes to the clients of exactly one tenant: its body's ``tenant_id`` (the
coordinator trusts the body, so the body is the truth). An event whose body is not a JSON
object, has no usable ``tenant_id`` (missing, null, not a non-empty string), or whose
``Redrive-Tenant`` header names another tenant than its body is dropped with a warning
(subject and tenants only, never the body), never sent to anyone. A slow client loses
events rather than slowing anyone else: it can re-read the state from the API. A client
that takes nothing for ``write_timeout_s`` (it stopped reading but keeps the connection
open) is disconnected, so it holds no handler, queue or subscription forever.

While the gateway's NATS connection is down no event can arrive: each stream says so
(``event: bus``, ``{"connected": false}``) and says ``{"connected": true}`` when it is back,
so that a client stops showing "live" and then re-reads what changed from the API.

The subscription exists only while someone listens, so an idle gateway does not receive
the (high-volume) file events at all.

Streams are capped per API key and per tenant (``REDRIVE_SSE_MAX_PER_KEY``,
``REDRIVE_SSE_MAX_PER_TENANT``): each one holds a connection, a queue and a share of every
fan-out on the gateway's loop, so one key opening thousands would slow every tenant's API.
One more is refused with a 429 before anything is held; a slot is free again as soon as
its stream ends.

A stream ends as soon as its API key is refused, and sends nothing more: before each frame
it checks the key again if any key changed meanwhile (a revocation heard by
key_revocations.py), and every ``recheck_key_s`` whatever it heard, for a revocation made
while nothing listened. Its client then reconnects and is refused (401).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

import orjson
import structlog
from aiohttp import web
from nats.aio.client import Client as NatsClient

from shared.round_trip import RoundTrip
from shared.messages import ServiceError
from shared.subjects import Names

log = structlog.get_logger(__name__)

KEEPALIVE_S = 15.0
# How often an open stream's key is checked again though no change was heard: a revocation
# committed while the gateway was not listening is heard by no one.
RECHECK_KEY_S = KEEPALIVE_S
# How soon a stream whose client went away notices (and frees its slot): aiohttp does not
# cancel the handler when a GET's connection drops, and nothing is written for up to KEEPALIVE_S.
LIVENESS_S = 1.0
WRITE_TIMEOUT_S = 60.0
QUEUE_SIZE = 1000
# And at most so many bytes queued for one: a file event carries its step's output (up to a
# message, ~1 MB), and a thousand of those held for a stream that reads slowly (one that
# stops reading is cut after write_timeout_s) would be a gigabyte. The streams of a tenant
# share each frame (one bytes object), so this bounds the gateway's memory too, however
# many streams lag. A client reading at loopback speed lags ~16 MB behind a burst.
QUEUE_BYTES = 64 * 1024 * 1024
MAX_PER_KEY = 10
MAX_PER_TENANT = 100
TENANT_HEADER = "Redrive-Tenant"
_CLOSE = b""  # sentinel: the hub is stopping
BUS_DOWN = b'event: bus\ndata: {"connected":false}\n\n'
BUS_UP = b'event: bus\ndata: {"connected":true}\n\n'


class _Frames(asyncio.Queue):
    """A stream's queue of frames, bounded in bytes as well as in frames (QueueFull past
    either; the close sentinel always fits)."""

    def __init__(self, maxsize: int, max_bytes: int) -> None:
        super().__init__(maxsize)
        self._max_bytes = max_bytes
        self.queued_bytes = 0

    def put_nowait(self, frame: bytes) -> None:
        if frame and self.queued_bytes + len(frame) > self._max_bytes:
            raise asyncio.QueueFull
        super().put_nowait(frame)

    def _put(self, frame: bytes) -> None:
        self.queued_bytes += len(frame)
        super()._put(frame)

    def _get(self) -> bytes:
        frame = super()._get()
        self.queued_bytes -= len(frame)
        return frame


class KeyCheck(Protocol):
    """The API key a stream was opened with, checked again while the stream is open."""

    def changed(self) -> bool:
        """Whether any key may have changed since the last check (asked before every frame:
        no await, no I/O)."""

    async def still_valid(self) -> bool:
        """Whether the key still stands for what the stream was opened with."""


class EventHub:
    def __init__(self, nc: NatsClient, names: Names, *, keepalive_s: float = KEEPALIVE_S,
                 queue_size: int = QUEUE_SIZE, queue_bytes: int = QUEUE_BYTES, write_timeout_s: float = WRITE_TIMEOUT_S,
                 max_per_key: int = MAX_PER_KEY, max_per_tenant: int = MAX_PER_TENANT,
                 liveness_s: float = LIVENESS_S, recheck_key_s: float = RECHECK_KEY_S) -> None:
        self._nc = nc
        self._names = names
        self._round_trip = RoundTrip(nc)  # the SUB reached the server (see _subscribe)
        self._events_prefix = f"{names.prefix}.events."
        self._notifications = names.notifications_live
        self._keepalive_s = keepalive_s
        self._liveness_s = min(liveness_s, keepalive_s)
        self._write_timeout_s = write_timeout_s
        self.recheck_key_s = recheck_key_s
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._by_tenant: dict[str, set[asyncio.Queue]] = {}
        self._max_per_key = max_per_key
        self._max_per_tenant = max_per_tenant
        self._key_of: dict[asyncio.Queue, str] = {}  # the API key each stream was opened with
        self._by_key: dict[str, int] = {}
        self._clients = 0
        self._subs: list = []
        self._subscribing = asyncio.Lock()
        self._stopping = False
        self.dropped = 0

    @property
    def clients(self) -> int:
        return self._clients

    async def start(self) -> None:
        self._stopping = False

    async def stop(self) -> None:
        self._stopping = True
        await self._unsubscribe()
        for queues in self._by_tenant.values():
            for queue in queues:
                _drain(queue)
                queue.put_nowait(_CLOSE)

    # ---- clients and fan-out -------------------------------------------------------------

    def streams_of(self, *, tenant_id: str | None = None, key_id: str | None = None) -> int:
        """Streams open for this tenant, or with this API key."""
        if key_id is not None:
            return self._by_key.get(key_id, 0)
        return len(self._by_tenant.get(tenant_id, ())) if tenant_id is not None else self._clients

    def admit(self, tenant_id: str, key_id: str | None = None) -> asyncio.Queue[bytes]:
        """:meth:`register` within the caps: ServiceError ``too_many_requests`` (429) past one.
        Checked and counted with no await in between, so concurrent requests cannot overshoot."""
        if key_id is not None and self.streams_of(key_id=key_id) >= self._max_per_key:
            raise ServiceError(
                "too_many_requests",
                f"this API key already has {self._max_per_key} live event streams open, the most allowed "
                "(REDRIVE_SSE_MAX_PER_KEY); close one before opening another",
                {"limit": self._max_per_key, "per": "key"})
        if self.streams_of(tenant_id=tenant_id) >= self._max_per_tenant:
            raise ServiceError(
                "too_many_requests",
                f"this tenant already has {self._max_per_tenant} live event streams open, the most allowed "
                "(REDRIVE_SSE_MAX_PER_TENANT); close one before opening another",
                {"limit": self._max_per_tenant, "per": "tenant"})
        return self.register(tenant_id, key_id)

    def register(self, tenant_id: str, key_id: str | None = None) -> asyncio.Queue[bytes]:
        queue: asyncio.Queue[bytes] = _Frames(self._queue_size, self._queue_bytes)
        self._by_tenant.setdefault(tenant_id, set()).add(queue)
        if key_id is not None:
            self._key_of[queue] = key_id
            self._by_key[key_id] = self._by_key.get(key_id, 0) + 1
        self._clients += 1
        return queue

    def unregister(self, tenant_id: str, queue: asyncio.Queue[bytes]) -> None:
        queues = self._by_tenant.get(tenant_id)
        if queues is not None and queue in queues:
            queues.discard(queue)
            self._clients -= 1
            if not queues:
                del self._by_tenant[tenant_id]
            key_id = self._key_of.pop(queue, None)
            if key_id is not None:
                left = self._by_key[key_id] - 1
                if left:
                    self._by_key[key_id] = left
                else:
                    del self._by_key[key_id]

    def dispatch(self, subject: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        """Queue one event for its tenant's clients (called once per event)."""
        if not self._by_tenant:
            return
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.warning("events.dropped", reason="not_json", subject=_cut(subject))
            return
        if not isinstance(body, dict):
            log.warning("events.dropped", reason="not_an_object", subject=_cut(subject))
            return
        tenant = body.get("tenant_id")
        if not isinstance(tenant, str) or not tenant:
            log.warning("events.dropped", reason="no_tenant", subject=_cut(subject))
            return
        header = headers.get(TENANT_HEADER) if headers else None
        if header is not None and header != tenant:
            log.warning("events.dropped", reason="tenant_mismatch", subject=_cut(subject),
                        tenant=_cut(tenant), header_tenant=_cut(str(header)))
            return
        targets = self._by_tenant.get(tenant)
        if not targets:
            return
        if b"\n" in data or b"\r" in data:  # an SSE data field is one line: re-encode compactly
            data = orjson.dumps(body)
        if subject == self._notifications:
            kind = "notification"
        else:
            kind = subject[len(self._events_prefix):] if subject.startswith(self._events_prefix) else subject
        frame = b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"
        for queue in targets:
            try:
                queue.put_nowait(frame)
            except asyncio.QueueFull:
                self.dropped += 1

    async def _on_msg(self, msg) -> None:
        self.dispatch(msg.subject, msg.data, msg.headers)

    # ---- the subscription, held while someone listens ----------------------------------------

    async def _subscribe(self) -> None:
        async with self._subscribing:
            if self._subs or self._stopping:
                return
            self._subs = [await self._nc.subscribe(subject, cb=self._on_msg)
                          for subject in (self._names.events_all, self._notifications)]
            # The SUB reaches the server before we tell the client it is connected: a round
            # trip after it (not flush(timeout): shared/round_trip.py says why).
            if not await self._round_trip.answers(2.0):
                log.warning("events.subscribe_unconfirmed")

    async def _unsubscribe(self, only_if_idle: bool = False) -> None:
        async with self._subscribing:
            if not self._subs or (only_if_idle and self._clients):
                return
            subs, self._subs = self._subs, []
            for sub in subs:
                try:
                    await sub.unsubscribe()
                except Exception as exc:  # connection closing: the subscription goes with it
                    log.debug("events.unsubscribe_failed", error=repr(exc))

    # ---- one client ------------------------------------------------------------------------

    def _reconnects(self) -> int:
        return self._nc.stats["reconnects"]

    async def stream(self, request: web.Request, tenant_id: str, key_id: str | None = None,
                     key_check: KeyCheck | None = None) -> web.StreamResponse:
        """Stream the tenant's events to this request until the client leaves, ``key_check``
        refuses its key, or we stop (a 429, ServiceError, when the key or the tenant has all
        the streams it may)."""
        queue = self.admit(tenant_id, key_id)  # before any await: the slot is taken at once
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        try:
            await response.prepare(request)
            await self._subscribe()
            await response.write(b": connected\n\n")
            bus_up = True
            reconnects = self._reconnects()
            loop = asyncio.get_running_loop()
            keepalive_at = loop.time() + self._keepalive_s
            recheck_key_at = loop.time() + self.recheck_key_s
            while not self._stopping:
                try:
                    frame = await asyncio.wait_for(queue.get(), self._liveness_s)
                except asyncio.TimeoutError:
                    if _gone(request):
                        break  # the client left: its slot is free again
                    frame = None
                if frame == _CLOSE:
                    break
                # Before the frame is written: once the gateway has heard the key is revoked,
                # nothing more goes out with it. An idle stream looks every liveness_s.
                if key_check is not None and (key_check.changed() or loop.time() >= recheck_key_at):
                    if not await _key_still_valid(key_check, tenant_id):
                        break
                    recheck_key_at = loop.time() + self.recheck_key_s
                if frame is None:
                    if self._nc.is_connected != bus_up:
                        # Events stop while NATS is away: say so, and say when they flow again
                        # (the client then re-reads what changed meanwhile from the API).
                        bus_up = not bus_up
                        frame = BUS_UP if bus_up else BUS_DOWN
                        reconnects = self._reconnects()
                    elif bus_up and self._reconnects() != reconnects:
                        frame = b": bus gap\n\n"  # a gap between two looks: told below
                    elif loop.time() < keepalive_at:
                        continue
                    else:
                        frame = b": keepalive\n\n"
                if bus_up and self._reconnects() != reconnects:
                    # NATS went and came back between two looks (a restart takes well under a
                    # second): the events of that gap never came, so say it as any outage.
                    reconnects = self._reconnects()
                    frame = BUS_DOWN + BUS_UP + frame
                await asyncio.wait_for(response.write(frame), self._write_timeout_s)
                keepalive_at = loop.time() + self._keepalive_s
        except ConnectionResetError:
            pass  # the client went away
        except asyncio.TimeoutError:  # the client stopped reading: let it go, and what is buffered for it
            log.info("events.client_stalled", tenant=tenant_id)
            if request.transport is not None:
                request.transport.abort()
        finally:
            self.unregister(tenant_id, queue)
            await self._unsubscribe(only_if_idle=True)
        return response


async def _key_still_valid(key_check: KeyCheck, tenant_id: str) -> bool:
    try:
        if await key_check.still_valid():
            return True
        log.info("events.key_refused", tenant=tenant_id)
    except Exception as exc:
        # As a request whose key cannot be checked is refused: the stream ends, and its
        # client's next one is checked afresh (or refused while the database is away).
        log.warning("events.key_unchecked", tenant=tenant_id, error=repr(exc))
    return False


def _cut(text: str, limit: int = 100) -> str:
    """A value from the wire, short enough for a log line."""
    return text[:limit]


def _gone(request: web.Request) -> bool:
    """The client's connection is closed or closing."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _drain(queue: asyncio.Queue) -> None:
    while not queue.empty():
        queue.get_nowait()
