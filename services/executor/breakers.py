"""Breaker state shared by every executor process, in a JetStream KV bucket: one breaker
per tenant and dependency. Per tenant because its settings are (threshold, reset time),
and because a dependency's limits often are too (an API key rate-limited with 429s is
that tenant's, not everyone's): one tenant's failures never hold back another's jobs.

Reads are served from a local copy kept fresh by a KV watcher, so the check on the hot
path is a dict lookup (the seed asks < 5 ms; we measure it in bench/). Writes happen only
on state changes and failures, with compare-and-set on the entry's revision so two
executors counting failures at once do not lose one.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timezone

import orjson
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, KeyValueError

from shared import breaker
from shared.breaker import Admission, BreakerState
from shared.bus import Outgoing, publish_many
from shared.kv import ensure_kv, mirror_kv
from shared.messages import BreakerEvent
from shared.subjects import Names

log = structlog.get_logger(__name__)

_KEY_SAFE = re.compile(r"[^-/_=.a-zA-Z0-9]")


def _key(tenant_id: str, dependency: str) -> str:
    return f"{_KEY_SAFE.sub('_', tenant_id) or '_'}/{_KEY_SAFE.sub('_', dependency) or '_'}"


def _ts(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, timezone.utc) if value is not None else None


class BreakerBoard:
    def __init__(self, js: JetStreamContext, names: Names, replicas: int = 1) -> None:
        self._js = js
        self._names = names
        self._replicas = replicas
        self._local: dict[str, tuple[BreakerState, str, str]] = {}  # key -> (state, tenant, dependency)
        self._kv = None
        self._watch_task: asyncio.Task | None = None

    async def start(self) -> None:
        self._kv = await ensure_kv(
            self._js,
            KeyValueConfig(bucket=self._names.breakers_bucket, history=1, storage=StorageType.FILE, replicas=self._replicas)
        )
        # Breakers already open are known before the first job.
        self._watch_task = await mirror_kv(self._kv, self._apply, "breakers")

    async def stop(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()

    def _apply(self, entry) -> None:
        if entry.value:
            data = orjson.loads(entry.value)
            self._local[entry.key] = (BreakerState.from_dict(data), data.get("tenant_id", ""),
                                      data.get("dependency", entry.key))

    def admit(self, tenant_id: str, dependency: str, now: float | None = None) -> Admission:
        """Hot path: local state only."""
        found = self._local.get(_key(tenant_id, dependency))
        if found is None:
            return Admission("run")
        return breaker.admit(found[0], time.time() if now is None else now)

    async def claim_probe(self, tenant_id: str, dependency: str) -> bool:
        """Only one executor wins the half-open probe."""
        won = await self._change(tenant_id, dependency, lambda s: breaker.claim_probe(s, time.time())
                                 if breaker.admit(s, time.time()).verdict == "probe" else None)
        return won is not None

    async def record_success(self, tenant_id: str, dependency: str) -> None:
        found = self._local.get(_key(tenant_id, dependency))
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
            body = orjson.dumps({**new.as_dict(), "tenant_id": tenant_id, "dependency": dependency})
            try:
                if revision is None:
                    await self._kv.create(key, body)
                else:
                    await self._kv.update(key, body, last=revision)
            except (KeyWrongLastSequenceError, KeyValueError):
                continue  # someone else changed it: read again
            self._local[key] = (new, tenant_id, dependency)
            if new.state != current.state:
                await self._announce(tenant_id, dependency, new)
            return new
        log.warning("breaker.contended", tenant_id=tenant_id, dependency=dependency)
        return None

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
        """Every breaker (``tenant_id`` None: a platform admin's view) or one tenant's."""
        out, now = [], time.time()
        for state, tenant, dependency in self._local.values():
            if tenant_id is None or tenant == tenant_id:
                out.append({"tenant_id": tenant, "dependency": dependency, "state": breaker.shown_state(state, now),
                            "failures": state.failures, "opened_at": _ts(state.opened_at),
                            "next_probe_at": _ts(state.next_probe_at)})
        return sorted(out, key=lambda b: (b["dependency"], b["tenant_id"]))
