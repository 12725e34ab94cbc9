"""Requests made while nats-server is down: refused at once, and nothing of them happens
when it comes back (nats-py would otherwise hold them and send them then)."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared import bus
from shared.messages import ServiceError
from shared.rpc import RpcClient
from tests.procs import ProcStack

pytestmark = pytest.mark.chaos


async def test_what_was_refused_during_a_nats_outage_never_happens(chaos_settings, chaos_servers):
    stack = await ProcStack(await chaos_settings()).start("billing", "coordinator")
    gateway_nc = await bus.connect(stack.settings, "as-the-gateway")
    rpc = RpcClient(gateway_nc, stack.names, timeout=5)
    try:
        tenant = await stack.tenant(monthly=100)
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
        before = await stack.ledger(tenant)
        chaos_servers.nats.stop()
        try:
            async with asyncio.timeout(10):
                while gateway_nc.is_connected:
                    await asyncio.sleep(0.05)
            for service, verb, payload in [
                ("coordinator", "create_run", {"tenant_id": tenant, "actor": "t", "template_id": template,
                                               "files": [{"name": "a"}]}),
                ("billing", "grant", {"tenant_id": tenant, "purchased": 7, "actor": "t"}),
            ]:
                started = time.monotonic()
                with pytest.raises(ServiceError) as refused:
                    await rpc.call(service, verb, payload)
                assert refused.value.code == "service_unavailable" and time.monotonic() - started < 1
        finally:
            chaos_servers.nats.start()
        await stack.wait_services("billing", "coordinator")
        async with asyncio.timeout(10):
            while not gateway_nc.is_connected:
                await asyncio.sleep(0.05)
        await rpc.call("billing", "balance", {"tenant_id": tenant})  # the client's queue is flushed by now
        assert (await stack.call("coordinator", "list_runs", tenant_id=tenant))["items"] == []
        assert await stack.ledger(tenant) == before
    finally:
        await gateway_nc.close()
        await stack.stop()
