"""NATS plumbing: connect, declare streams and consumers, publish in bulk (pulling in
batches: shared/pull_loop.py).

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
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from shared import tracing
from shared.jetstream import AckedPublisher
from shared.settings import ConfigurationError, Settings
from shared.subjects import Names

log = structlog.get_logger(__name__)

EVENTS_MAX_AGE_S = 7 * 24 * 3600


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


# JSStreamReplicasNotSupportedErr: more than one replica asked of a server that is not clustered.
_REPLICAS_NOT_SUPPORTED = 10074


def replicas_refused(exc: APIError, replicas: int | None) -> ConfigurationError | None:
    """The server's "replicas > 1 not supported in non-clustered mode", told as the setting
    that asked for them (REDRIVE_STREAM_REPLICAS), not as a NATS connection problem."""
    if exc.err_code != _REPLICAS_NOT_SUPPORTED:
        return None
    return ConfigurationError(f"REDRIVE_STREAM_REPLICAS={replicas} needs a NATS cluster; this server is not "
                              "clustered (use 1)")


# On a NATS cluster, while a replicated stream is being made (every service declares the
# streams as it starts), requests about it from other clients (info, update, a second
# create) may get no answer at all: it has no leader yet. Asked again, it is there.
_STREAM_ATTEMPTS = 3


async def _add_or_update_stream(js: JetStreamContext, config: StreamConfig) -> None:
    for attempt in range(1, _STREAM_ATTEMPTS + 1):
        try:
            try:
                info = await js.stream_info(config.name)
            except NotFoundError:
                await js.add_stream(config)
                return
            if info.cluster is not None and not info.cluster.leader:  # being made right now
                await wait_for_leader(js, config.name)
            await js.update_stream(config)
            return
        except nats.errors.TimeoutError:
            if attempt == _STREAM_ATTEMPTS:
                raise
            log.warning("nats.stream_declare_timeout", stream=config.name, attempt=attempt)
        except APIError as exc:
            if (problem := replicas_refused(exc, config.num_replicas)) is not None:
                raise problem from None
            raise


async def wait_for_leader(js: JetStreamContext, stream: str, timeout: float = 15.0) -> None:
    """Until a replicated stream has a leader (at once on a single server). Without one it
    stores nothing (a publish gets "no response from stream") and ignores updates; its info
    says so (no leader) or does not come at all, so it is asked with a short timeout."""
    jsm = client_of(js).jsm(prefix=getattr(js, "_prefix", "$JS.API"), timeout=0.5)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            info = await jsm.stream_info(stream)
            if info.cluster is None or info.cluster.leader:
                return
        except (nats.errors.TimeoutError, ServiceUnavailableError):
            pass
        if loop.time() > deadline:
            raise nats.errors.TimeoutError(f"the stream {stream} has no leader after {timeout:g} s")
        await asyncio.sleep(0.05)


# A poison job's advisory is kept this long for a coordinator to come and fail the job.
ADVISORIES_MAX_AGE_S = 7 * 24 * 3600


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """Create or update both streams of the contract, and the one that keeps the jobs
    consumer's max-deliveries advisories; safe to call from every process."""
    names = Names(settings.prefix)
    # A max age below the run-stops bucket's TTL (services/executor/run_stops.py): a job
    # no executor was handed for that long is dropped, never outliving the stop that
    # covers it; a RUNNING run's dropped jobs are re-published by the recovery sweep.
    # Applied to a stream made without one, too (an update: NATS lets MaxAge change).
    # JetStream refuses a dedupe window longer than the max age; a job past its max age
    # is gone anyway, so the window is cut to it (only a max age set below the window,
    # in tests, is affected).
    jobs_max_age_s = float(settings.jobs_max_age_s)
    await _add_or_update_stream(
        js,
        StreamConfig(
            name=names.jobs_stream,
            subjects=[names.jobs_all],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_age=jobs_max_age_s,
            num_replicas=settings.stream_replicas,
            duplicate_window=min(float(settings.duplicate_window_s), jobs_max_age_s),
            description="redrive jobs: one message per file (or per batch) per round",
        ),
    )
    await _add_or_update_stream(
        js,
        StreamConfig(
            name=names.events_stream,
            subjects=[names.events_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=float(EVENTS_MAX_AGE_S),
            num_replicas=settings.stream_replicas,
            duplicate_window=float(settings.duplicate_window_s),
            description="redrive file, run and breaker events",
        ),
    )
    # Every process declares it, not just the coordinator that reads it: an advisory sent
    # while no coordinator runs must find it there (an executor dies on a poison job while
    # the coordinator restarts). A work queue: what the coordinator acks is gone.
    await _add_or_update_stream(
        js,
        StreamConfig(
            name=names.advisories_stream,
            subjects=[names.max_deliveries_advisory],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            max_age=float(ADVISORIES_MAX_AGE_S),
            num_replicas=settings.stream_replicas,
            description="redrive poison jobs: max-deliveries advisories of the jobs consumer, until handled",
        ),
    )


async def ensure_consumer(
    js: JetStreamContext,
    stream: str,
    durable: str,
    filter_subject: str | Sequence[str],
    *,
    ack_wait_s: float = 30.0,
    max_deliver: int = -1,
    max_ack_pending: int = 20_000,
    wide_filter: str | None = None,
    backoff_s: Sequence[float] = (),
) -> None:
    """Create the durable pull consumer, or update it in place: the JetStream create call
    updates an existing durable's mutable fields (checked on NATS 2.9 and 2.15; see
    tests/integration/test_bus.py), so a changed max_deliver or ack wait applies.

    ``filter_subject`` may be several subjects, which needs NATS 2.10 or newer; on an
    older server the consumer takes ``wide_filter`` instead (a subject covering them
    all), and the consumer's handler must ignore what it did not ask for.

    ``backoff_s`` (JetStream BackOff) replaces the ack wait for the Nth delivery; the
    server then takes its first value as the ack wait, so it is given as that."""
    filters = [filter_subject] if isinstance(filter_subject, str) else list(filter_subject)
    if len(filters) > 1 and not supports_filter_subjects(client_of(js)):
        if wide_filter is None:
            raise ValueError("several filter subjects need NATS 2.10 or newer, and no wide_filter was given")
        filters = [wide_filter]
    config = ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=backoff_s[0] if backoff_s else ack_wait_s,
        backoff=list(backoff_s) or None,
        max_deliver=max_deliver,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
        max_ack_pending=max_ack_pending,
        max_waiting=512,
    )
    await js.add_consumer(stream, config)


def supports_filter_subjects(nc: NatsClient) -> bool:
    """Consumers with several filter subjects came with NATS 2.10."""
    version = nc.connected_server_version
    return (version.major, version.minor) >= (2, 10)


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
