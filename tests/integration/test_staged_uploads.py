"""What a run body larger than one bus message may cost the shared system (the gateway's
staging.py, the coordinator's staged_files.py): a refused run leaves none of its parts
behind, the refusals the gateway can foresee cost no part at all, a tenant's parts not yet
a run are capped (REDRIVE_MAX_STAGED_BYTES_PER_TENANT), and a gateway reads only so many
large bodies at once (REDRIVE_MAX_CONCURRENT_LARGE_BODIES).

Real services (billing, coordinator, executor, gateway) over real NATS and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

import aiohttp
import pytest
from sqlalchemy import text

from services.coordinator.commands import staged_files
from services.gateway.identity import create_key, create_tenant
from shared.db import make_engine
from tests.stack import Stack, expect_error

RUNS = "/api/v1/workflow-runs"
CAP = 4 * 2**20  # staged bytes per tenant in this module
FILE_BYTES = 1000  # about, in the body; about 1,150 staged (its row counts too)


@pytest.fixture(scope="module")
async def system(make_settings):
    settings = await make_settings(port=0, max_staged_bytes_per_tenant=CAP, max_concurrent_large_bodies=1)
    stack = await Stack(settings).start("billing", "coordinator", "executor", "gateway")
    engine = make_engine(settings, pool_size=2)
    gateway = stack.services["gateway"][0]
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gateway.port}") as http:
        yield {"stack": stack, "engine": engine, "http": http, "gateway": gateway}
    await engine.dispose()
    await stack.stop()


async def new_tenant(system, *, monthly: int = 100_000) -> dict:
    """A tenant with an API key (tenant admin) and a one-step template."""
    stack, engine, http = system["stack"], system["engine"], system["http"]
    tenant = await create_tenant(engine, f"t-{uuid.uuid4().hex[:8]}")
    await stack.call("billing", "open_account", tenant_id=tenant, monthly_allowance=monthly)
    headers = {"Authorization": f"Bearer {await create_key(engine, tenant, 'tenant_admin', 'k')}"}
    r = await http.post("/api/v1/templates", headers=headers,
                        json={"name": "t", "steps": [{"name": "a", "handler": "noop"}]})
    assert r.status == 201, await r.text()
    return {"id": tenant, "headers": headers, "template": (await r.json())["id"]}


def files(n: int, prefix: str = "doc") -> list[dict]:
    return [{"name": f"{prefix}-{i:05d}.pdf", "url": f"https://files.example.com/{'x' * 950}/{i}"} for i in range(n)]


def large(system) -> int:
    """How many such files make a body a third larger than one bus message."""
    return system["stack"].nc.max_payload // FILE_BYTES + 300


async def staged(engine, tenant: str) -> int:
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT count(*) FROM coordinator.staged_files WHERE tenant_id = :t"),
                                   {"t": tenant})).scalar_one()


@contextlib.asynccontextmanager
async def parts_sent(stack):
    """Every ``stage_files`` request that crosses the bus meanwhile (a plain subscriber sees
    each, beside the coordinator's queue group)."""
    seen: list[bytes] = []

    async def heard(msg) -> None:
        seen.append(msg.data)

    sub = await stack.nc.subscribe(stack.names.service("coordinator", "stage_files"), cb=heard)
    await stack.nc.flush()
    try:
        yield seen
    finally:
        await stack.nc.flush()  # whatever was sent before is heard by now
        await sub.unsubscribe()


async def error_of(resp: aiohttp.ClientResponse, status: int, code: str) -> dict:
    body = await resp.text()
    assert resp.status == status, body[:500]
    error = json.loads(body)["error"]
    assert error["code"] == code, error
    return error


async def until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# ---- a refused run leaves nothing behind --------------------------------------------------


async def test_a_large_run_naming_an_unknown_or_archived_template_is_404_before_any_part_is_sent(system):
    http, stack = system["http"], system["stack"]
    t = await new_tenant(system)
    archived = (await (await http.post("/api/v1/templates", headers=t["headers"], json={
        "name": "old", "steps": [{"name": "a", "handler": "noop"}]})).json())["id"]
    assert (await http.delete(f"/api/v1/templates/{archived}", headers=t["headers"])).status == 204
    for template_id in ("no-such-template", archived):
        async with parts_sent(stack) as parts:
            r = await http.post(RUNS, headers=t["headers"], json={"template_id": template_id, "files": files(large(system))})
            await error_of(r, 404, "not_found")
        assert parts == [], template_id  # refused before a byte of the files crossed the bus
    assert await staged(system["engine"], t["id"]) == 0


async def test_a_large_run_refused_for_credits_leaves_no_part_behind(system):
    http, stack = system["http"], system["stack"]
    t = await new_tenant(system, monthly=0)
    async with parts_sent(stack) as parts:
        r = await http.post(RUNS, headers=t["headers"], json={"template_id": t["template"], "files": files(large(system))})
        await error_of(r, 402, "insufficient_credits")
    assert len(parts) >= 2  # it was sent ahead (only the coordinator knows the balance)...
    assert await staged(system["engine"], t["id"]) == 0  # ...and the refusal took it away
    assert [e for e in await stack.ledger(t["id"]) if e["kind"] == "charge"] == []


async def test_a_file_too_large_for_a_message_is_413_before_any_part_is_sent(system):
    http, stack = system["http"], system["stack"]
    t = await new_tenant(system)
    huge = {"name": "huge.bin", "content_b64": "QUFB" * (stack.nc.max_payload // 4 + 1000)}
    async with parts_sent(stack) as parts:
        r = await http.post(RUNS, headers=t["headers"], json={"template_id": t["template"], "files": files(300) + [huge]})
        error = await error_of(r, 413, "payload_too_large")
    assert "by url" in error["message"]
    assert parts == []
    assert await staged(system["engine"], t["id"]) == 0


async def test_a_refused_run_discards_its_upload_and_a_retry_under_the_same_run_id_stages_anew(system):
    # As the gateway does: a fresh upload id for each attempt, the same run id (from the
    # Idempotency-Key) for every attempt.
    stack, engine = system["stack"], system["engine"]
    tenant = await stack.tenant(monthly=1)
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    run_id = uuid.uuid4().hex
    two = [{"name": "a"}, {"name": "b"}]

    async def attempt(code: str | None = None) -> dict | None:
        upload = {"tenant_id": tenant, "actor": "test", "upload_id": uuid.uuid4().hex}
        await stack.call("coordinator", "stage_files", **upload, offset=0, files=two)
        create = stack.call("coordinator", "create_run", tenant_id=tenant, actor="test", template_id=template,
                            run_id=run_id, staged={"upload_id": upload["upload_id"], "count": 2})
        if code is not None:
            await expect_error(code, create)
            return None
        return await create

    await attempt("insufficient_credits")
    assert await staged(engine, tenant) == 0
    await stack.call("billing", "grant", tenant_id=tenant, purchased=10, idempotency_key=f"g-{tenant}")
    run = await attempt()
    assert run["id"] == run_id and run["counts"]["total"] == 2
    assert await staged(engine, tenant) == 0
    # Its answer lost, the same request again: the run it made, and the new upload is not kept.
    assert (await attempt())["id"] == run_id
    assert await staged(engine, tenant) == 0
    assert [e["amount"] for e in await stack.ledger(tenant) if e["kind"] == "charge"] == [-2]


async def test_a_run_whose_files_lack_a_url_its_download_step_needs_is_422_and_charges_nothing(system):
    """Inline and sent ahead: refused before the charge, naming the files; a download step
    with its own params.url needs no file's url."""
    http, stack = system["http"], system["stack"]
    t = await new_tenant(system)
    r = await http.post("/api/v1/templates", headers=t["headers"], json={
        "name": "fetch", "steps": [{"name": "get", "handler": "download"}, {"name": "sum", "handler": "checksum"}]})
    assert r.status == 201, await r.text()
    fetch = (await r.json())["id"]
    small = files(3)
    del small[1]["url"]
    small[2]["url"] = ""  # names nothing either
    r = await http.post(RUNS, headers=t["headers"], json={"template_id": fetch, "files": small})
    error = await error_of(r, 422, "validation_error")
    needs = "step 0 ('get', handler 'download') needs each file's url"
    assert error["details"]["fields"] == {"files.1.url": needs, "files.2.url": needs}
    assert error["details"]["files_lacking"] == 2
    big = files(large(system))
    del big[7]["url"]
    big[-1]["url"] = "  "
    r = await http.post(RUNS, headers=t["headers"], json={"template_id": fetch, "files": big})
    error = await error_of(r, 422, "validation_error")
    assert set(error["details"]["fields"]) == {"files.7.url", f"files.{len(big) - 1}.url"}
    assert await staged(system["engine"], t["id"]) == 0
    assert [e for e in await stack.ledger(t["id"]) if e["kind"] == "charge"] == []
    listed = await (await http.get(RUNS, headers=t["headers"])).json()
    assert listed["items"] == []
    r = await http.post("/api/v1/templates", headers=t["headers"], json={
        "name": "one", "steps": [{"name": "get", "handler": "download", "params": {"url": "https://example.com/x"}}]})
    r = await http.post(RUNS, headers=t["headers"], json={"template_id": (await r.json())["id"],
                                                         "files": [{"name": "no-url"}]})
    assert r.status == 201, await r.text()


# ---- a tenant's parts not yet a run are capped ----------------------------------------------


async def test_a_tenants_parts_not_yet_a_run_are_capped_and_another_tenant_is_not_affected(system):
    http, stack, engine = system["http"], system["stack"], system["engine"]
    a, b = await new_tenant(system), await new_tenant(system)
    # An upload of A's in progress, about 3 MB of the 4 MiB.
    pending = {"tenant_id": a["id"], "actor": "test", "upload_id": uuid.uuid4().hex}
    held = files(2550, "held")
    for offset in range(0, len(held), 850):
        await stack.call("coordinator", "stage_files", **pending, offset=offset, files=held[offset:offset + 850])
    body = {"template_id": a["template"], "files": files(large(system))}

    r = await http.post(RUNS, headers=a["headers"], json=body)
    error = await error_of(r, 429, "too_many_requests")
    assert int(r.headers["Retry-After"]) > 0
    assert "REDRIVE_MAX_STAGED_BYTES_PER_TENANT" in error["message"]
    assert error["details"]["limit"] == CAP and error["details"]["per"] == "tenant"
    assert await staged(engine, a["id"]) == len(held)  # the refused upload's parts are gone, the other's kept

    r = await http.post(RUNS, headers=b["headers"], json={**body, "template_id": b["template"]})
    assert r.status == 201, await r.text()  # another tenant stages on

    # The held upload's run refused (it is discarded): A's space is free again.
    await expect_error("not_found", stack.call("coordinator", "create_run", tenant_id=a["id"], actor="test",
                                               template_id="gone",
                                               staged={"upload_id": pending["upload_id"], "count": len(held)}))
    assert await staged(engine, a["id"]) == 0
    r = await http.post(RUNS, headers=a["headers"], json=body)
    assert r.status == 201, await r.text()

    # A request whose files alone are more than the cap can never be taken: 413, not "later".
    r = await http.post(RUNS, headers=a["headers"], json={**body, "files": files(CAP // FILE_BYTES)})
    error = await error_of(r, 413, "payload_too_large")
    assert "REDRIVE_MAX_STAGED_BYTES_PER_TENANT" in error["message"]
    assert await staged(engine, a["id"]) == 0


async def test_concurrent_parts_cannot_overshoot_the_cap(system):
    stack, engine = system["stack"], system["engine"]
    tenant = await stack.tenant()
    part = [{"name": f"f{i}", "content_b64": "QUFB" * 56_250} for i in range(4)]  # 900 KB: four fit in 4 MiB, not five

    async def stage() -> str:
        try:
            await stack.call("coordinator", "stage_files", tenant_id=tenant, actor="test",
                             upload_id=uuid.uuid4().hex, offset=0, files=part)
            return "staged"
        except Exception as exc:
            return getattr(exc, "code", repr(exc))

    answers = await asyncio.gather(*(stage() for _ in range(6)))
    assert sorted(answers) == ["staged"] * 4 + ["too_many_requests"] * 2
    assert await staged(engine, tenant) == 16
    await staged_files.prune(engine, older_than_s=0)


# ---- a gateway reads only so many large bodies at once --------------------------------------


class SlowClient:
    """A POST whose large body arrives only when the test says so."""

    def __init__(self, port: int, headers: dict[str, str], body: bytes) -> None:
        self.port, self.headers, self.body = port, headers, body

    async def begin(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in {**self.headers, "Content-Type": "application/json",
                                                      "Content-Length": str(len(self.body))}.items())
        self.writer.write(f"POST {RUNS} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode() + self.body[:1000])
        await self.writer.drain()

    async def finish(self) -> int:
        self.writer.write(self.body[1000:])
        await self.writer.drain()
        status = int((await asyncio.wait_for(self.reader.readline(), 30)).split()[1])
        self.writer.close()
        return status


async def test_a_gateway_reads_at_most_its_limit_of_large_bodies_at_once_and_the_next_waits_briefly(system):
    http, gateway = system["http"], system["gateway"]
    t = await new_tenant(system)
    body = {"template_id": t["template"], "files": files(large(system))}
    limiter = gateway.deps.large_bodies
    default_wait = limiter.wait_s
    slow = SlowClient(gateway.port, t["headers"], json.dumps(body).encode())
    await slow.begin()
    try:
        await until(lambda: limiter.in_use == 1)  # its one slot (the limit is 1 here)

        limiter.wait_s = 0.3
        started = time.monotonic()
        r = await http.post(RUNS, headers=t["headers"], json=body)
        error = await error_of(r, 503, "service_unavailable")
        assert time.monotonic() - started >= 0.3  # it waited for the slot, briefly
        assert int(r.headers["Retry-After"]) > 0
        assert "REDRIVE_MAX_CONCURRENT_LARGE_BODIES" in error["message"]
        # aiohttp holds a connection's last request (and its body) until the next: a large
        # body's answer ends its connection, so what it read is let go with its slot.
        assert r.headers["Connection"] == "close"

        small = await http.post(RUNS, headers=t["headers"], json={"template_id": t["template"], "files": files(3)})
        assert small.status == 201, await small.text()  # a body that fits a message is not held up
        assert small.headers.get("Connection") != "close"

        limiter.wait_s = 20
        waiting = asyncio.create_task(http.post(RUNS, headers=t["headers"], json=body))
        await until(lambda: limiter.waiting == 1)
        assert await slow.finish() == 201
        r = await asyncio.wait_for(waiting, 30)
        assert r.status == 201, await r.text()  # the slot freed, the waiting one went on
        assert r.headers["Connection"] == "close"
    finally:
        slow.writer.close()
        limiter.wait_s = default_wait
    assert limiter.in_use == 0 and limiter.waiting == 0
