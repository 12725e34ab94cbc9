"""Webhook receivers and SSE clients that misbehave: they must never stall the notifier or
the gateway, hold back stored notifications or other tenants' webhooks, or leak.

The notifier runs as in test_notifier.py (real NATS and PostgreSQL, events published by
the test), with a short REDRIVE_WEBHOOK_TIMEOUT_S; the gateway as in test_gateway.py."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import socket
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from aiohttp import web
from sqlalchemy import text
from aiohttp.abc import AbstractResolver

from shared.db import make_engine
from services.notifier import repository
from services.notifier.destinations import Destinations, PublicOnlyResolver
from services.notifier.signing import verify
from services.notifier.webhooks import WebhookSender
from tests.integration.test_gateway import _sse, auth, gw  # noqa: F401  (gw: the gateway fixture)
from tests.integration.test_notifier import (SECRET, Notifier, Receiver, failed_file, run_event, running_notifier,
                                             tenant, wait_for)

TIMEOUT_S = 2.0  # REDRIVE_WEBHOOK_TIMEOUT_S
MAX_ATTEMPTS = 3  # REDRIVE_WEBHOOK_MAX_ATTEMPTS


@pytest.fixture(scope="module")
async def notifier(make_settings):
    settings = await make_settings(webhook_max_attempts=MAX_ATTEMPTS, webhook_timeout_s=TIMEOUT_S,
                                   webhook_allow_private=True)  # receivers on 127.0.0.1
    async with running_notifier(settings, "test-receivers") as running:
        yield running


class Rogue(Receiver):
    """A receiver whose answer is ``behave(rogue, request)``; whatever it waits on ends
    when the receiver closes (``released``)."""

    def __init__(self, behave) -> None:
        super().__init__([200])
        self.behave = behave
        self.times: list[float] = []
        self.released = asyncio.Event()

    async def __aexit__(self, *exc) -> None:
        self.released.set()
        await super().__aexit__(*exc)

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        self.times.append(time.monotonic())
        self.requests.append((dict(request.headers), await request.read()))
        return await self.behave(self, request)


async def hang(rogue: Rogue, request: web.Request) -> web.StreamResponse:
    await rogue.released.wait()
    return web.Response()


def answers(*responses):
    """Each request gets the next of ``responses`` (status, headers); the last one repeats."""
    queue = list(responses)

    async def behave(rogue: Rogue, request: web.Request) -> web.StreamResponse:
        status, headers = queue.pop(0) if len(queue) > 1 else queue[0]
        return web.Response(status=status, headers=headers)

    return behave


@contextlib.asynccontextmanager
async def raw_server(reply: bytes):
    """Not an HTTP server: reads the request, writes ``reply``, hangs up."""
    hits: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(await reader.read(65536))
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/hook", hits
    finally:
        server.close()
        await server.wait_closed()


async def deliveries(notifier: Notifier, t: str) -> list:
    return await notifier.sql("SELECT id, status, attempts, last_error, next_attempt_at, delivered_at, "
                              "next_attempt_at - now() AS due_in FROM notifier.deliveries WHERE tenant_id = :t "
                              "ORDER BY id", t=t)


async def settled(notifier: Notifier, t: str, timeout: float = 15) -> list:
    """The tenant's deliveries once none is pending any more."""
    async def done():
        rows = await deliveries(notifier, t)
        return rows if rows and all(r["status"] != "pending" for r in rows) else None

    return await wait_for(done, timeout)


def all_signed(requests) -> bool:
    return all(verify(SECRET, body, headers["X-Redrive-Signature"]) for headers, body in requests)


# ---- a receiver that hangs ----------------------------------------------------------------------

async def test_a_hanging_receiver_with_a_backlog_holds_back_neither_notifications_nor_other_tenants(notifier):
    stuck, other = tenant(), tenant()
    async with Rogue(hang) as hook, Receiver([200]) as fine:
        await notifier.call("put_webhook", tenant_id=stuck, url=hook.url, secret=SECRET)
        await notifier.call("put_webhook", tenant_id=other, url=fine.url, secret=SECRET)
        run_id = f"run-{uuid.uuid4().hex[:8]}"
        backlog = 260  # more than the sender ever has in flight
        await asyncio.gather(*(notifier.publish_event(failed_file(stuck, run_id, index=i)) for i in range(backlog)))

        async def hanging():
            return len(hook.requests) >= 10

        await wait_for(hanging)
        started = time.monotonic()
        await notifier.publish_event(run_event(other, "completed"))
        await notifier.wait_items(other, lambda items: items, timeout=TIMEOUT_S)
        stored_s = time.monotonic() - started

        async def received():
            return fine.requests

        [(headers, body)] = await wait_for(received, timeout=10)
        delivered_s = time.monotonic() - started
        assert stored_s < 1.0, f"the notification took {stored_s:.2f}s to be stored"
        assert delivered_s < TIMEOUT_S / 2, f"the other tenant's webhook waited {delivered_s:.2f}s"
        assert verify(SECRET, body, headers["X-Redrive-Signature"])
        stored = await notifier.sql("SELECT count(*) AS n FROM notifier.notifications WHERE tenant_id = :t", t=stuck)
        assert stored[0]["n"] == backlog  # all stored, none held back by the webhook
        await notifier.call("delete_webhook", tenant_id=stuck)  # its pending deliveries fail now
    assert [r["status"] for r in await deliveries(notifier, other)] == ["delivered"]
    assert len(fine.requests) == 1


async def test_a_receiver_that_stopped_answering_gets_one_post_at_a_time_until_it_answers(notifier):
    from services.notifier.webhooks import PER_TENANT

    t = tenant()
    async with Rogue(hang) as hook:
        await notifier.call("put_webhook", tenant_id=t, url=hook.url, secret=SECRET)
        run_id = f"run-{uuid.uuid4().hex[:8]}"
        await asyncio.gather(*(notifier.publish_event(failed_file(t, run_id, index=i)) for i in range(2 * PER_TENANT)))

        def first_wave() -> list[float]:  # what went out before any post could have timed out
            return [t for t in hook.times if t - hook.times[0] < TIMEOUT_S * 0.9]

        async def three_after_the_first_wave():
            return len(hook.times) >= len(first_wave()) + 3

        await wait_for(three_after_the_first_wave, timeout=6 * TIMEOUT_S + 5)
        # The first wave went out at once, nothing being known of the receiver yet (a
        # tenant's cap is checked per claim, so it may pass PER_TENANT by one claim)...
        wave = len(first_wave())
        assert PER_TENANT <= wave <= 2 * PER_TENANT
        # ...then, its posts timed out: one at a time, each after the one before gave up.
        later = hook.times[wave:wave + 3]
        gaps = [b - a for a, b in zip(later, later[1:])]
        assert all(gap > TIMEOUT_S * 0.8 for gap in gaps), gaps
        await notifier.call("delete_webhook", tenant_id=t)  # its pending deliveries fail now


async def test_a_receiver_slower_than_the_timeout_is_cut_off_each_attempt_then_given_up(notifier):
    t = tenant()
    async with Rogue(hang) as hook:
        await notifier.call("put_webhook", tenant_id=t, url=hook.url, secret=SECRET)
        await notifier.publish_event(run_event(t, "failed", message="boom", errored=3, succeeded=0))
        [row] = await settled(notifier, t, timeout=MAX_ATTEMPTS * (TIMEOUT_S + 1) + 5)
    assert (row["status"], row["attempts"]) == ("failed", MAX_ATTEMPTS)  # the give-up is recorded
    assert row["last_error"] == f"no answer within {TIMEOUT_S:g} s"
    assert len(hook.requests) == MAX_ATTEMPTS and all_signed(hook.requests)
    assert len({h["X-Redrive-Delivery"] for h, _ in hook.requests}) == 1
    gaps = [b - a for a, b in zip(hook.times, hook.times[1:])]
    assert all(TIMEOUT_S * 0.9 <= gap < TIMEOUT_S + 2 for gap in gaps), gaps


# ---- statuses, Retry-After and redirects ------------------------------------------------------------

async def test_retry_after_is_honoured_in_seconds_and_as_a_date_and_capped(notifier):
    seconds, date, huge = tenant(), tenant(), tenant()
    in_2s = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=2), usegmt=True)
    async with Rogue(answers((500, {}), (429, {"Retry-After": "1"}), (200, {}))) as a, \
            Rogue(answers((503, {"Retry-After": in_2s}), (200, {}))) as b, \
            Rogue(answers((429, {"Retry-After": "86400"}))) as c:
        for t, hook in ((seconds, a), (date, b), (huge, c)):
            await notifier.call("put_webhook", tenant_id=t, url=hook.url, secret=SECRET)
            await notifier.publish_event(run_event(t, "completed"))
        [row_a], [row_b] = await asyncio.gather(settled(notifier, seconds), settled(notifier, date))

        async def parked():
            rows = await deliveries(notifier, huge)
            return rows if rows and rows[0]["attempts"] == 1 and rows[0]["last_error"] else None

        [row_c] = await wait_for(parked)
        await notifier.call("delete_webhook", tenant_id=huge)
    assert (row_a["status"], row_a["attempts"], len(a.requests)) == ("delivered", 3, 3)
    assert a.times[1] - a.times[0] < 0.9  # no Retry-After: our own (10 ms) backoff
    assert a.times[2] - a.times[1] >= 0.95  # Retry-After: 1
    assert (row_b["status"], row_b["attempts"]) == ("delivered", 2)
    assert b.times[1] - b.times[0] >= 0.9  # an HTTP-date is honoured too
    assert row_c["last_error"] == "HTTP 429" and len(c.requests) == 1
    assert 3550 <= row_c["due_in"].total_seconds() <= 3601  # past the backoff maximum (300 s), capped at an hour, not a day
    assert all_signed(a.requests + b.requests + c.requests)


async def test_redirects_are_never_followed(notifier):
    temporary, permanent = tenant(), tenant()
    async with Receiver([200]) as target:
        async with Rogue(answers((307, {"Location": target.url}))) as a, \
                Rogue(answers((301, {"Location": target.url}))) as b:
            for t, hook in ((temporary, a), (permanent, b)):
                await notifier.call("put_webhook", tenant_id=t, url=hook.url, secret=SECRET)
                await notifier.publish_event(run_event(t, "completed"))
            [row_a], [row_b] = await asyncio.gather(settled(notifier, temporary), settled(notifier, permanent))
    assert target.requests == []
    assert (row_a["status"], row_a["attempts"], row_a["last_error"]) == ("failed", MAX_ATTEMPTS, "HTTP 307")
    assert (row_b["status"], row_b["attempts"], row_b["last_error"]) == ("failed", MAX_ATTEMPTS, "HTTP 301")


class _PublicLookingDNS(AbstractResolver):
    """``hooks.public.test`` resolves to 127.0.0.1 as if that were a public address; any
    other name goes through the real public-only resolver."""

    def __init__(self) -> None:
        self._real = PublicOnlyResolver()

    async def resolve(self, host, port=0, family=socket.AF_INET):
        if host == "hooks.public.test":
            return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0,
                     "flags": socket.AI_NUMERICHOST}]
        return await self._real.resolve(host, port, family)

    async def close(self) -> None:
        await self._real.close()


class _PublicLooking(Destinations):
    def resolver(self):
        return _PublicLookingDNS()


async def test_a_redirect_cannot_reach_a_private_address_when_private_ones_are_refused(make_settings):
    settings = await make_settings()
    assert not settings.webhook_allow_private
    engine = make_engine(settings, pool_size=2)
    sender = WebhookSender(engine, timeout_s=TIMEOUT_S, max_attempts=2, base_ms=10, destinations=_PublicLooking())
    try:
        async with contextlib.AsyncExitStack() as stack:
            private = await stack.enter_async_context(Receiver([200]))
            port = private.url.split(":")[2].split("/")[0]
            tenants = [tenant(), tenant()]
            for t, location in zip(tenants, (private.url, f"http://localhost:{port}/hook")):
                public = await stack.enter_async_context(Rogue(answers((302, {"Location": location}))))
                await repository.put_webhook(engine, t, public.url.replace("127.0.0.1", "hooks.public.test"), SECRET)
                await repository.record(engine, [{
                    "id": uuid.uuid4().hex, "tenant_id": t, "at": datetime.now(timezone.utc), "kind": "run_completed",
                    "run_id": "r", "file_index": None, "message": "m", "dedupe_key": uuid.uuid4().hex}])
            sender.start()

            async def finished():
                async with engine.connect() as conn:
                    rows = (await conn.execute(text("SELECT status, attempts, last_error FROM notifier.deliveries "
                                                    "WHERE status <> 'pending'"))).mappings().all()
                return rows if len(rows) == 2 else None

            rows = await wait_for(finished)
        assert [(r["status"], r["attempts"], r["last_error"]) for r in rows] == [("failed", 2, "HTTP 302")] * 2
        assert private.requests == []  # only the public hop was ever posted to
    finally:
        await sender.stop()
        await engine.dispose()


# ---- what comes back: big, garbled, cut short ---------------------------------------------------------

async def huge_body(rogue: Rogue, request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200)
    await response.prepare(request)
    chunk = b"x" * (1 << 20)
    for _ in range(64):  # 64 MiB, far more than anyone should read
        if rogue.released.is_set():
            break
        await response.write(chunk)
    return response


async def trickle(rogue: Rogue, request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Content-Length": "1000000"})
    await response.prepare(request)
    while not rogue.released.is_set():
        await response.write(b".")
        await asyncio.sleep(0.2)
    return response


async def garbage_200(rogue: Rogue, request: web.Request) -> web.StreamResponse:
    return web.Response(status=200, body=b"\x00\xff{not json at all", content_type="application/json")


async def cut_after_headers(rogue: Rogue, request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers={"Content-Length": "100"})
    await response.prepare(request)
    await response.write(b"0123456789")
    request.transport.close()
    return response


async def test_a_2xx_counts_whatever_its_body_and_anything_else_is_retried_then_given_up(notifier):
    accepting = {"huge": huge_body, "trickle": trickle, "garbage": garbage_200, "cut": cut_after_headers}
    tenants = {name: tenant() for name in [*accepting, "cut_status", "not_http"]}
    async with contextlib.AsyncExitStack() as stack:
        hooks = {name: await stack.enter_async_context(Rogue(behave)) for name, behave in accepting.items()}
        cut_url, cut_hits = await stack.enter_async_context(raw_server(b"HTTP/1.1 200 OK\r\nContent-Le"))
        junk_url, junk_hits = await stack.enter_async_context(raw_server(b"\x00\x01 garbage, not HTTP\r\n\r\n"))
        urls = {name: hook.url for name, hook in hooks.items()} | {"cut_status": cut_url, "not_http": junk_url}
        started = time.monotonic()
        for name, t in tenants.items():
            await notifier.call("put_webhook", tenant_id=t, url=urls[name], secret=SECRET)
            await notifier.publish_event(failed_file(t))
        rows = dict(zip(tenants, await asyncio.gather(*(settled(notifier, t) for t in tenants.values()))))
        took = time.monotonic() - started
    for name, hook in hooks.items():
        assert [(r["status"], r["attempts"]) for r in rows[name]] == [("delivered", 1)], name
        assert len(hook.requests) == 1 and all_signed(hook.requests), name  # delivered once, never again
    for name, hits in (("cut_status", cut_hits), ("not_http", junk_hits)):
        [row] = rows[name]
        assert (row["status"], row["attempts"]) == ("failed", MAX_ATTEMPTS), name
        assert row["last_error"] and len(hits) == MAX_ATTEMPTS, name
    assert took < TIMEOUT_S * 2, "a receiver's body held the sender"


# ---- SSE clients -----------------------------------------------------------------------------------

async def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def sse_socket(gw, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection to /events that has read the response head and ``: connected``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw["gateway"].port)
    writer.write(f"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b": connected"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    return reader, writer


async def test_many_sse_clients_that_disconnect_mid_stream_are_cleaned_up_and_the_hub_unsubscribes(gw):
    hub, http, nc, names = gw["gateway"].hub, gw["http"], gw["nc"], gw["names"]
    clients = await asyncio.gather(*(sse_socket(gw, gw["keys"]["member"]) for _ in range(150)))
    assert hub.clients == 150 and hub._subs
    started = time.monotonic()
    assert (await http.get("/healthz")).status == 200
    assert time.monotonic() - started < 1.0
    for _, writer in clients:  # gone without a word, in the middle of the stream
        writer.transport.abort()
    await nc.publish(names.run_event("completed"), json.dumps({"tenant_id": gw["acme"], "run_id": "r"}).encode())
    await nc.flush()
    await wait_until(lambda: hub.clients == 0, timeout=5)
    assert not hub._subs  # nobody listens: the hub unsubscribed
    metrics = await (await http.get("/metrics")).text()
    assert "redrive_sse_clients 0.0" in metrics


async def test_an_sse_client_that_never_reads_holds_nobody_up_and_is_dropped(gw, monkeypatch):
    hub, http, nc, names = gw["gateway"].hub, gw["http"], gw["nc"], gw["names"]
    monkeypatch.setattr(hub, "_write_timeout_s", 1.0)
    _, stuck = await sse_socket(gw, gw["keys"]["member"])  # never reads a byte more
    out, connected = [], asyncio.Event()
    reader = asyncio.create_task(_sse(http, gw["keys"]["member"], out, connected, until="breaker.open"))
    await asyncio.wait_for(connected.wait(), 10)
    pad = "x" * 50_000
    for i in range(400):  # 20 MB: far more than the socket buffers of the client that never reads
        await nc.publish(names.run_event("started"), json.dumps({"tenant_id": gw["acme"], "i": i, "pad": pad}).encode(),
                         headers={"Redrive-Tenant": gw["acme"]})
    await nc.publish(names.breaker_event("open"), json.dumps({"tenant_id": gw["acme"], "dependency": "ocr",
                                                              "state": "open"}).encode())
    await nc.flush()
    await asyncio.wait_for(reader, 15)  # the reading client got everything, the marker last
    assert len(out) == 401 and out[-1][0] == "breaker.open"
    started = time.monotonic()
    assert (await http.get("/healthz")).status == 200 and time.monotonic() - started < 1.0
    # The reader has left: an idle stream notices at its next write (an event or the keepalive).
    await nc.publish(names.breaker_event("closed"), json.dumps({"tenant_id": gw["acme"], "dependency": "ocr",
                                                                "state": "closed"}).encode())
    await wait_until(lambda: hub.clients == 0, timeout=10)  # and the stuck client was let go
    assert not hub._subs
    stuck.transport.abort()
