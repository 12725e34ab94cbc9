"""How a service process lives (shared/runtime.py): the parts that are pure logic."""

from __future__ import annotations

import asyncio

import pytest

from shared import runtime
from shared.settings import Settings


class _Client:
    def __init__(self) -> None:
        self.is_closed = False


class _Service:
    """Stands for a service whose NATS client nats-py may give up (closed for good)."""

    def __init__(self) -> None:
        self.nc = _Client()
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.stopped.set()


async def test_a_service_whose_nats_connection_closed_for_good_stops_and_exits_1(monkeypatch):
    monkeypatch.setattr(runtime, "LOST_CHECK_S", 0.01)
    monkeypatch.setattr(runtime, "settle_gc", lambda: None)  # not in the test process
    service = _Service()

    async def build(settings: Settings) -> _Service:
        return service

    served = []

    async def lose_the_connection() -> None:
        await asyncio.sleep(0.05)
        served.append(not service.stopped.is_set())  # connected, it serves
        service.nc.is_closed = True

    loser = asyncio.create_task(lose_the_connection())
    with pytest.raises(SystemExit) as exited:
        await runtime.serve("executor", build, Settings())  # (pytest-timeout bounds it)
    await loser
    assert served == [True] and exited.value.code == 1 and service.stopped.is_set()
