"""Breaker state shared by every executor process, in a JetStream KV bucket: one breaker
per tenant and dependency. Per tenant because its settings are (threshold, reset time),
and because a dependency's limits often are too (an API key rate-limited with 429s is
that tenant's, not everyone's): one tenant's failures never hold back another's jobs.

Reads are served from a local copy kept fresh by a KV watcher, so the check on the hot
path is a dict lookup (the seed asks < 5 ms; we measure it in bench/). Writes happen only
on state changes and failures, with compare-and-set on the entry's revision so two
executors counting failures at once do not lose one.

What one tenant can make here is bounded (download makes a breaker per URL host):

- A breaker nobody writes for ``idle_ttl_s`` is forgotten (the bucket's max age): a closed
  one, or one counting failures that stopped coming, behaves as a new one would. An open or
  half-open one is never lost while it matters: it is written when it opens and when each
  probe is claimed, and :meth:`BreakerBoard._keep` rewrites it before it can expire until
  :data:`PROBE_GRACE_S` past its probe time (by then the jobs it deferred have come back
  and claimed the probe, which writes it again). The watcher hears nothing of an expiry,
  so the local copy forgets by the same clock.
- A tenant has at most ``max_per_tenant`` breakers that count (open, or with failures):
  past that, a further dependency's failures are not counted (logged), rather than let one
  tenant fill the bucket and every executor's memory.
- The ``breakers`` verb lists at most ``max_listed`` of them (and ``max_reply_bytes``),
  the most relevant first, each saying how many were ``not_listed``.
- A key is bounded in length (a dependency name is the tenant's to choose: a key past
  NATS's 4 KB control line closes the executor's connection).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from datetime import datetime, timezone

import orjson
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, KeyValueError
from nats.js.kv import KV_DEL, KV_PURGE

from shared import breaker
from shared.breaker import PROBE_LEASE_S, Admission, BreakerState
from shared.bus import Outgoing, publish_many
from shared.kv import ensure_kv, mirror_kv
from shared.messages import BreakerEvent
from shared.subjects import Names

log = structlog.get_logger(__name__)

_KEY_SAFE = re.compile(r"[^-/_=.a-zA-Z0-9]")
_KEY_PART_CHARS = 128  # longer parts end in a digest of the whole name
_SHOWN_CHARS = 512  # of a dependency's name, as stored and listed

# Proposed settings (REDRIVE_EXECUTOR_BREAKER_IDLE_TTL_S, REDRIVE_EXECUTOR_BREAKERS_PER_TENANT).
IDLE_TTL_S = 2 * 3600.0
MAX_PER_TENANT = 1000
MAX_LISTED = 500
MAX_REPLY_BYTES = 256 * 1024  # of NATS's 1 MB max payload
# How long past its probe time an open breaker is kept alive by the keeper: a job it deferred
# comes back at most half a reset period after the probe time (steps.py's jitter; a reset
# period is at most 3600 s, RetrySettings.breaker_reset_s) and claims the probe; a claimed
# probe is waited for PROBE_LEASE_S.
PROBE_GRACE_S = 0.5 * 3600 + PROBE_LEASE_S


def _part(value: str) -> str:
    safe = _KEY_SAFE.sub("_", value) or "_"
    if len(safe) <= _KEY_PART_CHARS:
        return safe
    return f"{safe[:_KEY_PART_CHARS - 33]}={hashlib.sha256(value.encode()).hexdigest()[:32]}"


def _key(tenant_id: str, dependency: str) -> str:
    return f"{_part(tenant_id)}/{_part(dependency)}"


def _ts(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, timezone.utc) if value is not None else None


def _counts(s: BreakerState) -> bool:
    """Whether a breaker decides anything: a closed one with no failures is as good as none."""
    return s.state != "closed" or bool(s.failures)


def _relevance(item: dict) -> tuple:
    return (item["state"] == "closed", -(item["failures"] or 0), item["dependency"], item["tenant_id"])


class BreakerBoard:
    def __init__(self, js: JetStreamContext, names: Names, replicas: int = 1, *, idle_ttl_s: float = IDLE_TTL_S,
                 max_per_tenant: int = MAX_PER_TENANT, max_listed: int = MAX_LISTED,
                 max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self._js = js
        self._names = names
        self._replicas = replicas
        self._idle_ttl_s = idle_ttl_s
        self._max_per_tenant = max_per_tenant
        self._max_listed = max_listed
        self._max_reply_bytes = max_reply_bytes
        self._local: dict[str, tuple[BreakerState, str, str]] = {}  # key -> (state, tenant, dependency)
        self._written: dict[str, tuple[int, float]] = {}  # key -> (revision, when written)
        self._refused_at: dict[str, float] = {}  # tenant -> when a breaker past its cap was last logged
        self._kv = None
        self._watch_task: asyncio.Task | None = None
        self._keep_task: asyncio.Task | None = None

    async def start(self) -> None:
        self._kv = await ensure_kv(
            self._js,
            KeyValueConfig(bucket=self._names.breakers_bucket, history=1, ttl=self._idle_ttl_s,
                           storage=StorageType.FILE, replicas=self._replicas)
        )
        # Breakers already open are known before the first job.
        self._watch_task = await mirror_kv(self._kv, self._apply, "breakers")
        self._keep_task = asyncio.create_task(self._keep(), name="breakers-keep")

    async def stop(self) -> None:
        for task in (self._watch_task, self._keep_task):
            if task:
                task.cancel()

    def _apply(self, entry) -> None:
        if entry.operation in (KV_DEL, KV_PURGE):
            self._forget(entry.key)
        elif entry.value:
            held = self._written.get(entry.key)
            if held is not None and entry.revision is not None and entry.revision < held[0]:
                return  # older than what this process wrote since
            data = orjson.loads(entry.value)
            self._local[entry.key] = (BreakerState.from_dict(data), data.get("tenant_id", ""),
                                      data.get("dependency", entry.key))
            written = entry.created.timestamp() if entry.created is not None else time.time()
            self._written[entry.key] = (entry.revision or 0, written)

    def _forget(self, key: str) -> None:
        self._local.pop(key, None)
        self._written.pop(key, None)

    def _expired(self, key: str, now: float) -> bool:
        """Whether the bucket has let this entry go (the watcher is not told of an expiry)."""
        written = self._written.get(key)
        return written is not None and now - written[1] >= self._idle_ttl_s

    def _held(self, key: str, now: float) -> tuple[BreakerState, str, str] | None:
        found = self._local.get(key)
        if found is not None and self._expired(key, now):
            self._forget(key)
            return None
        return found

    def admit(self, tenant_id: str, dependency: str, now: float | None = None) -> Admission:
        """Hot path: local state only."""
        now = time.time() if now is None else now
        found = self._held(_key(tenant_id, dependency), now)
        if found is None:
            return Admission("run")
        return breaker.admit(found[0], now)

    async def claim_probe(self, tenant_id: str, dependency: str) -> bool:
        """Only one executor wins the half-open probe."""
        won = await self._change(tenant_id, dependency, lambda s: breaker.claim_probe(s, time.time())
                                 if breaker.admit(s, time.time()).verdict == "probe" else None)
        return won is not None

    def hold_probe(self, tenant_id: str, dependency: str) -> asyncio.Task:
        """Renew the claimed probe's lease while its step runs (cancel the task when it ends):
        a dependency that hangs rather than refuses must not get a second probe beside the
        first each time a lease runs out. An executor that dies renews nothing, and another
        may probe when the lease it last wrote runs out."""
        found = self._held(_key(tenant_id, dependency), time.time())
        opened_at = found[0].opened_at if found else None  # the open period whose probe this is

        async def renew() -> None:
            while True:
                await asyncio.sleep(breaker.PROBE_LEASE_S / 3)
                try:
                    await self._change(tenant_id, dependency, lambda s: breaker.renew_probe(s, time.time(), opened_at))
                except Exception as exc:  # the bucket away: the lease may run out, as before
                    log.debug("breaker.probe_renewal_failed", error=repr(exc))

        return asyncio.create_task(renew(), name="probe-lease")

    async def release_probe(self, tenant_id: str, dependency: str, opened_at: float | None) -> None:
        """Give the probe back unanswered (see breaker.release_probe); if the bucket is away,
        its lease runs out instead."""
        try:
            await self._change(tenant_id, dependency, lambda s: breaker.release_probe(s, time.time(), opened_at))
        except Exception as exc:
            log.debug("breaker.probe_release_failed", error=repr(exc))

    async def record_success(self, tenant_id: str, dependency: str) -> None:
        found = self._held(_key(tenant_id, dependency), time.time())
        if found is None or breaker.on_success(found[0]) is None:
            return  # never failed, or closed with no failures counted: nothing to write
        await self._change(tenant_id, dependency, breaker.on_success)

    async def record_failure(self, tenant_id: str, dependency: str, threshold: int, reset_s: float) -> None:
        await self._change(tenant_id, dependency, lambda s: breaker.on_failure(s, time.time(), threshold, reset_s))

    async def _change(self, tenant_id: str, dependency: str, step) -> BreakerState | None:
        key = _key(tenant_id, dependency)
        for _ in range(20):
            try:
                entry = await self._kv.get(key)
                current, revision = BreakerState.from_dict(orjson.loads(entry.value)), entry.revision
            except KeyNotFoundError:
                current, revision = BreakerState(), None
            new = step(current)
            if new is None:
                return None
            if revision is None and _counts(new) and self._full(tenant_id):
                return None
            shown = dependency[:_SHOWN_CHARS]
            try:
                if revision is None:
                    written = await self._kv.create(key, self._body(new, tenant_id, shown))
                else:
                    written = await self._kv.update(key, self._body(new, tenant_id, shown), last=revision)
            except (KeyWrongLastSequenceError, KeyValueError):
                continue  # someone else changed it: read again
            self._local[key] = (new, tenant_id, shown)
            self._written[key] = (written, time.time())
            if new.state != current.state:
                await self._announce(tenant_id, dependency, new)
            return new
        log.warning("breaker.contended", tenant_id=tenant_id, dependency=dependency)
        return None

    @staticmethod
    def _body(s: BreakerState, tenant_id: str, dependency: str) -> bytes:
        return orjson.dumps({**s.as_dict(), "tenant_id": tenant_id, "dependency": dependency})

    def _full(self, tenant_id: str) -> bool:
        """Whether the tenant has as many breakers that count as it may (then logged, at most
        once a minute per tenant)."""
        now = time.time()
        held = sum(1 for key, (s, tenant, _) in self._local.items()
                   if tenant == tenant_id and _counts(s) and not self._expired(key, now))
        if held < self._max_per_tenant:
            return False
        if now - self._refused_at.get(tenant_id, 0.0) >= 60:
            self._refused_at[tenant_id] = now
            log.warning("breaker.tenant_full", tenant_id=tenant_id, breakers=held, limit=self._max_per_tenant)
        return True

    async def _keep(self) -> None:
        """Until cancelled: rewrite the open and half-open breakers that still matter before
        the bucket lets them go, and forget locally what it has let go."""
        while True:
            # Rewritten a third of the TTL after the last write, checked every sixth: two
            # thirds of it are left for a late round (a busy event loop, a slow server).
            await asyncio.sleep(self._idle_ttl_s / 6)
            try:
                await self._keep_once(time.time())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: the next round tries again
                log.warning("breaker.keep_failed", error=repr(exc))

    async def _keep_once(self, now: float) -> None:
        for key in list(self._local):
            found = self._held(key, now)
            if found is None:
                continue
            s, tenant_id, dependency = found
            revision, written = self._written.get(key, (None, now))
            if (s.state == "closed" or revision is None or now - written < self._idle_ttl_s / 3
                    or now >= (s.next_probe_at or 0) + PROBE_GRACE_S):
                continue
            try:
                revision = await self._kv.update(key, self._body(s, tenant_id, dependency), last=revision)
            except (KeyWrongLastSequenceError, KeyValueError):
                continue  # another executor wrote it (kept it) meanwhile: the watcher brings it
            if self._local.get(key) is found:
                self._written[key] = (revision, time.time())

    async def _announce(self, tenant_id: str, dependency: str, s: BreakerState) -> None:
        event = BreakerEvent(tenant_id=tenant_id, dependency=dependency, state=s.state, failures=s.failures,
                             opened_at=_ts(s.opened_at), next_probe_at=_ts(s.next_probe_at))
        msg_id = f"breaker:{_key(tenant_id, dependency)}:{s.state}:{s.opened_at}:{s.failures}"
        try:
            await publish_many(self._js, [Outgoing(self._names.breaker_event(s.state), event.to_bytes(), msg_id,
                                                   {"Redrive-Tenant": tenant_id})])
        except Exception as exc:
            log.warning("breaker.announce_failed", error=repr(exc))
        log.info("breaker.state", tenant_id=tenant_id, dependency=dependency, state=s.state, failures=s.failures)

    def snapshot(self, tenant_id: str | None = None) -> list[dict]:
        """Every breaker (``tenant_id`` None: a platform admin's view) or one tenant's, open and
        half-open first, then by failures: at most ``max_listed`` of them and
        ``max_reply_bytes``, each saying how many more there are (``not_listed``)."""
        out, now = [], time.time()
        for key in list(self._local):
            found = self._held(key, now)
            if found is None:
                continue
            state, tenant, dependency = found
            if tenant_id is None or tenant == tenant_id:
                out.append({"tenant_id": tenant, "dependency": dependency, "state": breaker.shown_state(state, now),
                            "failures": state.failures, "opened_at": _ts(state.opened_at),
                            "next_probe_at": _ts(state.next_probe_at)})
        out.sort(key=_relevance)
        listed, size = [], 2
        for item in out[:self._max_listed]:
            size += len(orjson.dumps(item)) + 40  # and its not_listed
            if size > self._max_reply_bytes:
                break
            listed.append(item)
        for item in listed:
            item["not_listed"] = len(out) - len(listed)
        return listed
