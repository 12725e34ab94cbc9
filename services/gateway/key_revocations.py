"""Revocations heard as they commit, so that a gateway's KeyCache never outlives them.

A trigger on gateway.api_keys (migration g0002) notifies ``CHANNEL`` with a key's hash on
every update or delete of it, whoever makes it; PostgreSQL sends it when the transaction
commits. One dedicated connection per gateway LISTENs and evicts that key. Open event
streams watch the same cache: an eviction makes them check their key again, and a stream
whose key is refused ends (events.py, app.StreamKey).

The cache serves only while this connection is listening: a revocation committed while it
is down is never heard, so on losing it the cache is emptied and bypassed (every request
asks PostgreSQL) until it listens again, trying with backoff. A connection that dies
silently (a lost network: nothing tells the client) is found by a heartbeat query; until
then, at most two heartbeat periods, the cache may still answer for a key revoked meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import asyncpg
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.backoff import backoff_delay_ms
from services.gateway.identity import KeyCache

log = structlog.get_logger(__name__)

CHANNEL = "redrive_gateway_api_key_changed"  # as in migration g0002
APPLICATION_NAME = "redrive-gateway-key-revocations"  # what pg_stat_activity shows for it
HEARTBEAT_S = 5.0
RECONNECT_BASE_MS = 100
RECONNECT_MAX_MS = 5_000

Connect = Callable[[], Awaitable[asyncpg.Connection]]


def dedicated_connection(engine: AsyncEngine) -> Connect:
    """Connections opened as the engine opens its own (same URL, timeout, server settings),
    then taken out of its pool: a LISTEN must stay on one session, for good."""

    async def connect() -> asyncpg.Connection:
        pooled = await engine.raw_connection()
        conn = pooled.driver_connection
        pooled.detach()  # the pool forgets it (and opens another in its place when needed)
        return conn

    return connect


class KeyRevocations:
    """Keeps one gateway's KeyCache current: listening, or distrusted."""

    def __init__(self, cache: KeyCache, connect: Connect, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.cache = cache
        self.connect = connect  # how to open the listening connection (a test may hold it back)
        self.heartbeat_s = heartbeat_s
        self.listening = asyncio.Event()  # set while the cache may serve
        self._listened = False  # the last connection got as far as listening
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._keep_listening(), name="gateway-key-revocations")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _keep_listening(self) -> None:
        failures = 0  # attempts in a row that never got as far as listening
        while True:
            try:
                await self._listen_until_lost()
            except Exception as exc:
                log.warning("gateway.key_revocations_unavailable", error=repr(exc),
                            note="keys are checked in PostgreSQL until listening again")
            else:
                log.warning("gateway.key_revocations_lost", note="keys are checked in PostgreSQL until listening again")
            failures = 1 if self._listened else failures + 1
            await asyncio.sleep(backoff_delay_ms(failures, base_ms=RECONNECT_BASE_MS, max_ms=RECONNECT_MAX_MS) / 1000)

    async def _listen_until_lost(self) -> None:
        self._listened = False
        conn = await self.connect()
        lost = asyncio.Event()

        def on_lost(_conn) -> None:
            # Straight away, not when this task next runs: requests must not meanwhile be
            # answered from a cache that can no longer hear revocations.
            self._distrust()
            lost.set()

        conn.add_termination_listener(on_lost)
        try:
            await conn.execute(f"SET application_name = '{APPLICATION_NAME}'")
            await conn.add_listener(CHANNEL, self._on_notice)
            # Listening from here on: anything revoked before was committed before any
            # lookup made from now on, which then cannot find it.
            self.cache.trust()
            self.listening.set()
            self._listened = True
            log.info("gateway.key_revocations_listening")
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), self.heartbeat_s)
                    return
                await asyncio.wait_for(conn.execute("SELECT 1"), self.heartbeat_s)
        finally:
            self._distrust()
            conn.remove_termination_listener(on_lost)
            conn.terminate()  # no goodbye to wait for: it is lost, or being given up

    def _on_notice(self, _conn, _pid: int, _channel: str, digest: str) -> None:
        if digest:
            self.cache.evict(digest)
        else:  # TRUNCATE: every key
            self.cache.clear()

    def _distrust(self) -> None:
        self.listening.clear()
        self.cache.distrust()
