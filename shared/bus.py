"""NATS plumbing: connect, publish in bulk (streams and consumers: shared/streams.py;
pulling in batches: shared/pull_loop.py).

Services see this module, never raw JetStream calls: so that the few rules that keep
delivery correct (ids for dedupe, explicit ack, consumers updated when config changes)
live in one place.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from shared import tracing
from shared.jetstream import AckedPublisher
from shared.settings import Settings

log = structlog.get_logger(__name__)

async def connect(settings: Settings, name: str) -> NatsClient:
    """A client that reconnects forever: a NATS restart is an outage to wait out, not a crash."""
    if not settings.nats_url:
        raise RuntimeError("NATS_URL is not set and no embedded nats-server is running")

    async def on_error(exc: Exception) -> None:
        log.warning("nats.error", error=repr(exc))

    async def on_disconnect() -> None:
        log.warning("nats.disconnected")

    async def on_reconnect() -> None:
        log.info("nats.reconnected")

    return await nats.connect(
        settings.nats_servers,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        pending_size=64 * 1024 * 1024,
    )


@dataclass(frozen=True, slots=True)
class Outgoing:
    subject: str
    data: bytes
    msg_id: str
    headers: dict[str, str] | None = None


# Room kept for a message's headers (Nats-Msg-Id, tenant, run, traceparent: ~300 bytes) under the
# server's max payload, which counts headers and body together.
HEADERS_ROOM = 1024


def fits(item: Outgoing, max_payload: int) -> bool:
    """Whether the broker will take ``item``: a message over its max payload is refused
    every time it is sent, so it must be dealt with, not retried."""
    return len(item.data) + HEADERS_ROOM <= max_payload


def headers_for(msg_id: str, tenant_id: str | None = None, run_id: str | None = None,
                trace_id: str | None = None) -> dict[str, str]:
    """A message's headers (messaging.md): dedupe id, tenant, run, and the run's trace."""
    headers = {"Nats-Msg-Id": msg_id}
    if tenant_id:
        headers["Redrive-Tenant"] = tenant_id
    if run_id:
        headers["Redrive-Run"] = run_id
    if trace_id:
        headers[tracing.HEADER] = tracing.traceparent(trace_id)
    return headers


_publishers: "weakref.WeakKeyDictionary[NatsClient, AckedPublisher]" = weakref.WeakKeyDictionary()


def client_of(js: JetStreamContext) -> NatsClient:
    """The connection under a JetStream context (nats-py keeps it private; the lean
    primitives in shared/jetstream.py speak to it directly)."""
    return js._nc


def publisher_for(js: JetStreamContext) -> AckedPublisher:
    """One :class:`AckedPublisher` per connection, made on first use."""
    nc = client_of(js)
    publisher = _publishers.get(nc)
    if publisher is None:
        publisher = _publishers[nc] = AckedPublisher(nc)
    return publisher


async def publish_many(js: JetStreamContext, items: Sequence[Outgoing]) -> None:
    """Publish every item and wait until JetStream has acknowledged all of them.

    Publishes are pipelined (many PubAcks in flight) because one-at-a-time publishing caps
    throughput at a round trip per message. Raises if any publish was not acknowledged
    (refused, or no PubAck within the publisher's timeout), so the caller keeps its outbox
    rows and tries again (dedupe makes that safe).
    """
    if not items:
        return
    publisher = publisher_for(js)
    futures = []
    for item in items:
        headers = dict(item.headers) if item.headers else {}
        headers["Nats-Msg-Id"] = item.msg_id
        futures.append(await publisher.publish(item.subject, item.data, headers))
    if len(futures) == 1:  # the executor's hot path
        await futures[0]
        return
    for result in await asyncio.gather(*futures, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


async def publish_one(js: JetStreamContext, item: Outgoing, timeout: float = 5.0) -> None:
    headers = dict(item.headers) if item.headers else {}
    headers["Nats-Msg-Id"] = item.msg_id
    await js.publish(item.subject, item.data, headers=headers, timeout=timeout)


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def close(nc: NatsClient) -> None:
    """Flush what we published, then close. (``drain()`` waits out its full timeout on
    pull subscriptions, and by now every consumer loop has already stopped.)"""
    try:
        await asyncio.wait_for(nc.flush(), 5)
    except Exception:
        pass
    await nc.close()
