"""What a tenant sees of the notifier over HTTP gives away nothing of other tenants, and
filters as asked:

* a webhook delivery is known by an opaque public id (a random UUID), never by the bigserial
  every tenant shares (whose values told a receiver how many deliveries the others got): in
  ``X-Redrive-Delivery``, in ``GET /webhook/deliveries`` (items and cursor) and in
  ``POST /webhook/deliveries/{id}/redeliver``, which keeps it;
* ``GET /notifications?unread=false`` lists the read ones only (as ``?needs_attention=false``
  of runs), ``unread=true`` the unread ones, neither all of them;
* migration n0005 gives the deliveries already kept their public ids, and goes down again.

The notifier and the gateway run over real NATS and PostgreSQL; events are published by
the test itself, as in test_notifier.py."""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import datetime, timezone

import aiohttp
import asyncpg
import pytest

from shared import streams
from shared.db import make_engine
from shared.messages import FileEvent, RunEvent
from services.gateway.identity import create_key, create_tenant
from tests.integration.test_notifier import SECRET, Receiver, failed_file, run_event, wait_for
from tests.stack import Stack

API = "/api/v1"


@pytest.fixture(scope="module")
async def system(make_settings):
    settings = await make_settings(port=0, webhook_allow_private=True, webhook_max_attempts=2)  # receivers on 127.0.0.1
    stack = await Stack(settings).start("notifier", "gateway")
    await streams.ensure_streams(stack.js, settings)
    engine = make_engine(settings, pool_size=1)
    tenants = {name: await create_tenant(engine, name) for name in ("acme", "globex")}
    keys = {name: await create_key(engine, t, "tenant_admin", name) for name, t in tenants.items()}
    await engine.dispose()
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{stack.services['gateway'][0].port}") as http:
        yield System(http, stack, tenants, keys, settings)
    await stack.stop()


class System:
    def __init__(self, http, stack, tenants, keys, settings) -> None:
        self.http, self.stack, self.tenants, self.keys, self.settings = http, stack, tenants, keys, settings

    async def ask(self, method: str, path: str, who: str, status: int | None = 200, **kw):
        async with self.http.request(method, API + path, headers={"Authorization": f"Bearer {self.keys[who]}"},
                                     **kw) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
        assert r.status < 500, (method, path, r.status, body)  # never a server error
        if status is not None:
            assert r.status == status, (method, path, r.status, body)
        return body

    async def publish(self, event: FileEvent | RunEvent) -> None:
        names = self.stack.names
        subject = names.file_event(event.kind) if isinstance(event, FileEvent) else names.run_event(event.kind)
        await self.stack.js.publish(subject, event.to_bytes(), headers={"Nats-Msg-Id": event.msg_id})

    async def sql(self, query: str, *args) -> list:
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()


def a_public_id(value) -> bool:
    """A random (version 4) UUID in its canonical form: nothing that counts anything."""
    try:
        parsed = uuid.UUID(value)
    except (TypeError, ValueError, AttributeError):
        return False
    return str(parsed) == value and parsed.version == 4


def cursor_text(cursor: str) -> str:
    return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()


# ---- deliveries: a public id, the same everywhere a tenant sees it ----------------------------

async def test_deliveries_are_known_by_random_public_ids_that_redelivery_keeps(system):
    async with Receiver([200]) as acme_hook, Receiver([200]) as globex_hook:
        hooks = {"acme": acme_hook, "globex": globex_hook}
        for who, hook in hooks.items():
            await system.ask("PUT", "/webhook", who, json={"url": hook.url, "secret": SECRET})
        # Interleaved: with a shared sequence, acme's receiver would see a gap where globex's went.
        for who in ("acme", "globex", "acme", "globex", "acme"):
            await system.publish(run_event(system.tenants[who], "completed"))

        async def all_sent():
            return all(len(hooks[w].requests) >= n for w, n in (("acme", 3), ("globex", 2)))

        await wait_for(all_sent)

        async def all_delivered(who, n):
            page = await system.ask("GET", "/webhook/deliveries", who, params={"status": "delivered"})
            return page["items"] if len(page["items"]) == n else None

        listed = {who: await wait_for(lambda who=who: all_delivered(who, len(hooks[who].requests))) for who in hooks}
        headers = {who: [h["X-Redrive-Delivery"] for h, _ in hook.requests] for who, hook in hooks.items()}
        internal = {who: {str(r["id"]) for r in await system.sql(
            "SELECT id FROM notifier.deliveries WHERE tenant_id = $1", system.tenants[who])} for who in hooks}
        for who in hooks:
            assert all(a_public_id(h) for h in headers[who]), headers[who]
            assert not any(h.isdigit() for h in headers[who])
            # What the receiver got is what the tenant lists, and nothing of the bigserial.
            assert sorted(d["id"] for d in listed[who]) == sorted(headers[who])
            assert not internal[who] & set(headers[who])
        assert not set(headers["acme"]) & set(headers["globex"])

        # Pages: the cursor names the last one's position by its public id, not the bigserial.
        first = await system.ask("GET", "/webhook/deliveries", "acme", params={"limit": "2"})
        assert first["next_cursor"] and cursor_text(first["next_cursor"]).endswith("|" + first["items"][-1]["id"])
        rest = await system.ask("GET", "/webhook/deliveries", "acme", params={"limit": "2", "cursor": first["next_cursor"]})
        assert [d["id"] for d in first["items"] + rest["items"]] == [d["id"] for d in listed["acme"]]
        assert rest["next_cursor"] is None
        for old_style in sorted(internal["acme"]):  # a cursor that was the bigserial is no cursor now
            body = await system.ask("GET", "/webhook/deliveries", "acme", 422, params={"cursor": old_style})
            assert body["error"]["code"] == "validation_error" and "cursor" in body["error"]["details"]["fields"]

        # Sent again by its public id: the same delivery, the same header.
        again = listed["acme"][-1]
        before = len(acme_hook.requests)
        redelivered = await system.ask("POST", f"/webhook/deliveries/{again['id']}/redeliver", "acme")
        assert redelivered["id"] == again["id"] and redelivered["status"] == "pending"

        async def resent():
            return acme_hook.requests[before:]

        [(resent_headers, _)] = await wait_for(resent)
        assert resent_headers["X-Redrive-Delivery"] == again["id"]
        delivered = await wait_for(lambda: all_delivered("acme", 3))
        assert sorted(d["id"] for d in delivered) == sorted(headers["acme"])  # no new one

    # Another tenant's public id looks exactly like a missing one.
    for theirs in headers["globex"]:
        body = await system.ask("POST", f"/webhook/deliveries/{theirs}/redeliver", "acme", 404)
        assert body["error"]["code"] == "not_found" and body["error"]["message"]
    # So does an integer, the bigserial of one's own delivery included, and anything not a UUID.
    for wrong in sorted(internal["acme"]) + ["1", "0", "9223372036854775807", "99999999999999999999", "-1", "1.5",
                                             "x", str(uuid.uuid4()), "%20"]:
        body = await system.ask("POST", f"/webhook/deliveries/{wrong}/redeliver", "acme", 404)
        assert body["error"]["code"] == "not_found", (wrong, body)
    body = await system.ask("POST", f"/webhook/deliveries/{'a' * 201}/redeliver", "acme", 422)
    assert "delivery_id" in body["error"]["details"]["fields"]


# ---- GET /notifications?unread= ---------------------------------------------------------------

async def test_unread_false_lists_the_read_ones_true_the_unread_ones_and_unset_all(system):
    await system.ask("DELETE", "/webhook", "globex")
    tenant_id = system.tenants["globex"]
    before = {n["id"] for n in (await system.ask("GET", "/notifications", "globex"))["items"]}
    for index in range(3):
        await system.publish(failed_file(tenant_id, index=index))

    async def recorded():
        items = (await system.ask("GET", "/notifications", "globex", params={"limit": "200"}))["items"]
        return [n for n in items if n["id"] not in before] if len(items) >= len(before) + 3 else None

    mine = await wait_for(recorded)
    for n in (await system.ask("GET", "/notifications", "globex", params={"limit": "200"}))["items"]:
        if n["id"] in before:  # the webhook test's: read too, so that "unread" means the new ones
            await system.ask("POST", f"/notifications/{n['id']}/read", "globex")
    read = mine[1]["id"]
    await system.ask("POST", f"/notifications/{read}/read", "globex")

    async def listed(**params) -> list[dict]:
        return (await system.ask("GET", "/notifications", "globex", params={"limit": "200", **params}))["items"]

    everything, only_read, only_unread = await listed(), await listed(unread="false"), await listed(unread="true")
    assert {n["id"] for n in everything} == before | {n["id"] for n in mine}
    assert {n["id"] for n in only_read} == before | {read} and all(n["read"] for n in only_read)
    assert {n["id"] for n in only_unread} == {mine[0]["id"], mine[2]["id"]}
    assert not any(n["read"] for n in only_unread)
    # A page at a time, too.
    page = await system.ask("GET", "/notifications", "globex", params={"unread": "false", "limit": "1"})
    walked, cursor = list(page["items"]), page["next_cursor"]
    while cursor:
        page = await system.ask("GET", "/notifications", "globex", params={"unread": "false", "limit": "1",
                                                                           "cursor": cursor})
        walked, cursor = walked + page["items"], page["next_cursor"]
    assert [n["id"] for n in walked] == [n["id"] for n in only_read]
    # The notifier's verb, as the gateway calls it (unread_only) and as it is named (unread).
    for key in ("unread_only", "unread"):
        for value, expected in ((False, only_read), (True, only_unread)):
            page = await system.stack.call("notifier", "list", tenant_id=tenant_id, limit=200, **{key: value})
            assert page["items"] == expected, (key, value)


# ---- the migration, on a table that has rows ------------------------------------------------

async def test_the_migration_gives_kept_deliveries_public_ids_and_goes_down_again(make_settings):
    from alembic import command

    from shared.migrations import alembic_config

    settings = await make_settings(migrate=False)
    config = alembic_config("notifier", settings.sqlalchemy_url)
    await asyncio.to_thread(command.upgrade, config, "n0004")
    at = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(
            "INSERT INTO notifier.notifications (id, tenant_id, at, kind, message, dedupe_key) "
            "VALUES ('n1', 'a', $1, 'run_completed', 'm', 'k1'), ('n2', 'b', $1, 'run_completed', 'm', 'k2')", at)
        await conn.execute(
            "INSERT INTO notifier.deliveries (notification_id, tenant_id, url, body, status) VALUES "
            "('n1', 'a', 'https://example.com/h', '{}', 'delivered'), ('n2', 'b', 'https://example.com/h', '{}', "
            "'failed'), ('gone', 'a', 'https://example.com/h', '{}', 'pending')")
        await asyncio.to_thread(command.upgrade, config, "head")
        rows = await conn.fetch("SELECT id, public_id, created_at, notification_id FROM notifier.deliveries ORDER BY id")
        assert [r["id"] for r in rows] == [1, 2, 3]  # ours, kept
        assert all(r["public_id"].version == 4 for r in rows) and len({r["public_id"] for r in rows}) == 3
        assert [r["created_at"] for r in rows[:2]] == [at, at] and rows[2]["created_at"] is not None
        made = await conn.fetchrow("INSERT INTO notifier.deliveries (notification_id, tenant_id, url, body) "
                                   "VALUES ('n3', 'a', 'https://example.com/h', '{}') RETURNING public_id, created_at")
        assert made["public_id"].version == 4 and made["created_at"] is not None
        indexes = {r[0] for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'deliveries'")}
        assert {"deliveries_public_id", "deliveries_by_tenant_created"} <= indexes
        assert "deliveries_by_tenant" not in indexes

        await asyncio.to_thread(command.downgrade, config, "n0004")
        columns = {r[0] for r in await conn.fetch("SELECT column_name FROM information_schema.columns "
                                                  "WHERE table_schema = 'notifier' AND table_name = 'deliveries'")}
        assert not {"public_id", "created_at"} & columns
        indexes = {r[0] for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'deliveries'")}
        assert "deliveries_by_tenant" in indexes and "deliveries_public_id" not in indexes
        assert await conn.fetchval("SELECT count(*) FROM notifier.deliveries") == 4
        await asyncio.to_thread(command.upgrade, config, "head")
        assert await conn.fetchval("SELECT count(DISTINCT public_id) FROM notifier.deliveries") == 4
    finally:
        await conn.close()
