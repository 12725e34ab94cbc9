"""A revoked key is refused by a gateway that has it cached, at once: a trigger notifies
the gateway's listening connection, which evicts it. While that connection is down, the
cache is not trusted at all.

Real PostgreSQL and NATS; the gateway's key cache is given an hour-long TTL, so that only
an eviction can explain a refusal. The revoker uses an engine of its own, as `redrive key
revoke` would from another process.
"""

from __future__ import annotations

import asyncio
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
                                  keys=gateway.deps.keys, revoker=revoker, tenant=tenant, db=db)
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
    # Hold the listener back once its connection is killed, so that the revocation below
    # certainly happens while nothing listens.
    reconnecting, reconnect = asyncio.Event(), asyncio.Event()
    connect = gw.revocations.connect

    async def held_back():
        reconnecting.set()  # the old connection is given up
        await reconnect.wait()
        return await connect()

    gw.revocations.connect = held_back
    killed = await gw.db.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE datname = current_database() AND application_name = $1", APPLICATION_NAME)
    assert killed == 1
    await asyncio.wait_for(reconnecting.wait(), 10)
    assert not gw.revocations.listening.is_set()

    assert await revoke_key(gw.revoker, key_id)  # its notice goes to nobody
    assert await status_of(gw, key) == 401
    _, other = await make_key(gw.revoker, gw.tenant, "member", "meanwhile")
    assert await status_of(gw, other) == 200 and len(gw.keys) == 0  # asked PostgreSQL, kept nothing

    gw.revocations.connect = connect
    reconnect.set()
    again_id, again = await cached_key(gw, "after")  # listening again: keys are cached again...
    assert await revoke_key(gw.revoker, again_id)
    assert await refused_promptly(gw, again)  # ...and evicted when revoked
