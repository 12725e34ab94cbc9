"""The NATS plumbing against the real server."""

import asyncio
from dataclasses import dataclass

import pytest
from nats.aio.client import Client
from nats.js.errors import NoStreamResponseError

from shared import bus
from shared.jetstream import Puller
from shared.settings import Settings
from shared.subjects import Names


@dataclass
class Bus:
    settings: Settings
    names: Names
    nc: Client

    @property
    def js(self):
        return self.nc.jetstream()


@pytest.fixture
async def client(make_settings):
    settings = await make_settings(migrate=False)
    nc = await bus.connect(settings, "test")
    yield Bus(settings, Names(settings.prefix), nc)
    await nc.close()


async def test_streams_and_consumers_are_declared_idempotently_and_updates_apply(client):
    js, names = client.js, client.names
    for _ in range(2):
        await bus.ensure_streams(js, client.settings)
    info = await js.stream_info(names.jobs_stream)
    assert info.config.subjects == [names.jobs_all] and info.config.duplicate_window >= 600
    await bus.ensure_consumer(js, names.jobs_stream, "executor", names.jobs_all, ack_wait_s=30, max_deliver=5)
    await bus.ensure_consumer(js, names.jobs_stream, "executor", names.jobs_all, ack_wait_s=10, max_deliver=7)
    consumer = await js.consumer_info(names.jobs_stream, "executor")
    assert (consumer.config.max_deliver, consumer.config.ack_wait) == (7, 10)
    item = bus.Outgoing(names.job("t"), b"{}", "same-id")
    await bus.publish_many(js, [item, item])
    assert (await js.stream_info(names.jobs_stream)).state.messages == 1  # deduped by Nats-Msg-Id


async def test_puller_returns_what_is_there_keeps_late_arrivals_and_times_out_empty(client):
    js, names = client.js, client.names
    await bus.ensure_streams(js, client.settings)
    await bus.ensure_consumer(js, names.jobs_stream, "executor", names.jobs_all, ack_wait_s=30, max_deliver=5)
    puller = Puller(client.nc, names.jobs_stream, "executor")
    assert await puller.fetch(10, timeout=0.3) == []  # nothing there: empty after the timeout
    await bus.publish_many(js, [bus.Outgoing(names.job("t"), str(i).encode(), f"m{i}") for i in range(25)])
    first = await puller.fetch(10)
    second = await puller.fetch(100)
    assert [m.data for m in first + second] == [str(i).encode() for i in range(25)]
    for m in first + second:
        await m.ack_sync()  # confirmed by the server: the count below is then exact
    # A lingering request is answered by a message published while it waits.
    waiting = asyncio.create_task(puller.fetch(5, timeout=5))
    await asyncio.sleep(0.2)
    await bus.publish_many(js, [bus.Outgoing(names.job("t"), b"late", "late")])
    late = await waiting
    assert [m.data for m in late] == [b"late"]
    await late[0].ack_sync()
    await puller.stop()
    consumer = await js.consumer_info(names.jobs_stream, "executor")
    assert consumer.num_ack_pending == 0 and consumer.num_pending == 0


async def test_a_publish_nothing_stores_is_an_error_not_a_hang(client):
    with pytest.raises(NoStreamResponseError):
        await bus.publish_many(client.js, [bus.Outgoing(f"{client.settings.prefix}.nowhere", b"{}", "x")])
