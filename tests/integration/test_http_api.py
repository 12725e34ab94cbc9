"""The HTTP contract through the gateway, over the real services."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from shared.db import make_engine
from services.gateway.identity import create_key, create_tenant
from tests.stack import Stack


@pytest.fixture(scope="module")
async def api(make_settings):
    settings = await make_settings(port=0)
    stack = await Stack(settings).start("billing", "coordinator", "executor", "notifier", "gateway")
    gateway = stack.services["gateway"][0]
    engine = make_engine(settings, pool_size=1)
    tenant = await create_tenant(engine, "acme")
    other = await create_tenant(engine, "other")
    for t in (tenant, other):
        await stack.call("billing", "open_account", tenant_id=t, monthly_allowance=100)
    keys = {role: await create_key(engine, tenant, role, role) for role in ("member", "tenant_admin", "platform_admin")}
    keys["other"] = await create_key(engine, other, "tenant_admin", "o")
    await engine.dispose()
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gateway.port}") as http:
        yield {"http": http, "keys": keys, "tenant": tenant, "other": other, "stack": stack}
    await stack.stop()


def auth(key, **extra):
    return {"Authorization": f"Bearer {key}", **extra}


async def test_a_run_through_the_http_api(api):
    http, keys = api["http"], api["keys"]
    r = await http.post("/api/v1/templates", json={"name": "t", "steps": [{"name": "a", "handler": "noop"}]},
                        headers=auth(keys["tenant_admin"]))
    assert r.status == 201
    template = (await r.json())["id"]
    headers = auth(keys["member"], **{"Idempotency-Key": "k1"})
    body = {"template_id": template, "files": [{"name": "a"}, {"name": "b"}]}
    first = await http.post("/api/v1/workflow-runs", json=body, headers=headers)
    again = await http.post("/api/v1/workflow-runs", json=body, headers=headers)
    assert first.status == again.status == 201
    assert await first.json() == await again.json()
    reused = await http.post("/api/v1/workflow-runs", json={**body, "max_retry_count": 5}, headers=headers)
    assert reused.status == 422 and (await reused.json())["error"]["code"] == "idempotency_key_reused"
    run_id = (await first.json())["id"]
    for _ in range(200):
        run = await (await http.get(f"/api/v1/workflow-runs/{run_id}", headers=auth(keys["member"]))).json()
        if run["status"] != "RUNNING":
            break
        await asyncio.sleep(0.05)
    assert run["status"] == "COMPLETED" and run["counts"]["succeeded"] == 2
    page = await (await http.get(f"/api/v1/workflow-runs/{run_id}?file_offset=1&file_limit=1",
                                 headers=auth(keys["member"]))).json()
    assert [f["index"] for f in page["files"]] == [1] and page["files_page"]["next_offset"] is None
    ledger = await (await http.get("/api/v1/credits/ledger", headers=auth(keys["member"]))).json()
    assert [e["amount"] for e in ledger["items"] if e["kind"] == "charge"] == [-2]
    listed = await (await http.get("/api/v1/workflow-runs?limit=1", headers=auth(keys["member"]))).json()
    assert [r["id"] for r in listed["items"]] == [run_id]
    r = await http.get(f"/api/v1/workflow-runs/{run_id}", headers=auth(keys["other"]))
    assert r.status == 404
    r = await http.post(f"/api/v1/workflow-runs/{run_id}/retry-failed", headers=auth(keys["member"]))
    assert r.status == 403
    r = await http.post(f"/api/v1/workflow-runs/{run_id}/retry-failed", headers=auth(keys["tenant_admin"]))
    assert r.status == 400 and (await r.json())["error"]["code"] == "run_completed"


async def test_auth_validation_and_error_shapes(api):
    http, keys = api["http"], api["keys"]
    assert (await http.get("/api/v1/workflow-runs")).status == 401
    assert (await http.get("/api/v1/workflow-runs", headers=auth("rk_nope"))).status == 401
    r = await http.get("/api/v1/credits", headers=auth(keys["tenant_admin"], **{"X-Tenant-Id": api["other"]}))
    assert r.status == 403
    r = await http.get("/api/v1/credits", headers=auth(keys["platform_admin"], **{"X-Tenant-Id": api["other"]}))
    assert r.status == 200
    for bad in ({"template_id": "x", "files": [{"name": "a"}], "max_retry_count": 0},
                {"template_id": "x", "files": [{"name": "a"}], "max_retry_count": 11},
                {"template_id": "x", "files": []}):
        r = await http.post("/api/v1/workflow-runs", json=bad, headers=auth(keys["member"]))
        body = await r.json()
        assert r.status == 422 and body["error"]["details"]["fields"], body
    r = await http.post("/api/v1/workflow-runs", data=b"{not json", headers=auth(keys["member"]))
    assert r.status == 400 and "Traceback" not in await r.text()
    r = await http.post("/api/v1/workflow-runs", json={"template_id": "missing", "files": [{"name": "a"}]},
                        headers=auth(keys["member"]))
    assert r.status == 404
    r = await http.get("/api/v1/nowhere", headers=auth(keys["member"]))
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_service_endpoints_and_openapi(api):
    http = api["http"]
    assert (await http.get("/healthz")).status == 200
    ready = await http.get("/readyz")
    assert ready.status == 200 and (await ready.json())["checks"] == {"nats": True, "database": True}
    assert "redrive_http_requests_total" in await (await http.get("/metrics")).text()
    doc = await (await http.get("/api/v1/openapi.json")).json()
    from services.gateway.routes import ROUTES

    for route in ROUTES:
        assert route.method.lower() in doc["paths"]["/api/v1" + route.path]
    page = await http.get("/")
    assert page.status == 200 and "redrive — operations" in await page.text()


async def sse_frames(http, key: str, out: list) -> None:
    """Read GET /events with ``key`` into ``out`` as (event, data) pairs, ("connected", {}) first."""
    async with http.get("/api/v1/events", headers=auth(key)) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        event = None
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event:
                out.append((event, json.loads(line[6:])))
            elif line == ": connected":
                out.append(("connected", {}))


async def test_live_events_reach_their_tenant_only(api):
    http, keys = api["http"], api["keys"]
    mine, theirs = [], []
    mine_task = asyncio.create_task(sse_frames(http, keys["member"], mine))
    theirs_task = asyncio.create_task(sse_frames(http, keys["other"], theirs))
    for _ in range(100):
        if mine and theirs:
            break
        await asyncio.sleep(0.02)
    r = await http.post("/api/v1/templates", json={"name": "t", "steps": [{"name": "a", "handler": "noop"}]},
                        headers=auth(keys["tenant_admin"]))
    run = await (await http.post("/api/v1/workflow-runs", json={"template_id": (await r.json())["id"],
                                                                "files": [{"name": "a"}]},
                                 headers=auth(keys["member"]))).json()
    # Until our run's completion arrives (another test's run may complete meanwhile).
    deadline = asyncio.get_running_loop().time() + 20
    while not any(k == "run.completed" and e.get("run_id") == run["id"] for k, e in mine):
        assert asyncio.get_running_loop().time() < deadline, f"no run.completed for our run in {mine}"
        await asyncio.sleep(0.02)
    mine_task.cancel()
    theirs_task.cancel()
    # (Its notification, pushed as the notifier stores it, may come before or after.)
    kinds = [k for k, e in mine if e.get("run_id") == run["id"] and k != "notification"]
    assert "file.succeeded" in kinds and kinds[-1] == "run.completed"
    assert not [e for k, e in theirs if e.get("run_id") == run["id"]]


async def test_idempotent_continue_and_concurrent_duplicates(api):
    http, keys = api["http"], api["keys"]
    admin = auth(keys["tenant_admin"])
    assert (await http.put("/api/v1/settings/retry", headers=admin, json={
        "auto_retries": 0, "backoff_base_ms": 10, "backoff_max_ms": 20, "jitter": True,
        "breaker_failure_threshold": 5, "breaker_reset_s": 30})).status == 200
    bad = await http.put("/api/v1/settings/retry", headers=admin, json={"auto_retries": 11, "backoff_base_ms": 500,
                                                                       "backoff_max_ms": 100})
    fields = (await bad.json())["error"]["details"]["fields"]
    assert bad.status == 422 and {"auto_retries", "backoff_max_ms"} <= set(fields)
    r = await http.post("/api/v1/templates", headers=admin, json={
        "name": "f", "steps": [{"name": "a", "handler": "flaky", "params": {"fail_rounds": 1}}]})
    template = (await r.json())["id"]
    body = {"template_id": template, "files": [{"name": "x"}]}
    results = await asyncio.gather(*[http.post("/api/v1/workflow-runs", json=body,
                                               headers=auth(keys["member"], **{"Idempotency-Key": "dup"}))
                                     for _ in range(8)])
    assert {r.status for r in results} <= {201, 409} and 201 in {r.status for r in results}
    ids = {(await r.json())["id"] for r in results if r.status == 201}
    assert len(ids) == 1
    run_id = ids.pop()
    for _ in range(200):
        run = await (await http.get(f"/api/v1/workflow-runs/{run_id}", headers=admin)).json()
        if run["status"] != "RUNNING":
            break
        await asyncio.sleep(0.05)
    assert run["status"] == "COMPLETED_WITH_ERRORS"
    press = auth(keys["tenant_admin"], **{"Idempotency-Key": "continue-1"})
    first = await http.post(f"/api/v1/workflow-runs/{run_id}/retry-failed", headers=press)
    again = await http.post(f"/api/v1/workflow-runs/{run_id}/retry-failed", headers=press)
    assert first.status == again.status == 200 and await first.read() == await again.read()
    ledger = (await (await http.get("/api/v1/credits/ledger?limit=500", headers=admin)).json())["items"]
    assert len([e for e in ledger if e["run_id"] == run_id and e["kind"] == "charge"]) == 2  # initiate + one Continue


async def test_a_cancel_sent_again_under_its_idempotency_key_answers_as_the_first(api):
    """Without the key honoured, the second copy of a cancel whose answer was lost (a
    client's retry) was a 409 for the run it had cancelled itself."""
    http, keys = api["http"], api["keys"]
    admin = auth(keys["tenant_admin"])
    r = await http.post("/api/v1/templates", headers=admin,
                        json={"name": "slow", "steps": [{"name": "a", "handler": "flaky", "params": {"sleep_ms": 3000}}]})
    run = await (await http.post("/api/v1/workflow-runs", headers=admin,
                                 json={"template_id": (await r.json())["id"], "files": [{"name": "a"}]})).json()
    press = auth(keys["tenant_admin"], **{"Idempotency-Key": "cancel-1"})
    first = await http.post(f"/api/v1/workflow-runs/{run['id']}/cancel", headers=press)
    again = await http.post(f"/api/v1/workflow-runs/{run['id']}/cancel", headers=press)
    assert first.status == again.status == 200 and await first.read() == await again.read()
    assert again.headers.get("Idempotent-Replayed") == "true"
    other = await http.post(f"/api/v1/workflow-runs/{run['id']}/cancel", headers=auth(keys["tenant_admin"],
                                                                                   **{"Idempotency-Key": "cancel-2"}))
    assert other.status == 409  # another cancel, of a run cancelled already


async def test_only_a_platform_admin_grants_credits(api):
    http, keys, other = api["http"], api["keys"], api["other"]
    path = f"/api/v1/admin/tenants/{other}/credits"
    assert (await http.post(path, json={"purchased": 5}, headers=auth(keys["tenant_admin"]))).status == 403
    granted = await http.post(path, json={"purchased": 5}, headers=auth(keys["platform_admin"], **{"Idempotency-Key": "g1"}))
    again = await http.post(path, json={"purchased": 5}, headers=auth(keys["platform_admin"], **{"Idempotency-Key": "g1"}))
    assert granted.status == again.status == 200
    assert (await again.json())["purchased"]["remaining"] == 5  # granted once
    theirs = await http.get("/api/v1/credits", headers=auth(keys["platform_admin"], **{"X-Tenant-Id": other}))
    own = await http.get("/api/v1/credits", headers=auth(keys["platform_admin"]))
    assert (await theirs.json())["purchased"]["remaining"] == 5  # to the tenant in the path…
    assert (await own.json())["purchased"]["remaining"] == 0  # …not to the admin's own
    assert (await http.post(path, json={"purchased": 0}, headers=auth(keys["platform_admin"]))).status == 422


async def test_short_credits_are_a_402_with_needed_and_available(api):
    http, keys = api["http"], api["keys"]
    r = await http.post("/api/v1/templates", json={"name": "big", "credits_per_file": 1000,
                                                   "steps": [{"name": "a", "handler": "noop"}]}, headers=auth(keys["other"]))
    r = await http.post("/api/v1/workflow-runs", json={"template_id": (await r.json())["id"], "files": [{"name": "a"}]},
                        headers=auth(keys["other"]))
    body = await r.json()
    assert r.status == 402 and body["error"]["code"] == "insufficient_credits"
    assert body["error"]["details"]["needed"] == 1000


async def test_a_new_notification_is_pushed_live_to_its_tenant_as_stored(api):
    """product.md: notifications are stored, listed and pushed live (SSE ``notification``)."""
    http, keys = api["http"], api["keys"]
    streams = {"member": [], "other": []}
    tasks = [asyncio.create_task(sse_frames(http, keys[who], frames)) for who, frames in streams.items()]
    try:
        while not all(streams.values()):
            await asyncio.sleep(0.02)
        r = await http.post("/api/v1/templates", json={"name": "t", "steps": [{"name": "a", "handler": "noop"}]},
                            headers=auth(keys["tenant_admin"]))
        run = await (await http.post("/api/v1/workflow-runs", json={"template_id": (await r.json())["id"],
                                                                    "files": [{"name": "a"}]},
                                     headers=auth(keys["member"]))).json()
        deadline = asyncio.get_running_loop().time() + 20

        def pushed():
            return [e for k, e in streams["member"] if k == "notification" and e["run_id"] == run["id"]]

        while not pushed():
            assert asyncio.get_running_loop().time() < deadline, f"no notification pushed in {streams['member']}"
            await asyncio.sleep(0.02)
    finally:
        for task in tasks:
            task.cancel()
    [live] = pushed()
    assert live["kind"] == "run_completed" and live["read"] is False and live["tenant_id"] == api["tenant"]
    assert live["v"] == 1  # as every body on the bus
    listed = await (await http.get("/api/v1/notifications", headers=auth(keys["member"]))).json()
    [stored] = [n for n in listed["items"] if n["id"] == live["id"]]
    assert {k: live[k] for k in stored} == stored  # what is pushed is what is listed (and its tenant)
    assert not [e for k, e in streams["other"] if k == "notification"]


async def test_every_message_of_a_run_carries_the_trace_of_the_request_that_created_it(api):
    """messaging.md: headers carry traceparent, so that one run's logs and traces join up."""
    http, stack, key = api["http"], api["stack"], api["keys"]["other"]
    by_run: dict[str, list[tuple[str, dict]]] = {}
    completed: dict[str, asyncio.Event] = {}

    async def seen(msg):
        run_id = (msg.headers or {}).get("Redrive-Run")
        if run_id:
            by_run.setdefault(run_id, []).append((msg.subject, dict(msg.headers)))
            if msg.subject.endswith(".events.run.completed"):
                completed.setdefault(run_id, asyncio.Event()).set()

    sub = await stack.nc.subscribe(f"{stack.names.prefix}.>", cb=seen)  # jobs and events, as they are published
    try:
        steps = [{"name": "a", "handler": "noop"}, {"name": "b", "handler": "flaky", "params": {"fail_attempts": 1}}]
        r = await http.post("/api/v1/templates", json={"name": "traced", "steps": steps}, headers=auth(key))
        template = (await r.json())["id"]
        body = {"template_id": template, "files": [{"name": "a"}, {"name": "b"}]}
        trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        traced = await (await http.post("/api/v1/workflow-runs", json=body, headers=auth(
            key, traceparent=f"00-{trace}-00f067aa0ba902b7-01"))).json()
        untraced = await (await http.post("/api/v1/workflow-runs", json=body, headers=auth(
            key, traceparent="00-not-a-trace-01"))).json()  # invalid: ignored, a new trace is begun
        batch_trace = "0af7651916cd43dd8448eb211c80319c"
        batch = await (await http.post("/api/v1/workflow-runs", json={**body, "mode": "batch"}, headers=auth(
            key, traceparent=f"00-{batch_trace}-b7ad6b7169203331-01"))).json()
        assert traced["trace_id"] == trace and batch["trace_id"] == batch_trace
        assert untraced["trace_id"] != trace and len(untraced["trace_id"]) == 32
        for run in (traced, untraced, batch):
            await asyncio.wait_for(completed.setdefault(run["id"], asyncio.Event()).wait(), 30)
    finally:
        await sub.unsubscribe()
    for run in (traced, untraced, batch):
        messages = by_run[run["id"]]
        kinds = {subject.split(f"{stack.names.prefix}.", 1)[1].rsplit(".", 1)[0] if ".events." in subject
                 else "jobs" for subject, _ in messages}
        assert kinds == {"jobs", "events.file", "events.run"}, kinds
        assert {s.rsplit(".", 1)[1] for s, _ in messages if ".events.file." in s} >= {"checkpoint", "retrying", "succeeded"}
        parents = [headers["traceparent"].split("-") for _, headers in messages]
        assert all(p[0] == "00" and p[1] == run["trace_id"] and p[3] == "01" for p in parents), parents
        assert len({p[2] for p in parents}) == len(parents)  # a span id of its own per message


async def test_metrics_show_each_breakers_state_and_each_consumers_backlog(api):
    """product.md: breaker state is visible in the API, metrics and dashboard."""
    http, key, stack = api["http"], api["keys"]["other"], api["stack"]
    r = await http.put("/api/v1/settings/retry", headers=auth(key), json={
        "auto_retries": 3, "backoff_base_ms": 10, "backoff_max_ms": 20, "jitter": True,
        "breaker_failure_threshold": 1, "breaker_reset_s": 1})
    assert r.status == 200
    steps = [{"name": "call", "handler": "flaky", "params": {"fail_attempts": 1, "dependency": "metrics-dep"}}]
    template = (await (await http.post("/api/v1/templates", json={"name": "m", "steps": steps}, headers=auth(key))).json())["id"]
    run = await (await http.post("/api/v1/workflow-runs", json={"template_id": template, "files": [{"name": "a"}]},
                                 headers=auth(key))).json()
    await stack.wait_run(api["other"], run["id"])
    metrics = await (await http.get("/metrics")).text()
    states = {line.split('state="')[1].split('"')[0]: line.rsplit(" ", 1)[1] for line in metrics.splitlines()
              if line.startswith('redrive_breaker_state{dependency="metrics-dep"')}
    assert states == {"closed": "1.0", "open": "0.0", "half_open": "0.0"}  # it opened, was probed and closed
    assert 'redrive_metrics_source_up{source="breakers"} 1.0' in metrics
    assert 'redrive_metrics_source_up{source="jetstream"} 1.0' in metrics
    names = stack.names
    for stream, consumer in ((names.jobs_stream, "executor"), (names.events_stream, "coordinator-results"),
                             (names.events_stream, "notifier")):
        assert f'redrive_consumer_pending{{consumer="{consumer}",stream="{stream}"}}' in metrics


@pytest.mark.parametrize("edges", [
    {"auto_retries": 0, "backoff_base_ms": 10, "backoff_max_ms": 10, "jitter": False, "breaker_failure_threshold": 1,
     "breaker_reset_s": 1},
    {"auto_retries": 10, "backoff_base_ms": 60_000, "backoff_max_ms": 3_600_000, "jitter": True,
     "breaker_failure_threshold": 100, "breaker_reset_s": 3600},
], ids=["lowest", "highest"])
async def test_retry_settings_take_every_value_within_their_bounds(api, edges):
    http, key = api["http"], api["keys"]["other"]
    r = await http.put("/api/v1/settings/retry", headers=auth(key), json=edges)
    assert r.status == 200 and await r.json() == edges
    assert await (await http.get("/api/v1/settings/retry", headers=auth(key))).json() == edges


async def test_recover_over_http_and_its_seed_alias(api):
    """Seed 000's POST /api/v1/workflows/{id}/recover, and api.md's own path: 202, or 409."""
    http, key, stack = api["http"], api["keys"]["other"], api["stack"]
    steps = [{"name": "a", "handler": "flaky", "params": {"fail_rounds": 1}}]
    r = await http.post("/api/v1/templates", json={"name": "ff", "steps": steps, "failure_policy": "fail_fast"},
                        headers=auth(key))
    template = (await r.json())["id"]
    await http.put("/api/v1/settings/retry", headers=auth(key), json={"auto_retries": 0})
    run = await (await http.post("/api/v1/workflow-runs", json={"template_id": template, "files": [{"name": "a"}]},
                                 headers=auth(key))).json()
    failed = await stack.wait_run(api["other"], run["id"])
    assert failed["status"] == "FAILED"
    r = await http.post(f"/api/v1/workflows/{run['id']}/recover", headers=auth(key))
    assert r.status == 202 and (await r.json())["status"] == "COMPLETED_WITH_ERRORS"
    r = await http.post(f"/api/v1/workflow-runs/{run['id']}/recover", headers=auth(key))
    assert r.status == 409 and (await r.json())["error"]["code"] == "run_not_recoverable"
    r = await http.post(f"/api/v1/workflows/{run['id']}/recover", headers=auth(api["keys"]["tenant_admin"]))
    assert r.status == 404  # another tenant's run (this admin is acme's)
    r = await http.post(f"/api/v1/workflows/{run['id']}/recover", headers=auth(api["keys"]["member"]))
    assert r.status == 403  # a role that may not act


async def test_templates_are_listed_newest_first_a_page_at_a_time(api, monkeypatch):
    from services.coordinator import pages

    http, admin = api["http"], auth(api["keys"]["tenant_admin"])
    made = []
    for i in range(3):
        body = {"name": f"paged-{i}", "steps": [{"name": "a", "handler": "noop", "params": {"pad": "p" * 1000}}]}
        made.append((await (await http.post("/api/v1/templates", json=body, headers=admin)).json())["id"])

    async def walk(query: str) -> tuple[list[str], list[int]]:
        ids, sizes, cursor = [], [], None
        while True:
            url = "/api/v1/templates?" + query + (f"&cursor={cursor}" if cursor else "")
            page = await (await http.get(url, headers=admin)).json()
            assert "items" in page, page
            ids += [t["id"] for t in page["items"]]
            sizes.append(len(page["items"]))
            if (cursor := page["next_cursor"]) is None:
                return ids, sizes

    everything, _ = await walk("limit=500")
    assert everything[:3] == made[::-1]  # newest first
    ids, sizes = await walk("limit=2")
    assert ids == everything and set(sizes[:-1]) == {2}
    # However many fit the count, a page ends before it outgrows a reply.
    monkeypatch.setattr(pages, "PAGE_BYTES", 1)
    ids, sizes = await walk("limit=500")
    assert ids == everything and set(sizes) == {1}
    # Steps too large to travel in every job are refused when the template is made.
    big = {"name": "big", "steps": [{"name": "a", "handler": "noop", "params": {"blob": "x" * 70_000}}]}
    r = await http.post("/api/v1/templates", json=big, headers=admin)
    assert r.status == 422 and "steps" in (await r.json())["error"]["details"]["fields"]


async def test_credit_amounts_past_32_bits_are_refused_or_charged_exactly(api):
    """Credits were PostgreSQL integers: a run costing 3e9 credits was a vague 400 (not a
    402), and a balance past 2^31 could not be granted."""
    http, keys = api["http"], api["keys"]
    admin, platform = auth(keys["tenant_admin"]), auth(keys["platform_admin"])
    costly = await (await http.post("/api/v1/templates", json={"name": "costly", "credits_per_file": 1_000_000,
                                                               "steps": [{"name": "a", "handler": "noop"}]},
                                    headers=admin)).json()
    before = await (await http.get("/api/v1/credits", headers=admin)).json()
    available = before["monthly"]["remaining"] + before["purchased"]["remaining"]
    r = await http.post("/api/v1/workflow-runs", json={"template_id": costly["id"],
                                                      "files": [{"name": f"f{i}"} for i in range(3000)]}, headers=admin)
    body = await r.json()
    assert r.status == 402 and body["error"]["details"] == {"needed": 3_000_000_000, "available": available}
    for _ in range(22):
        r = await http.post(f"/api/v1/admin/tenants/{api['tenant']}/credits", json={"purchased": 100_000_000},
                            headers=platform)
        assert r.status == 200, await r.text()
    assert (await r.json())["purchased"]["remaining"] == before["purchased"]["remaining"] + 2_200_000_000
    r = await http.post("/api/v1/workflow-runs", json={"template_id": costly["id"],
                                                      "files": [{"name": f"f{i}"} for i in range(2200)]}, headers=admin)
    assert r.status == 201, await r.text()
    assert (await r.json())["credits"]["consumed"] == 2_200_000_000
    after = await (await http.get("/api/v1/credits", headers=admin)).json()
    assert after["monthly"]["remaining"] + after["purchased"]["remaining"] == available + 2_200_000_000 - 2_200_000_000


async def test_a_run_body_can_hold_only_the_files_in_some_statuses(api):
    http, keys = api["http"], api["keys"]
    admin = auth(keys["tenant_admin"])
    t = await (await http.post("/api/v1/templates", json={"name": "p", "steps": [
        {"name": "a", "handler": "flaky", "params": {"poison": "bad"}}]}, headers=admin)).json()
    names = ["bad-0", "ok-1", "bad-2", "ok-3", "bad-4"]
    run = await (await http.post("/api/v1/workflow-runs", json={"template_id": t["id"], "files": [{"name": n} for n in names]},
                                 headers=admin)).json()
    done = await api["stack"].wait_run(api["tenant"], run["id"])
    assert done["counts"]["errored"] == 3
    url = f"/api/v1/workflow-runs/{run['id']}"

    async def page(query: str) -> dict:
        r = await http.get(url + query, headers=admin)
        assert r.status == 200, await r.text()
        return await r.json()

    errors = await page("?file_status=error,FAILED")
    assert [f["index"] for f in errors["files"]] == [0, 2, 4]
    assert errors["files_page"] == {"offset": 0, "limit": 1000, "next_offset": None, "status": ["ERROR", "FAILED"]}
    assert errors["counts"] == done["counts"]  # the run's own counts, whatever the filter
    first = await page("?file_status=ERROR&file_limit=2")
    assert [f["index"] for f in first["files"]] == [0, 2] and first["files_page"]["next_offset"] == 3
    rest = await page("?file_status=ERROR&file_limit=2&file_offset=3")
    assert [f["index"] for f in rest["files"]] == [4] and rest["files_page"]["next_offset"] is None
    assert (await page("?file_status=SUCCEEDED"))["files"][0]["name"] == "ok-1"
    assert "status" not in (await page("?file_status="))["files_page"]  # sent empty: not given, every file
    for bad in ("DONE", "FAILED,nope", ","):
        r = await http.get(f"{url}?file_status={bad}", headers=admin)
        fields = (await r.json())["error"]["details"]["fields"]
        assert r.status == 422 and all(f.startswith("file_status") for f in fields), (bad, fields)


async def test_flaky_crash_and_unbounded_regexes_are_refused_by_a_system_that_does_not_allow_them(api):
    """REDRIVE_EXECUTOR_ALLOW_CRASH is off (the default): a tenant admin cannot make a
    template that would exit the executor every tenant shares, nor one with a regex past
    the limits."""
    http, keys = api["http"], api["keys"]
    for params, field, words in (
            ({"crash": "^poison"}, "steps.1.params",
             ("'crash' is disabled on this system", "REDRIVE_EXECUTOR_ALLOW_CRASH")),
            ({"poison": "a" * 201}, "steps.1.params", ("'poison' is too long", "200")),
            ({"poison": "a{4294967294}"}, "steps.1.params", ("'poison' is too complex",))):
        steps = [{"name": "a", "handler": "noop"}, {"name": "b", "handler": "flaky", "params": params}]
        r = await http.post("/api/v1/templates", json={"name": "t", "steps": steps},
                            headers=auth(keys["tenant_admin"]))
        body = await r.json()
        assert r.status == 422 and body["error"]["code"] == "validation_error", body
        why = body["error"]["details"]["fields"][field]
        assert all(w in why for w in words), why


async def test_a_settings_put_changes_the_settings_it_names_and_keeps_the_others(api):
    http, stack = api["http"], api["stack"]
    engine = make_engine(stack.settings, pool_size=1)
    try:
        tenant = await create_tenant(engine, "settings")
    finally:
        await engine.dispose()
    admin = auth(api["keys"]["platform_admin"], **{"X-Tenant-Id": tenant})

    async def put(body):
        r = await http.put("/api/v1/settings/retry", headers=admin, json=body)
        return r.status, await r.json()

    defaults = await (await http.get("/api/v1/settings/retry", headers=admin)).json()
    status, saved = await put({"breaker_failure_threshold": 10, "backoff_base_ms": 2000})
    assert status == 200 and saved == {**defaults, "breaker_failure_threshold": 10, "backoff_base_ms": 2000}
    status, saved = await put({"auto_retries": 5})
    assert status == 200 and saved == {**defaults, "breaker_failure_threshold": 10, "backoff_base_ms": 2000,
                                       "auto_retries": 5}
    # Checked against what is stored, not against the defaults: 1,500 is below the stored
    # base (2,000), though above the default one (500).
    status, body = await put({"backoff_max_ms": 1500})
    assert status == 422 and body["error"]["details"]["fields"] == {
        "backoff_max_ms": "backoff_base_ms 2000 is above backoff_max_ms 1500"}
    for bad, field in (({}, "body"), ({"auto_retries": None}, "auto_retries"), ({"jitter": None}, "jitter")):
        status, body = await put(bad)
        assert status == 422 and field in body["error"]["details"]["fields"], (bad, body)
    assert await (await http.get("/api/v1/settings/retry", headers=admin)).json() == saved  # nothing changed
    # Two PUTs at once, of different settings: both hold.
    results = await asyncio.gather(put({"jitter": False}), put({"breaker_reset_s": 99}))
    assert [status for status, _ in results] == [200, 200]
    assert await (await http.get("/api/v1/settings/retry", headers=admin)).json() == {
        **saved, "jitter": False, "breaker_reset_s": 99}
