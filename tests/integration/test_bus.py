"""The NATS plumbing against the real server."""

import asyncio
from dataclasses import dataclass

import pytest
from nats.aio.client import Client
from nats.js.errors import NoStreamResponseError

from shared import bus, streams
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
        await streams.ensure_streams(js, client.settings)
    info = await js.stream_info(names.jobs_stream)
    assert info.config.subjects == [names.jobs_all] and info.config.duplicate_window >= 600
    await streams.ensure_consumer(js, names.jobs_stream, "executor", names.jobs_all, ack_wait_s=30, max_deliver=5)
    await streams.ensure_consumer(js, names.jobs_stream, "executor", names.jobs_all, ack_wait_s=10, max_deliver=7)
    consumer = await js.consumer_info(names.jobs_stream, "executor")
    assert (consumer.config.max_deliver, consumer.config.ack_wait) == (7, 10)
    item = bus.Outgoing(names.job("t"), b"{}", "same-id")
    await bus.publish_many(js, [item, item])
    assert (await js.stream_info(names.jobs_stream)).state.messages == 1  # deduped by Nats-Msg-Id


async def test_a_consumer_backoff_spaces_the_redeliveries_of_an_unacknowledged_message(client):
    js, names = client.js, client.names
    await streams.ensure_streams(js, client.settings)
    await streams.ensure_consumer(js, names.jobs_stream, "executor", names.jobs_all, ack_wait_s=0.5, max_deliver=5,
                              backoff_s=[0.5, 1.5])
    consumer = await js.consumer_info(names.jobs_stream, "executor")
    assert (consumer.config.backoff, consumer.config.ack_wait) == ([0.5, 1.5], 0.5)
    await bus.publish_many(js, [bus.Outgoing(names.job("t"), b"{}", "never-acked")])
    puller = Puller(bus.client_of(js), names.jobs_stream, "executor")
    try:
        times = []
        while len(times) < 3:  # delivered, then again after 0.5 s, then after 1.5 s: never acked
            if await puller.fetch(1, timeout=5):
                times.append(asyncio.get_running_loop().time())
    finally:
        await puller.stop()
    assert times[1] - times[0] >= 0.45 and times[2] - times[1] >= 1.4, times
    await streams.ensure_consumer(js, names.jobs_stream, "executor", names.jobs_all, ack_wait_s=10, max_deliver=5)
    assert (await js.consumer_info(names.jobs_stream, "executor")).config.backoff in (None, [])  # and back


async def test_puller_returns_what_is_there_keeps_late_arrivals_and_times_out_empty(client):
    js, names = client.js, client.names
    await streams.ensure_streams(js, client.settings)
    await streams.ensure_consumer(js, names.jobs_stream, "executor", names.jobs_all, ack_wait_s=30, max_deliver=5)
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


async def _requests_waiting(js, names: Names, *, at_least: int = 0, at_most: int | None = None) -> None:
    """Until the executor consumer's count of open pull requests is in bounds."""
    while True:
        waiting = (await js.consumer_info(names.jobs_stream, "executor")).num_waiting
        if waiting >= at_least and (at_most is None or waiting <= at_most):
            return
        await asyncio.sleep(0.01)


async def test_puller_never_has_two_requests_open_so_it_holds_no_more_than_asked(client):
    """A fetch answered by a lingering request's first message leaves that request open. A
    next fetch that asked again would have two open requests: the server could then hand
    this process more jobs than it has room for, to wait unstarted while their ack wait runs."""
    js, names = client.js, client.names
    await streams.ensure_streams(js, client.settings)
    await streams.ensure_consumer(js, names.jobs_stream, "executor", names.jobs_all, ack_wait_s=30, max_deliver=5)
    puller = Puller(client.nc, names.jobs_stream, "executor")
    try:
        waiting = asyncio.create_task(puller.fetch(5, timeout=2))
        await _requests_waiting(js, names, at_least=1)
        await bus.publish_many(js, [bus.Outgoing(names.job("t"), b"first", "first")])
        [first] = await waiting  # the request stays open for 4 more
        await first.ack_sync()
        again = asyncio.create_task(puller.fetch(5, timeout=2))  # room for 5 again (the first is done)
        await asyncio.sleep(0.1)
        await bus.publish_many(js, [bus.Outgoing(names.job("t"), str(i).encode(), f"m{i}") for i in range(10)])
        got = await again
        await _requests_waiting(js, names, at_most=0)  # every request ended
        consumer = await js.consumer_info(names.jobs_stream, "executor")
        assert 1 <= len(got) <= 5 and consumer.num_ack_pending <= 5, (len(got), consumer.num_ack_pending)
        assert [m.data for m in got] == [str(i).encode() for i in range(len(got))]
    finally:
        await puller.stop()


async def test_puller_waits_for_a_request_it_read_late_instead_of_asking_again(client):
    """The event loop blocked (a synchronous step) while the open request's last message and
    its end status arrived: the next fetch reads them instead of opening a second request."""
    import threading
    import time

    js, names = client.js, client.names
    await streams.ensure_streams(js, client.settings)
    await streams.ensure_consumer(js, names.jobs_stream, "executor", names.jobs_all, ack_wait_s=30, max_deliver=5)
    puller = Puller(client.nc, names.jobs_stream, "executor")
    try:
        waiting = asyncio.create_task(puller.fetch(2, timeout=1))
        await _requests_waiting(js, names, at_least=1)
        await bus.publish_many(js, [bus.Outgoing(names.job("t"), b"first", "first")])
        [first] = await waiting  # its request stays open for one more

        async def publish_elsewhere():
            other = await bus.connect(client.settings, "other")
            try:
                await bus.publish_many(other.jetstream(), [bus.Outgoing(names.job("t"), str(i).encode(), f"m{i}")
                                                           for i in range(5)])
            finally:
                await other.close()

        publisher = threading.Thread(target=lambda: asyncio.run(publish_elsewhere()))
        publisher.start()
        time.sleep(1.5)  # this loop reads nothing meanwhile; the request expires at the server
        publisher.join()
        [second] = await puller.fetch(2, timeout=1)
        await _requests_waiting(js, names, at_most=0)
        consumer = await js.consumer_info(names.jobs_stream, "executor")
        assert (first.data, second.data, consumer.num_ack_pending) == (b"first", b"0", 2)
    finally:
        await puller.stop()


async def test_a_request_left_open_by_a_dropped_connection_delivers_nothing_beside_the_next(client):
    """Only the TCP connection dropped (the server lives): the open request is still there,
    and nats-py subscribes its inbox again. The Puller asks anew from a fresh inbox, so the
    server drops the old request instead of filling both."""
    js, names = client.js, client.names
    await streams.ensure_streams(js, client.settings)
    await streams.ensure_consumer(js, names.jobs_stream, "executor", names.jobs_all, ack_wait_s=30, max_deliver=5)
    nc = await bus.connect(client.settings, "dropped")
    puller = Puller(nc, names.jobs_stream, "executor")
    try:
        waiting = asyncio.create_task(puller.fetch(4, timeout=3))
        await _requests_waiting(js, names, at_least=1)
        nc._transport.close()  # the connection drops under nats-py
        while nc.stats["reconnects"] == 0 or not nc.is_connected:
            await asyncio.sleep(0.01)
        await bus.publish_many(js, [bus.Outgoing(names.job("t"), b"a", "a")])
        first = await waiting  # from the old request, or none: either way room for 4 - len(first)
        again = asyncio.create_task(puller.fetch(4 - len(first), timeout=1))
        # Until its new request is out, on the new connection (the old one is still waiting
        # at the server, so the consumer's count of waiting requests says nothing).
        while not (puller._owed > 0 and puller._owed_on == nc.stats["reconnects"]):
            await asyncio.sleep(0.01)
        await nc.flush()
        await bus.publish_many(js, [bus.Outgoing(names.job("t"), str(i).encode(), f"m{i}") for i in range(8)])
        await again
        await _requests_waiting(js, names, at_most=0)  # every request ended
        assert (await js.consumer_info(names.jobs_stream, "executor")).num_ack_pending <= 4
    finally:
        await puller.stop()
        await nc.close()


async def test_a_publish_nothing_stores_is_an_error_not_a_hang(client):
    with pytest.raises(NoStreamResponseError):
        await bus.publish_many(client.js, [bus.Outgoing(f"{client.settings.prefix}.nowhere", b"{}", "x")])


async def test_a_publish_the_stream_refuses_is_an_error_not_a_hang(client):
    """A PubAck carrying an error (here: headers over the server's 64 KB) left its publish
    waiting for ever: nats-py's APIError.from_error raises instead of returning."""
    from nats.js.errors import APIError

    js, names = client.js, client.names
    await streams.ensure_streams(js, client.settings)
    with pytest.raises(APIError):
        await asyncio.wait_for(bus.publish_many(js, [bus.Outgoing(names.job("t"), b"{}", "k" * 70_000)]), 5)
    await bus.publish_many(js, [bus.Outgoing(names.job("t"), b"{}", "after")])  # the connection is fine


async def test_a_message_over_the_max_payload_with_its_headers_is_refused_before_it_is_sent(client):
    """The server counts headers and body together, nats-py only the body: sent, the
    message made the server close the connection, for good."""
    from nats.errors import MaxPayloadError

    js, names = client.js, client.names
    await streams.ensure_streams(js, client.settings)
    body = b"x" * (client.nc.max_payload - 100)
    with pytest.raises(MaxPayloadError):
        await bus.publish_many(js, [bus.Outgoing(names.job("t"), body, "i" * 200)])
    await bus.publish_many(js, [bus.Outgoing(names.job("t"), b"{}", "still-connected")])
    assert client.nc.is_connected


async def test_the_notifier_consumer_receives_only_run_events(client):
    js, names = client.js, client.names
    await streams.ensure_streams(js, client.settings)
    # Created as messaging.md first had it (every event), then narrowed in place by a restart
    # (the executor's file events included: a file's failure comes as run.file_failed).
    await streams.ensure_consumer(js, names.events_stream, names.notifier_consumer, names.events_all)
    await streams.ensure_consumer(js, names.events_stream, names.notifier_consumer, names.notifier_filters,
                                  wide_filter=names.events_all)
    subjects = [names.file_event("succeeded"), names.file_event("checkpoint"), names.file_event("failed"),
                names.run_event("completed"), names.run_event("file_failed"), names.breaker_event("open")]
    await bus.publish_many(js, [bus.Outgoing(s, b"{}", f"m-{s}") for s in subjects])
    puller = Puller(client.nc, names.events_stream, names.notifier_consumer)
    got = [m.subject for m in await puller.fetch(10, timeout=0.5)]
    await puller.stop()
    assert got == [names.run_event("completed"), names.run_event("file_failed")]


async def test_several_filters_without_a_wide_one_are_refused_on_an_old_server(client):
    await streams.ensure_streams(client.js, client.settings)
    two = [client.names.file_event("failed"), client.names.run_events_all]
    if streams.supports_filter_subjects(client.nc):
        await streams.ensure_consumer(client.js, client.names.events_stream, "two", two)
        info = await client.js.consumer_info(client.names.events_stream, "two")
        assert info.config.filter_subjects == two
    else:
        with pytest.raises(ValueError, match="2.10"):
            await streams.ensure_consumer(client.js, client.names.events_stream, "two", two)


async def test_nats_url_may_name_several_seed_servers(make_settings):
    from shared.embedded import free_port

    settings = await make_settings(migrate=False)
    # One seed that nobody answers on, then the real one: a cluster whose first node is down.
    seeds = settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{free_port()}, {settings.nats_url}"})
    nc = await bus.connect(seeds, "test-seeds")
    try:
        assert nc.is_connected and nc.connected_url.port == int(settings.nats_url.rsplit(":", 1)[1])
    finally:
        await nc.close()


async def test_a_request_carries_its_callers_trace_and_each_answer_runs_in_its_own(client):
    from shared import tracing
    from shared.rpc import MicroService, RpcClient

    async def whose(payload: dict):
        await asyncio.sleep(0.05)  # overlapping requests: each must keep its own trace
        return {"trace_id": tracing.current.get()}

    service = MicroService(client.nc, client.names, "tracer", {"whose": whose}, "test")
    await service.start()
    rpc = RpcClient(client.nc, client.names, timeout=5)

    async def ask(trace_id):
        with tracing.bound(trace_id):
            return (await rpc.call("tracer", "whose"))["trace_id"]

    try:
        traces = [tracing.new_trace_id() for _ in range(5)]
        assert await asyncio.gather(*(ask(t) for t in traces)) == traces
        assert await ask(None) is None  # no trace sent, none made up
    finally:
        await service.stop()


async def test_a_request_carries_its_version_and_whose_it_is_and_another_version_is_refused(client):
    """messaging.md: every body has a ``v``; headers carry Redrive-Tenant and Redrive-Run.
    The verb sees the body without ``v``; a version the service does not speak is refused."""
    import orjson

    from shared.rpc import MicroService, RpcClient

    seen: list[dict] = []

    async def echo(payload: dict):
        seen.append(payload)
        return payload

    service = MicroService(client.nc, client.names, "versioned", {"echo": echo}, "test")
    await service.start()
    wire = await client.nc.subscribe(client.names.service("versioned", "echo"))  # beside the service: sees it all
    rpc = RpcClient(client.nc, client.names, timeout=5)
    try:
        assert await rpc.call("versioned", "echo", {"tenant_id": "ten_a", "run_id": "run_1", "x": 1}) == {
            "tenant_id": "ten_a", "run_id": "run_1", "x": 1}
        sent = await wire.next_msg(timeout=5)
        assert orjson.loads(sent.data)["v"] == 1
        assert sent.headers["Redrive-Tenant"] == "ten_a" and sent.headers["Redrive-Run"] == "run_1"
        reply = await client.nc.request(client.names.service("versioned", "echo"), orjson.dumps({"v": 2, "x": 1}),
                                        timeout=5)
        assert orjson.loads(reply.data) == {"ok": False, "error": {
            "code": "bad_request", "message": "request version 2 is not supported (this service speaks 1)",
            "details": {}}}
        assert seen == [{"tenant_id": "ten_a", "run_id": "run_1", "x": 1}]
    finally:
        await wire.unsubscribe()
        await service.stop()
