"""JetStream key-value buckets: made idempotently (their replicas are
REDRIVE_STREAM_REPLICAS), and mirrored into a process as a local copy kept fresh by a
watcher (breakers, stopped runs, offered handlers), so a check on the hot path is a dict
lookup."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import APIError

from shared.streams import replicas_refused, wait_for_leader
from shared.subjects import Names

log = structlog.get_logger(__name__)


# JetStream's answer to a stream made again with another configuration.
_CONFIG_DIFFERS = 10058


async def ensure_kv(js: JetStreamContext, config: KeyValueConfig):
    """Create (or open) a key-value bucket; its replicas are REDRIVE_STREAM_REPLICAS. The
    bucket returned takes puts and watches at once. A bucket made before with another TTL
    (its entries' max age) takes this one: a new release may change it."""
    try:
        kv = await js.create_key_value(config)
    except APIError as exc:
        if (problem := replicas_refused(exc, config.replicas)) is not None:
            raise problem from None
        if exc.err_code != _CONFIG_DIFFERS or not await _retime(js, config):
            raise
        kv = await js.create_key_value(config)
    if (config.replicas or 1) > 1:
        # On a cluster, a bucket another service is making at the same moment (they share
        # buckets, and make them as they start) is answered as made before it has a leader:
        # a put then fails with "no response from stream".
        await wait_for_leader(js, f"KV_{config.bucket}")
    return kv


async def _retime(js: JetStreamContext, config: KeyValueConfig) -> bool:
    """Give an existing bucket ``config``'s TTL, as create_key_value would have made it;
    False when the TTL is not what differs."""
    stream = (await js.stream_info(f"KV_{config.bucket}")).config
    max_age = config.ttl or 0.0
    if stream.max_age == max_age:
        return False
    stream.max_age = max_age
    # create_key_value's rule: the window for duplicate puts is at most the TTL.
    stream.duplicate_window = min(config.ttl, 120.0) if config.ttl else 120.0
    await js.update_stream(stream)
    log.info("kv.ttl_changed", bucket=config.bucket, ttl_s=max_age)
    return True


async def mirror_kv(kv, apply: Callable, name: str) -> asyncio.Task:
    """Feed ``apply`` every entry the bucket holds now, then (in the returned task) every
    update: a local copy that is complete before the caller goes on (a stop or an offer
    written while this process was down counts from the start)."""
    watcher = await kv.watchall()
    while (entry := await watcher.updates(timeout=5)) is not None:
        apply(entry)
    return asyncio.create_task(follow_kv(watcher, apply, name), name=f"kv-{name}")


async def follow_kv(watcher, apply: Callable, name: str) -> None:
    """Feed every update of a KV watcher to ``apply`` until cancelled (local caches of
    shared state: breakers, stopped runs). Survives NATS outages by retrying."""
    while True:
        try:
            entry = await watcher.updates(timeout=5)
        except asyncio.TimeoutError:
            continue
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("kv.watch_failed", cache=name, error=repr(exc))
            await asyncio.sleep(1)
            continue
        if entry is not None:
            apply(entry)


class BucketMirror:
    """A local copy of one bucket, complete before ``start`` returns (an entry written while
    this process was down counts from the start), then followed until ``stop``. Subclasses
    say which bucket (``_bucket``) and what an entry means (``_apply``)."""

    label = "kv"  # names the watcher's task and its log lines

    def __init__(self, js: JetStreamContext, names: Names, replicas: int = 1) -> None:
        self._js, self._names, self._replicas = js, names, replicas
        self._task: asyncio.Task | None = None

    async def _bucket(self):
        raise NotImplementedError

    def _apply(self, entry) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._task = await mirror_kv(await self._bucket(), self._apply, self.label)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
