"""The notifier over real NATS and PostgreSQL: events in, notifications listed, webhooks
posted and signed. Events are published into the events stream by the test itself."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field

import orjson
import pytest
from aiohttp import web
from sqlalchemy import text

from shared import bus, streams
from shared.errors import TransientError
from shared.messages import ErrorInfo, FileEvent, RunEvent, ServiceError
from shared.rpc import RpcClient
from shared.settings import Settings
from shared.subjects import Names
from services.coordinator.run_events import file_failed_row
from services.notifier.bootstrap import NotifierService
from services.notifier.consumer import make_handler
from services.notifier.signing import verify
from tests.stack import expect_error

SECRET = "a-webhook-secret-of-32-characters"


@dataclass
class Notifier:
    service: NotifierService
    names: Names
    js: object
    rpc: RpcClient

    async def call(self, verb: str, **payload):
        return await self.rpc.call("notifier", verb, payload)

    async def publish(self, subject: str, data: bytes, msg_id: str | None = None) -> None:
        await self.js.publish(subject, data, headers={"Nats-Msg-Id": msg_id or uuid.uuid4().hex})

    async def publish_event(self, event: FileEvent | RunEvent, msg_id: str | None = None) -> None:
        subject = (self.names.file_event(event.kind) if isinstance(event, FileEvent) else self.names.run_event(event.kind))
        await self.publish(subject, event.to_bytes(), msg_id or event.msg_id)

    async def items(self, tenant: str, **kw) -> list[dict]:
        return (await self.call("list", tenant_id=tenant, limit=200, **kw))["items"]

    async def wait_items(self, tenant: str, until, timeout: float = 10) -> list[dict]:
        """Poll ``list`` until ``until(items)`` holds (bounded, 50 ms steps)."""
        deadline = time.monotonic() + timeout
        while True:
            items = await self.items(tenant)
            if until(items):
                return items
            if time.monotonic() > deadline:
                raise AssertionError(f"notifications of {tenant} never satisfied the condition: {items}")
            await asyncio.sleep(0.05)

    async def sql(self, query: str, **params) -> list:
        async with self.service.engine.connect() as conn:
            return (await conn.execute(text(query), params)).mappings().all()


@contextlib.asynccontextmanager
async def running_notifier(settings: Settings, client: str):
    service = NotifierService(settings, webhook_base_ms=10)  # retries within a test's patience
    await service.start()
    nc = await bus.connect(settings, client)
    js = nc.jetstream()
    await streams.ensure_streams(js, settings)
    try:
        yield Notifier(service, Names(settings.prefix), js, RpcClient(nc, Names(settings.prefix), timeout=10))
    finally:
        await nc.close()
        await service.stop()


@pytest.fixture(scope="module")
async def notifier(make_settings):
    settings = await make_settings(webhook_max_attempts=4, webhook_allow_private=True)  # receivers on 127.0.0.1
    async with running_notifier(settings, "test-notifier") as running:
        yield running


def tenant() -> str:
    return f"ten-{uuid.uuid4().hex[:8]}"


def file_event(tenant_id: str, run_id: str | None = None, index: int = 3, kind: str = "failed") -> FileEvent:
    """What an executor publishes about a file (the coordinator decides what it means)."""
    run_id = run_id or f"run-{uuid.uuid4().hex[:8]}"
    return FileEvent(kind=kind, job_id=f"{run_id}:file:{index}:r1", run_id=run_id, tenant_id=tenant_id,
                     file_index=index, round=1, attempt=4, step=1, step_name="ocr",
                     error=ErrorInfo.model_validate({"class": "Boom", "message": "the scanner broke", "transient": False}))


def failed_file(tenant_id: str, run_id: str | None = None, index: int = 3) -> RunEvent:
    """The coordinator's word that it made a file FAILED (run.file_failed)."""
    event = file_event(tenant_id, run_id, index)
    return RunEvent.from_bytes(file_failed_row(Names("x"), {"id": event.run_id, "tenant_id": tenant_id,
                                                           "status": "RUNNING"}, event)["payload"])


def run_event(tenant_id: str, kind: str, run_id: str | None = None, message: str | None = None, **counts) -> RunEvent:
    c = {"total": 3, "pending": 0, "succeeded": 3, "failed": 0, "errored": 0, "skipped": 0, "cancelled": 0} | counts
    return RunEvent(kind=kind, run_id=run_id or f"run-{uuid.uuid4().hex[:8]}", tenant_id=tenant_id, round=1,
                    status=kind.upper(), counts=c, message=message)


@dataclass
class FakeMsg:
    """Enough of a nats Msg for the batch handler; records what was done to it."""
    subject: str
    data: bytes
    headers: dict
    done: list = field(default_factory=list)

    async def ack(self) -> None:
        self.done.append("ack")

    async def term(self) -> None:
        self.done.append("term")


# ---- events become notifications ------------------------------------------------------------

async def test_a_failed_file_notifies_step_failed_after_multiple_attempts(notifier):
    t = tenant()
    event = failed_file(t)
    await notifier.publish_event(event)
    [item] = await notifier.wait_items(t, lambda items: items)
    assert item["kind"] == "file_failed" and item["run_id"] == event.run_id and item["file_index"] == 3
    assert item["message"].startswith("Step failed after multiple attempts")
    assert "'ocr'" in item["message"] and "the scanner broke" in item["message"]
    assert item["read"] is False and set(item) == {"id", "at", "kind", "run_id", "file_index", "message", "read"}


async def test_a_completed_run_notifies_exactly_once(notifier):
    t = tenant()
    event = run_event(t, "completed")
    await notifier.publish_event(event)
    await notifier.publish_event(event)  # same Nats-Msg-Id: the stream keeps one
    await notifier.publish_event(run_event(t, "cancelled", succeeded=1, cancelled=2))  # a later event: a barrier
    items = await notifier.wait_items(t, lambda items: len(items) >= 2)
    completed = [i for i in items if i["kind"] == "run_completed"]
    assert [i["message"] for i in completed] == ["Run finished: all 3 files succeeded"]
    assert any(i["kind"] == "run_cancelled" for i in items) and len(items) == 2


@pytest.mark.parametrize(("kind", "counts", "message", "expected"), [
    ("completed_with_errors", {"succeeded": 2, "failed": 1}, None, "Run finished with errors: 2 succeeded, 1 failed of 3 files"),
    ("failed", {"succeeded": 0, "errored": 1, "pending": 2}, "fail_fast: a file failed after its retries",
     "Run failed: fail_fast: a file failed after its retries (1 errored, 2 pending of 3 files)"),
    ("recovery_started", {}, "Recovery started", "Recovery started"),
    ("recovered", {}, "Recovery succeeded: the run finished", "Recovery succeeded: 3 succeeded of 3 files"),
    ("recovery_failed", {"succeeded": 0, "pending": 3}, "stuck after 3 recoveries", "Recovery failed: stuck after 3 recoveries"),
])
async def test_run_outcomes_and_recovery_notify_in_words(notifier, kind, counts, message, expected):
    t = tenant()
    await notifier.publish_event(run_event(t, kind, message=message, **counts))
    [item] = await notifier.wait_items(t, lambda items: items)
    assert (item["kind"], item["message"]) == (f"run_{kind}", expected)


async def test_progress_events_notify_nobody(notifier):
    t = tenant()
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    # The executor's "failed" too: a file is FAILED when the coordinator says so (run.file_failed).
    for kind in ("succeeded", "retrying", "checkpoint", "errored", "failed"):
        await notifier.publish_event(file_event(t, run_id, kind=kind))
    for kind in ("started", "retrying"):
        await notifier.publish_event(run_event(t, kind, run_id))
    await notifier.publish(notifier.names.breaker_event("open"), b'{"dependency": "ocr", "state": "open"}')
    await notifier.publish_event(failed_file(t, run_id, index=9))  # published last: a barrier
    items = await notifier.wait_items(t, lambda items: items)
    assert [(i["kind"], i["file_index"]) for i in items] == [("file_failed", 9)]


async def test_an_unreadable_event_is_dropped_and_the_events_after_it_still_notify(notifier):
    t = tenant()
    await notifier.publish(notifier.names.run_event("file_failed"), b"not json")
    await notifier.publish(notifier.names.run_event("completed"), b'{"kind": "completed"}')  # no tenant, no run
    await notifier.publish_event(run_event(t, "completed"))
    [item] = await notifier.wait_items(t, lambda items: items)
    assert item["kind"] == "run_completed"
    bad = FakeMsg(notifier.names.run_event("file_failed"), b"{", {"Nats-Msg-Id": uuid.uuid4().hex})
    good = FakeMsg(notifier.names.file_event("succeeded"), b"", {"Nats-Msg-Id": uuid.uuid4().hex})
    await notifier.service.handle([bad, good])
    assert (bad.done, good.done) == (["term"], ["ack"])


async def test_a_redelivered_event_notifies_once_and_is_acked_each_time(notifier):
    t = tenant()
    event = failed_file(t)
    msg_id = event.msg_id
    subject = notifier.names.run_event("file_failed")
    first = FakeMsg(subject, event.to_bytes(), {"Nats-Msg-Id": msg_id})
    again = FakeMsg(subject, event.to_bytes(), {"Nats-Msg-Id": msg_id})
    twice_in_a_batch = FakeMsg(subject, event.to_bytes(), {"Nats-Msg-Id": msg_id})
    await notifier.service.handle([first])
    await notifier.service.handle([again, twice_in_a_batch])
    assert first.done == again.done == twice_in_a_batch.done == ["ack"]
    assert len(await notifier.items(t)) == 1
    assert len(await notifier.sql("SELECT 1 FROM notifier.notifications WHERE dedupe_key = :k", k=msg_id)) == 1


async def test_a_database_outage_leaves_the_batch_unacked_for_redelivery(notifier):
    async def unavailable(engine, rows):
        raise TransientError("database unavailable")

    handle = make_handler(notifier.service.engine, notifier.names, lambda: None, record=unavailable)
    event = run_event(tenant(), "completed")
    msgs = [FakeMsg(notifier.names.run_event("completed"), event.to_bytes(), {"Nats-Msg-Id": event.msg_id}),
            FakeMsg(notifier.names.file_event("succeeded"), b"", {"Nats-Msg-Id": uuid.uuid4().hex})]
    with pytest.raises(TransientError):
        await handle(msgs)
    assert [m.done for m in msgs] == [[], []]


# ---- the verbs ------------------------------------------------------------------------------

async def test_mark_read_marks_one_and_unread_only_lists_the_rest(notifier):
    t = tenant()
    for index in (1, 2):
        await notifier.publish_event(failed_file(t, index=index))
    items = await notifier.wait_items(t, lambda items: len(items) == 2)
    marked = await notifier.call("mark_read", tenant_id=t, id=items[0]["id"])
    assert marked["read"] is True and marked["id"] == items[0]["id"]
    unread = (await notifier.call("list", tenant_id=t, unread_only=True))["items"]
    assert [i["id"] for i in unread] == [items[1]["id"]]
    await notifier.call("mark_read", tenant_id=t, id=items[0]["id"])  # again: still fine


async def test_pages_are_newest_first_and_cursors_walk_them_all(notifier):
    t = tenant()
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    for index in range(5):
        await notifier.publish_event(failed_file(t, run_id, index=index))
    everything = await notifier.wait_items(t, lambda items: len(items) == 5)
    assert [i["file_index"] for i in everything] == [4, 3, 2, 1, 0]
    seen, cursor = [], None
    while True:
        page = await notifier.call("list", tenant_id=t, limit=2, cursor=cursor)
        seen += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [i["id"] for i in seen] == [i["id"] for i in everything]
    await expect_error("validation_error", notifier.call("list", tenant_id=t, cursor="not-a-cursor"))
    await expect_error("validation_error", notifier.call("list", tenant_id=t, limit=201))


async def test_tenants_never_see_or_mark_each_others_notifications(notifier):
    mine, theirs = tenant(), tenant()
    await notifier.publish_event(failed_file(mine))
    [item] = await notifier.wait_items(mine, lambda items: items)
    assert await notifier.items(theirs) == []
    error = await expect_error("not_found", notifier.call("mark_read", tenant_id=theirs, id=item["id"]))
    assert isinstance(error, ServiceError)
    assert (await notifier.items(mine))[0]["read"] is False


async def test_webhook_urls_and_secrets_are_validated(notifier):
    t = tenant()
    for url in ("ftp://example.com/hook", "not a url", "http://", "https://exa mple.com/", "http://example.com:99999/"):
        await expect_error("validation_error", notifier.call("put_webhook", tenant_id=t, url=url, secret=SECRET))
    await expect_error("validation_error", notifier.call("put_webhook", tenant_id=t, url="https://example.com/h",
                                                         secret="too-short"))
    assert await notifier.call("get_webhook", tenant_id=t) is None


# ---- webhooks -------------------------------------------------------------------------------

class Receiver:
    """A local webhook endpoint (127.0.0.1 only) answering with the statuses it is given."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[dict, bytes]] = []

    async def __aenter__(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return web.Response(status=status)


async def wait_for(condition, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not (result := await condition()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
    return result


async def test_a_webhook_receives_each_notification_signed(notifier):
    t = tenant()
    async with Receiver([200]) as hook:
        put = await notifier.call("put_webhook", tenant_id=t, url=hook.url, secret=SECRET)
        assert put["url"] == hook.url and "secret" not in put and put["updated_at"]
        assert (await notifier.call("get_webhook", tenant_id=t))["url"] == hook.url
        await notifier.publish_event(failed_file(t))
        [item] = await notifier.wait_items(t, lambda items: items)

        async def received():
            return hook.requests

        [(headers, body)] = await wait_for(received)
    assert headers["Content-Type"] == "application/json"
    assert verify(SECRET, body, headers["X-Redrive-Signature"])
    assert not verify("another-secret-16chars", body, headers["X-Redrive-Signature"])
    sent = orjson.loads(body)
    assert sent["id"] == item["id"] and sent["tenant_id"] == t and sent["kind"] == "file_failed"
    assert sent["message"] == item["message"] and sent["at"] == item["at"]
    [delivery] = await notifier.sql("SELECT public_id, status, attempts, delivered_at FROM notifier.deliveries "
                                    "WHERE tenant_id = :t", t=t)
    assert headers["X-Redrive-Delivery"] == str(delivery["public_id"])


async def test_a_failing_webhook_is_retried_with_backoff_until_delivered(notifier):
    t = tenant()
    async with Receiver([500, 500, 200]) as hook:
        await notifier.call("put_webhook", tenant_id=t, url=hook.url, secret=SECRET)
        await notifier.publish_event(run_event(t, "completed"))

        async def delivered():
            rows = await notifier.sql("SELECT status, attempts, last_error, delivered_at FROM notifier.deliveries "
                                      "WHERE tenant_id = :t", t=t)
            return rows if rows and rows[0]["status"] == "delivered" else None

        [row] = await wait_for(delivered)
    assert row["attempts"] == 3 and row["delivered_at"] is not None and row["last_error"] is None
    assert len(hook.requests) == 3
    assert len({h["X-Redrive-Delivery"] for h, _ in hook.requests}) == 1  # one delivery, three attempts
    assert all(verify(SECRET, body, h["X-Redrive-Signature"]) for h, body in hook.requests)


async def test_a_webhook_that_never_answers_2xx_fails_after_max_attempts(notifier):
    t = tenant()
    async with Receiver([503]) as hook:
        await notifier.call("put_webhook", tenant_id=t, url=hook.url, secret=SECRET)
        await notifier.publish_event(run_event(t, "completed"))

        async def failed():
            rows = await notifier.sql("SELECT status, attempts, last_error FROM notifier.deliveries WHERE tenant_id = :t",
                                      t=t)
            return rows if rows and rows[0]["status"] == "failed" else None

        [row] = await wait_for(failed)
    assert row["attempts"] == notifier.service.settings.webhook_max_attempts == len(hook.requests)
    assert row["last_error"] == "HTTP 503"


async def test_a_deleted_webhook_is_forgotten_and_gets_nothing_more(notifier):
    t = tenant()
    await notifier.call("put_webhook", tenant_id=t, url="https://example.invalid/hook", secret=SECRET)
    assert await notifier.call("delete_webhook", tenant_id=t) == {"deleted": True}
    assert await notifier.call("get_webhook", tenant_id=t) is None
    assert await notifier.call("delete_webhook", tenant_id=t) == {"deleted": False}
    await notifier.publish_event(failed_file(t))
    await notifier.wait_items(t, lambda items: items)
    assert await notifier.sql("SELECT 1 FROM notifier.deliveries WHERE tenant_id = :t", t=t) == []


async def test_failed_deliveries_are_listed_with_their_cause_and_sent_again_once_the_receiver_is_mended(notifier):
    t = tenant()
    async with Receiver([503]) as hook:
        await notifier.call("put_webhook", tenant_id=t, url=hook.url, secret=SECRET)
        first, second = run_event(t, "completed"), run_event(t, "failed", message="boom")
        for event in (first, second):
            await notifier.publish_event(event)

        async def listed(status):
            page = await notifier.call("list_deliveries", tenant_id=t, status=status)
            return page["items"] if len(page["items"]) == 2 else None

        failed = await wait_for(lambda: listed("failed"))
        assert {d["run_id"] for d in failed} == {first.run_id, second.run_id}
        assert {d["kind"] for d in failed} == {"run_completed", "run_failed"}
        for d in failed:
            # Where it went, not the whole URL (a secret, often): members list deliveries too.
            origin = hook.url[:hook.url.index("/", len("http://"))]
            assert (d["attempts"], d["last_error"], d["url"], d["next_attempt_at"]) == (4, "HTTP 503", origin, None)
        # Newest first, a page at a time.
        page = await notifier.call("list_deliveries", tenant_id=t, limit=1)
        rest = await notifier.call("list_deliveries", tenant_id=t, limit=1, cursor=page["next_cursor"])
        assert [page["items"][0]["id"], rest["items"][0]["id"]] == [d["id"] for d in failed]
        assert rest["next_cursor"] is None
        assert await notifier.call("list_deliveries", tenant_id=tenant()) == {"items": [], "next_cursor": None}

        hook.statuses = [200]
        hook.requests.clear()
        assert await notifier.call("redeliver_failed", tenant_id=t) == {"queued": 2}
        delivered = await wait_for(lambda: listed("delivered"))
        assert all(d["attempts"] == 1 and d["last_error"] is None and d["delivered_at"] for d in delivered)
        # Each sent again as the same delivery, signed: a receiver that got it before drops it.
        assert sorted(h["X-Redrive-Delivery"] for h, _ in hook.requests) == sorted(d["id"] for d in failed)
        assert all(verify(SECRET, body, h["X-Redrive-Signature"]) for h, body in hook.requests)

        # One delivered delivery, sent again on request.
        again = await notifier.call("redeliver", tenant_id=t, delivery_id=failed[0]["id"])
        assert again["status"] == "pending" and again["attempts"] == 0

        async def resent():
            return [h for h, _ in hook.requests if h["X-Redrive-Delivery"] == failed[0]["id"]][1:]

        await wait_for(resent)
    await expect_error("not_found", notifier.call("redeliver", tenant_id=tenant(), delivery_id=failed[0]["id"]))
    await expect_error("not_found", notifier.call("redeliver", tenant_id=t, delivery_id=str(uuid.uuid4())))
    await expect_error("validation_error", notifier.call("list_deliveries", tenant_id=t, cursor="x"))
    await notifier.call("delete_webhook", tenant_id=t)
    await expect_error("conflict", notifier.call("redeliver_failed", tenant_id=t))


async def test_a_receiver_that_refuses_connections_is_named_in_words(notifier):
    t = tenant()
    async with Receiver([200]) as hook:
        closed_url = hook.url  # the port is closed once the receiver is gone
    await notifier.call("put_webhook", tenant_id=t, url=closed_url, secret=SECRET)
    await notifier.publish_event(run_event(t, "completed"))

    async def failed():
        items = (await notifier.call("list_deliveries", tenant_id=t, status="failed"))["items"]
        return items or None

    [d] = await wait_for(failed)
    assert d["last_error"].startswith("ClientConnectorError: Cannot connect to host 127.0.0.1:"), d["last_error"]


async def test_a_pending_delivery_is_not_queued_twice(notifier):
    t = tenant()
    await notifier.call("put_webhook", tenant_id=t, url="https://example.invalid/hook", secret=SECRET)
    async with notifier.service.engine.begin() as conn:  # one delivery waiting for its next attempt
        await conn.execute(text("INSERT INTO notifier.deliveries (notification_id, tenant_id, url, body, attempts, "
                                "next_attempt_at) VALUES ('n1', :t, 'https://example.invalid/hook', '\\x7b7d', 1, "
                                "now() + interval '1 hour')"), {"t": t})
    [pending] = (await notifier.call("list_deliveries", tenant_id=t, status="pending"))["items"]
    assert pending["next_attempt_at"] and pending["kind"] is None  # its notification is not joined: none was stored
    await expect_error("conflict", notifier.call("redeliver", tenant_id=t, delivery_id=pending["id"]))
    assert (await notifier.call("redeliver_failed", tenant_id=t)) == {"queued": 0}


# ---- retention ------------------------------------------------------------------------------

_OLD_AND_NEW = """
INSERT INTO notifier.notifications (id, tenant_id, at, kind, message, dedupe_key) VALUES
  ('n-old', 't', now() - interval '91 days', 'run_completed', 'old', 'n-old'),
  ('n-new', 't', now() - interval '89 days', 'run_completed', 'recent', 'n-new');
INSERT INTO notifier.deliveries (notification_id, tenant_id, url, body, status, delivered_at, next_attempt_at, last_error)
VALUES
  ('d-delivered-old', 't', 'https://example.com/h', '{}', 'delivered', now() - interval '31 days', now() - interval '31 days', NULL),
  ('d-failed-old', 't', 'https://example.com/h', '{}', 'failed', NULL, now() - interval '31 days', 'HTTP 500'),
  ('d-delivered-new', 't', 'https://example.com/h', '{}', 'delivered', now() - interval '29 days', now() - interval '29 days', NULL),
  ('d-pending-old', 't', 'https://example.com/h', '{}', 'pending', NULL, now() - interval '40 days', 'HTTP 503');
"""


async def test_old_notifications_and_ended_deliveries_are_forgotten_and_pending_ones_kept(make_settings):
    from shared.db import make_engine
    from services.notifier.retention import DAY_S, prune

    settings = await make_settings()  # no notifier runs here: its sender would claim the pending delivery
    engine = make_engine(settings, pool_size=1)
    ages = {"notifications_older_than_s": 90 * DAY_S, "deliveries_older_than_s": 30 * DAY_S}
    try:
        async with engine.begin() as conn:
            for statement in _OLD_AND_NEW.strip().split(";\n"):
                await conn.execute(text(statement))
        # A pass is bounded (here one row a table) and says that some are left...
        assert await prune(engine, **ages, batch=1, max_batches=1) == ({"notifications": 1, "deliveries": 1}, True)
        # ...and the next one finishes.
        assert await prune(engine, **ages, batch=1, max_batches=5) == ({"notifications": 0, "deliveries": 1}, False)
        async with engine.connect() as conn:
            notifications = set((await conn.execute(text("SELECT id FROM notifier.notifications"))).scalars())
            deliveries = set((await conn.execute(text("SELECT notification_id FROM notifier.deliveries"))).scalars())
        assert notifications == {"n-new"}
        assert deliveries == {"d-delivered-new", "d-pending-old"}  # still owed, however old
    finally:
        await engine.dispose()


async def test_the_notifier_prunes_when_it_starts(make_settings):
    from shared.db import make_engine

    settings = await make_settings(notification_retention_days=1)
    engine = make_engine(settings, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO notifier.notifications (id, tenant_id, at, kind, message, dedupe_key) VALUES "
                "('stale', 't', now() - interval '25 hours', 'run_completed', 'old', 'stale'), "
                "('fresh', 't', now() - interval '23 hours', 'run_completed', 'recent', 'fresh')"))
    finally:
        await engine.dispose()
    async with running_notifier(settings, "test-retention") as running:
        deadline = time.monotonic() + 10
        while running.service.retention.passes < 1:  # its first pass runs at start
            assert time.monotonic() < deadline, "no retention pass within 10 s of starting"
            await asyncio.sleep(0.02)
        assert [r["id"] for r in await running.sql("SELECT id FROM notifier.notifications")] == ["fresh"]
