"""A revoked key is refused by a gateway that has it cached, at once: a trigger notifies
the gateway's listening connection, which evicts it. While that connection is down, the
cache is not trusted at all. An open event stream ends as soon as its key is refused, and
sends nothing more.

Real PostgreSQL and NATS; the gateway's key cache is given an hour-long TTL, so that only
an eviction can explain a refusal. The revoker uses an engine of its own, as `redrive key
revoke` would from another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from types import SimpleNamespace

import aiohttp
import asyncpg
import pytest

from shared import bus
from shared.db import make_engine
from shared.rpc import MicroService
from shared.subjects import Names
from services.gateway.bootstrap import build
from services.gateway.identity import create_tenant, key_hash, make_key, revoke_key
from services.gateway.key_revocations import APPLICATION_NAME

PROMPTLY_S = 5.0  # far below the TTL: an eviction, not an expiry


@pytest.fixture
async def gw(make_settings):
    settings = await make_settings(port=0, request_timeout_s=3)
    names = Names(settings.prefix)
    nc = await bus.connect(settings, "fake-billing")

    async def balance(payload: dict) -> dict:  # any route that needs a key: 200 means it was accepted
        return {"tenant_id": payload["tenant_id"]}

    billing = MicroService(nc, names, "billing", {"balance": balance}, "fake")
    await billing.start()
    gateway = await build(settings)
    await gateway.start()
    gateway.deps.keys.ttl_s = 3600.0
    revoker = make_engine(settings, pool_size=1)
    tenant = await create_tenant(revoker, "acme")
    db = await asyncpg.connect(settings.database_url)
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gateway.port}") as http:
            yield SimpleNamespace(http=http, gateway=gateway, revocations=gateway.key_revocations,
                                  keys=gateway.deps.keys, revoker=revoker, tenant=tenant, db=db, nc=nc, names=names)
    finally:
        await db.close()
        await gateway.stop()
        await billing.stop()
        await nc.close()
        await revoker.dispose()


async def status_of(gw, key: str) -> int:
    async with gw.http.get("/api/v1/credits", headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status


async def refused_promptly(gw, key: str) -> bool:
    deadline = time.monotonic() + PROMPTLY_S
    while (status := await status_of(gw, key)) == 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return status == 401


async def cached_key(gw, user: str) -> tuple[str, str]:
    """A new key (id, key), accepted once by the gateway while it listens: now in its cache."""
    await asyncio.wait_for(gw.revocations.listening.wait(), 10)
    key_id, key = await make_key(gw.revoker, gw.tenant, "member", user)
    assert await status_of(gw, key) == 200
    assert gw.keys.get(key_hash(key)) is not None  # the next answer would come from the cache
    return key_id, key


async def hold_back_listener(gw) -> asyncio.Event:
    """Kill the gateway's listening connection and hold back the next one, so that a
    revocation made now certainly goes unheard; returns what lets it reconnect."""
    reconnecting, reconnect = asyncio.Event(), asyncio.Event()
    connect = gw.revocations.connect

    async def held_back():
        reconnecting.set()  # the old connection is given up
        await reconnect.wait()
        gw.revocations.connect = connect
        return await connect()

    gw.revocations.connect = held_back
    killed = await gw.db.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE datname = current_database() AND application_name = $1", APPLICATION_NAME)
    assert killed == 1
    await asyncio.wait_for(reconnecting.wait(), 10)
    assert not gw.revocations.listening.is_set()
    return reconnect


async def test_a_cached_key_is_refused_promptly_once_revoked_elsewhere(gw):
    key_id, key = await cached_key(gw, "leaver")
    assert await revoke_key(gw.revoker, key_id)
    assert await refused_promptly(gw, key)


async def test_a_cached_key_deleted_by_hand_is_refused_promptly(gw):
    key_id, key = await cached_key(gw, "deleted")
    await gw.db.execute("DELETE FROM gateway.api_keys WHERE id = $1", key_id)
    assert await refused_promptly(gw, key)


async def test_without_its_listening_connection_the_gateway_trusts_no_cached_key(gw):
    key_id, key = await cached_key(gw, "while-down")
    reconnect = await hold_back_listener(gw)

    assert await revoke_key(gw.revoker, key_id)  # its notice goes to nobody
    assert await status_of(gw, key) == 401
    _, other = await make_key(gw.revoker, gw.tenant, "member", "meanwhile")
    assert await status_of(gw, other) == 200 and len(gw.keys) == 0  # asked PostgreSQL, kept nothing

    reconnect.set()
    again_id, again = await cached_key(gw, "after")  # listening again: keys are cached again...
    assert await revoke_key(gw.revoker, again_id)
    assert await refused_promptly(gw, again)  # ...and evicted when revoked


# ---- open event streams ------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def event_stream(gw, key: str):
    """GET /api/v1/events with ``key``, connected (the gateway has subscribed)."""
    async with gw.http.get("/api/v1/events", headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        assert await asyncio.wait_for(resp.content.readline(), 10) == b": connected\n"
        yield resp


async def publish_run_event(gw, run_id: str) -> None:
    await gw.nc.publish(gw.names.run_event("started"), json.dumps({"tenant_id": gw.tenant, "run_id": run_id}).encode())
    await gw.nc.flush()


async def next_event(resp) -> tuple[str, dict]:
    """The stream's next event (comments skipped), within PROMPTLY_S."""
    kind = None
    async with asyncio.timeout(PROMPTLY_S):
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                return kind, json.loads(line[6:])
    raise AssertionError("the stream ended before its next event")


async def rest_until_closed(resp, why: str) -> list[str]:
    """What the stream sends (comments left out) until the gateway ends it; an
    AssertionError if it is still open PROMPTLY_S later."""
    sent: list[str] = []

    async def read() -> None:
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line and not line.startswith(":"):
                sent.append(line)

    try:
        await asyncio.wait_for(read(), PROMPTLY_S)
    except TimeoutError:
        raise AssertionError(f"the event stream is still open {PROMPTLY_S}s after {why}; it sent {sent}") from None
    return sent


async def test_an_open_event_stream_ends_once_its_key_is_revoked_and_sends_nothing_more(gw):
    key_id, key = await cached_key(gw, "watcher")
    async with event_stream(gw, key) as resp:
        await publish_run_event(gw, "before")
        assert await next_event(resp) == ("run.started", {"tenant_id": gw.tenant, "run_id": "before"})

        assert await revoke_key(gw.revoker, key_id)
        assert await refused_promptly(gw, key)  # the gateway has heard of it
        await publish_run_event(gw, "after")  # the tenant's events go on

        assert await rest_until_closed(resp, "its key was revoked") == []


async def test_an_open_event_stream_whose_revocation_went_unheard_ends_at_its_next_key_check(gw):
    gw.gateway.hub.recheck_key_s = 0.2  # else every KEEPALIVE_S
    key_id, key = await cached_key(gw, "unheard")
    async with event_stream(gw, key) as resp:
        await hold_back_listener(gw)
        assert await revoke_key(gw.revoker, key_id)  # its notice goes to nobody
        assert await rest_until_closed(resp, "its key was revoked, unheard") == []
