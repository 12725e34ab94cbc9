"""The streams and consumers of messaging.md, declared idempotently at every start: added
when missing, updated when their config changed, with what a server that is not clustered
(or older) cannot do said as a configuration error rather than a crash.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

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

from shared.bus import client_of
from shared.settings import ConfigurationError, Settings
from shared.subjects import Names

log = structlog.get_logger(__name__)

EVENTS_MAX_AGE_S = 7 * 24 * 3600


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
