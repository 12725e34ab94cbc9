"""Which request bodies the gateway counts as large, and how many it reads at once
(large_bodies.LargeBodies, REDRIVE_MAX_CONCURRENT_LARGE_BODIES)."""

from __future__ import annotations

import asyncio
from unittest import mock

import pytest
from aiohttp import streams
from aiohttp.test_utils import make_mocked_request

from services.gateway.large_bodies import LargeBodies
from shared.messages import ServiceError

MESSAGE = 1024 * 1024


def request(**headers: str):
    payload = streams.StreamReader(mock.Mock(), 2**16, loop=asyncio.get_running_loop())
    return make_mocked_request("POST", "/api/v1/workflow-runs", headers=headers, payload=payload)


@pytest.mark.parametrize("headers, large", [
    ({"Content-Length": str(MESSAGE)}, False),  # fits a message: as any request
    ({"Content-Length": str(MESSAGE + 1)}, True),
    ({"Transfer-Encoding": "chunked"}, True),  # its size is known only once read
    ({"Content-Length": "1000", "Content-Encoding": "gzip"}, True),  # inflates up to the body limit
    ({"Content-Length": "1000", "Content-Encoding": "identity"}, False),
])
async def test_a_body_is_large_past_one_message_or_when_its_size_is_not_known_before_reading(headers, large):
    assert LargeBodies.is_large(request(**headers), MESSAGE) is large


async def test_no_body_is_not_large():
    assert LargeBodies.is_large(make_mocked_request("POST", "/x"), MESSAGE) is False


async def test_one_more_than_the_limit_waits_for_a_slot_then_is_refused_with_503():
    bodies = LargeBodies(limit=1, wait_s=0.05)
    async with bodies.slot():
        with pytest.raises(ServiceError) as refused:
            async with bodies.slot():
                pass
        assert refused.value.code == "service_unavailable"
        assert "REDRIVE_MAX_CONCURRENT_LARGE_BODIES" in refused.value.message
        assert bodies.in_use == 1 and bodies.waiting == 0
    assert bodies.in_use == 0


async def test_a_waiting_body_goes_on_when_a_slot_is_freed():
    bodies = LargeBodies(limit=1, wait_s=5)
    order: list[str] = []
    release = asyncio.Event()

    async def first() -> None:
        async with bodies.slot():
            order.append("first")
            await release.wait()

    async def second() -> None:
        async with bodies.slot():
            order.append("second")

    holder = asyncio.create_task(first())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(second())
    await asyncio.sleep(0.01)
    assert order == ["first"] and bodies.waiting == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, waiter), 1)
    assert order == ["first", "second"] and bodies.in_use == 0


async def test_a_slot_is_freed_when_the_request_fails():
    bodies = LargeBodies(limit=1, wait_s=0.05)
    with pytest.raises(RuntimeError):
        async with bodies.slot():
            raise RuntimeError("the body could not be read")
    async with bodies.slot():
        assert bodies.in_use == 1
