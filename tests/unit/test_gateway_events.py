"""The SSE hub's fan-out: each event to its tenant's clients only, breakers to all, and a
slow client loses events instead of holding anyone up."""

import asyncio
import contextlib
import json

from shared.subjects import Names
from services.gateway.events import EventHub


def _frames(queue):
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


def test_an_event_goes_to_the_tenant_its_body_names_and_nowhere_else():
    names = Names("p1")
    hub = EventHub(nc=None, names=names)
    a, b = hub.register("acme"), hub.register("other")
    hub.dispatch(names.run_event("completed"), json.dumps({"tenant_id": "acme", "run_id": "r"}).encode(), None)
    hub.dispatch(names.breaker_event("open"), b'{"tenant_id": "other", "dependency": "ocr"}', None)
    hub.dispatch(names.breaker_event("open"), b'{"dependency": "ocr"}', None)  # nobody's: it went to everyone
    hub.dispatch(names.file_event("retrying"), b"not json at all", {"Redrive-Tenant": "acme"})  # was sent as is
    assert _frames(a) == [b'event: run.completed\ndata: {"tenant_id": "acme", "run_id": "r"}\n\n']
    assert _frames(b) == [b'event: breaker.open\ndata: {"tenant_id": "other", "dependency": "ocr"}\n\n']


def test_a_multi_line_body_is_sent_as_one_data_line():
    names = Names("p1")
    hub = EventHub(nc=None, names=names)
    a = hub.register("acme")
    hub.dispatch(names.run_event("failed"), b'{\n  "tenant_id": "acme"\n}', None)
    assert _frames(a) == [b'event: run.failed\ndata: {"tenant_id":"acme"}\n\n']


def test_a_slow_client_drops_events_and_others_still_get_them():
    names = Names("p1")
    hub = EventHub(nc=None, names=names, queue_size=2)
    slow, fast = hub.register("acme"), hub.register("acme")
    for i in range(3):
        hub.dispatch(names.run_event("started"), json.dumps({"tenant_id": "acme", "i": i}).encode(), None)
        _frames(fast)
    assert len(_frames(slow)) == 2 and hub.dropped == 1


def test_a_slow_client_holds_at_most_its_byte_budget_of_big_events():
    """A file event carries its step's output (up to ~1 MB): a thousand frames of those
    queued for one slow reader were a gigabyte."""
    names = Names("p1")
    hub = EventHub(nc=None, names=names, queue_bytes=3000)
    slow = hub.register("acme")
    big = json.dumps({"tenant_id": "acme", "output": "x" * 1000}).encode()
    for _ in range(5):
        hub.dispatch(names.file_event("succeeded"), big, None)
    assert len(_frames(slow)) == 2 and hub.dropped == 3
    hub.dispatch(names.file_event("succeeded"), big, None)  # read: room again
    assert len(_frames(slow)) == 1 and slow.queued_bytes == 0


def test_unregistered_clients_get_nothing_and_are_not_counted():
    names = Names("p1")
    hub = EventHub(nc=None, names=names)
    a = hub.register("acme")
    assert hub.clients == 1
    hub.unregister("acme", a)
    hub.unregister("acme", a)
    hub.dispatch(names.run_event("started"), b'{"tenant_id": "acme"}', None)
    assert hub.clients == 0 and a.empty()


class _Bus:
    """Just what the hub asks of its NATS connection, with a switch for an outage."""

    is_connected = True

    def __init__(self) -> None:
        self.stats = {"reconnects": 0}

    async def subscribe(self, subject, cb):
        return self

    async def unsubscribe(self):
        pass

    async def flush(self, timeout):
        pass


@contextlib.asynccontextmanager
async def _one_stream(bus: "_Bus"):
    """A live-event stream of tenant acme over ``bus``; yields a reader of its next frame."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    hub = EventHub(nc=bus, names=Names("t"), liveness_s=0.02, keepalive_s=60)

    async def events(request):
        return await hub.stream(request, "acme", "k1")

    app = web.Application()
    app.router.add_get("/events", events)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/events")

        async def frame() -> bytes:
            return await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)

        try:
            yield frame
        finally:
            response.close()


async def test_a_stream_says_when_the_bus_goes_away_and_when_it_is_back():
    bus = _Bus()
    async with _one_stream(bus) as frame:
        assert await frame() == b": connected\n\n"
        bus.is_connected = False
        assert await frame() == b'event: bus\ndata: {"connected":false}\n\n'
        bus.is_connected = True
        assert await frame() == b'event: bus\ndata: {"connected":true}\n\n'


async def test_a_stream_says_the_bus_went_away_also_when_it_came_back_between_two_looks():
    """nats-server restarted: nats-py is connected again within half a second, before the
    stream looks. Events of that gap never came, so the client is told all the same."""
    bus = _Bus()
    async with _one_stream(bus) as frame:
        assert await frame() == b": connected\n\n"
        bus.stats["reconnects"] += 1  # down and up again, unseen
        assert await frame() == b'event: bus\ndata: {"connected":false}\n\n'
        assert await frame() == b'event: bus\ndata: {"connected":true}\n\n'
