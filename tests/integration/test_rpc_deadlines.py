"""A request the caller stopped waiting for is not run: NATS holds requests through an
outage and delivers them when it is back, long after the gateway told its client "503"."""

from __future__ import annotations

import time

import nats.errors
import orjson
import pytest

from shared.rpc import DEADLINE_HEADER
from tests.stack import Stack


@pytest.fixture(scope="module")
async def stack(make_settings):
    s = await Stack(await make_settings()).start("billing")
    yield s
    await s.stop()


async def grant(stack: Stack, tenant: str, deadline: float) -> bytes:
    msg = await stack.nc.request(stack.names.service("billing", "grant"),
                                 orjson.dumps({"tenant_id": tenant, "purchased": 5, "actor": "test"}),
                                 timeout=1.0, headers={DEADLINE_HEADER: f"{deadline:.3f}"})
    return msg.data


async def test_a_request_past_its_deadline_is_dropped_unrun(stack):
    tenant = await stack.tenant(monthly=0)
    with pytest.raises(nats.errors.TimeoutError):  # no answer: the caller is gone
        await grant(stack, tenant, time.time() - 1)
    assert [e["kind"] for e in await stack.ledger(tenant)] == ["grant", "grant"]  # the opening entries only
    assert orjson.loads(await grant(stack, tenant, time.time() + 30))["ok"]
    assert (await stack.call("billing", "balance", tenant_id=tenant))["purchased"]["remaining"] == 5


async def test_a_call_while_the_bus_is_down_fails_at_once(stack):
    from shared import bus
    from shared.messages import ServiceError
    from shared.rpc import RpcClient

    nc = await bus.connect(stack.settings, "test-closed")
    await nc.close()  # not connected, as during an outage
    started = time.monotonic()
    with pytest.raises(ServiceError) as refused:
        await RpcClient(nc, stack.names, timeout=15).call("billing", "balance", {"tenant_id": "t"})
    assert refused.value.code == "service_unavailable" and time.monotonic() - started < 1


@pytest.fixture(scope="module")
async def run_stack(make_settings):
    s = await Stack(await make_settings()).start("billing", "coordinator")
    yield s
    await s.stop()


async def test_a_run_that_would_commit_after_its_caller_stopped_waiting_is_rolled_back_and_refunded(run_stack):
    """Slowed down (billing or PostgreSQL slow to answer), create_run committed after the
    gateway had answered 503, and the client's retry created and charged a second run. Here
    the deadline is inside the commit margin when the request arrives: run, it must leave
    nothing behind."""
    stack = run_stack
    tenant = await stack.tenant(monthly=10)
    template = await stack.template(tenant, [{"name": "s", "handler": "noop"}])
    msg = await stack.nc.request(
        stack.names.service("coordinator", "create_run"),
        orjson.dumps({"tenant_id": tenant, "template_id": template, "files": [{"name": "a"}, {"name": "b"}],
                      "actor": "test"}),
        timeout=5.0, headers={DEADLINE_HEADER: f"{time.time() + 0.5:.3f}"})
    assert orjson.loads(msg.data)["error"]["code"] == "service_unavailable"
    assert (await stack.call("coordinator", "list_runs", tenant_id=tenant))["items"] == []
    assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 10
    await stack.assert_books_balance(tenant)


async def test_a_database_connection_lost_under_a_request_is_unavailable_not_internal(stack):
    """PostgreSQL restarted: a pooled connection it closed fails its statement with an
    InterfaceError. The caller hears "unavailable, try again" (the gateway's 503), not a 500."""
    from sqlalchemy.exc import InterfaceError

    from shared.messages import ServiceError
    from shared.rpc import MicroService, RpcClient

    async def lost(payload):
        raise InterfaceError("SELECT 1", {}, Exception("connection is closed"))

    service = MicroService(stack.nc, stack.names, "lossy", {"get": lost}, "a service whose database went away")
    await service.start()
    try:
        with pytest.raises(ServiceError) as refused:
            await RpcClient(stack.nc, stack.names, timeout=5).call("lossy", "get", {})
        assert refused.value.code == "dependency_unavailable"
    finally:
        await service.stop()


async def test_a_service_still_adding_its_endpoints_is_not_running_not_lacking_the_verb(stack, monkeypatch):
    """A coordinator restarted after a kill answered discovery before its endpoints were all
    there: a caller meeting no responder for get_run asked discovery, found the service and
    no get_run, and was told "unknown_verb" (a test of a crash failed on it)."""
    import asyncio

    from nats.micro.service import Service

    from shared.messages import ServiceError
    from shared.rpc import MicroService, RpcClient

    proceed, waiting = asyncio.Event(), asyncio.Event()
    add_endpoint = Service.add_endpoint

    async def slow_second(self, config):
        if config.name == "second":
            waiting.set()
            await proceed.wait()
        await add_endpoint(self, config)

    monkeypatch.setattr(Service, "add_endpoint", slow_second)

    async def answer(payload):
        return {"ok": True}

    service = MicroService(stack.nc, stack.names, "starting", {"first": answer, "second": answer}, "starts slowly")
    starting = asyncio.create_task(service.start())
    try:
        await asyncio.wait_for(waiting.wait(), 5)
        with pytest.raises(ServiceError) as refused:
            await RpcClient(stack.nc, stack.names, timeout=2).call("starting", "second", {})
        assert refused.value.code == "service_unavailable"
        proceed.set()
        await starting
        assert await RpcClient(stack.nc, stack.names, timeout=5).call("starting", "second", {}) == {"ok": True}
    finally:
        proceed.set()
        await starting
        await service.stop()
