"""The gateway alone, over real NATS and PostgreSQL, in front of fake services.

The fakes are real NATS micro endpoints (shared.rpc.MicroService) that record what they
were sent, so these tests exercise the real request/reply path without the coordinator,
billing or notifier. The executor is deliberately absent: asking it must be a 503.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict

import aiohttp
import pytest
from sqlalchemy import text

from shared import bus
from shared.db import make_engine
from shared.messages import ServiceError
from shared.rpc import MicroService
from shared.subjects import Names
from services.gateway.bootstrap import build
from services.gateway.idempotency import request_hash
from services.gateway.identity import authenticate, create_key, create_tenant, revoke_key
from services.gateway.routes import run_id_for

RUN_BODY = {"template_id": "tpl", "files": [{"name": "a.pdf"}]}


class Fakes:
    """Coordinator, billing and notifier verbs that echo what they were sent."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict]] = defaultdict(list)
        self.runs: dict[str, dict] = {}

    def echo(self, name: str):
        async def verb(payload: dict):
            self.calls[name].append(payload)
            return {"verb": name, **payload}

        return verb

    async def create_run(self, payload: dict):
        self.calls["create_run"].append(payload)
        template = payload["template_id"]
        if template == "poor":
            raise ServiceError("insufficient_credits", "not enough credits", {"needed": 5, "available": 2})
        if template == "slow":
            await asyncio.sleep(1.0)
        if template == "hangs":  # no answer within the gateway's wait: done or not, nobody can tell it
            await asyncio.sleep(10)
        run = {"id": payload.get("run_id") or uuid.uuid4().hex, "tenant_id": payload["tenant_id"],
               "template_id": template, "status": "RUNNING"}
        if template == "boom":
            raise RuntimeError("a bug in the coordinator")
        if template == "late":  # made, but only after the caller gave up on the answer
            asyncio.get_running_loop().call_later(0.3, self.runs.__setitem__, run["id"], run)
            raise RuntimeError("timed out")
        self.runs[run["id"]] = run
        if template == "lost":  # made, but the answer never comes back
            raise RuntimeError("crashed after commit")
        return run

    async def get_run(self, payload: dict):
        self.calls["get_run"].append(payload)
        run = self.runs.get(payload["run_id"])
        if run is None or run["tenant_id"] != payload["tenant_id"]:
            raise ServiceError("not_found", f"run {payload['run_id']} was not found")
        return run

    def services(self, nc, names: Names) -> list[MicroService]:
        coordinator = {v: self.echo(v) for v in (
            "create_template", "list_templates", "get_template", "archive_template", "list_runs", "timeline",
            "retry_failed", "recover", "retry_file", "skip_file", "cancel", "get_settings", "put_settings",
            "attention", "restore")}
        coordinator |= {"create_run": self.create_run, "get_run": self.get_run}
        billing = {v: self.echo(v) for v in ("balance", "ledger", "grant")}
        notifier = {v: self.echo(v) for v in ("list", "mark_read", "put_webhook", "get_webhook", "delete_webhook",
                                             "list_deliveries", "redeliver", "redeliver_failed")}
        return [MicroService(nc, names, "coordinator", coordinator, "fake"),
                MicroService(nc, names, "billing", billing, "fake"),
                MicroService(nc, names, "notifier", notifier, "fake")]


@pytest.fixture(scope="module")
async def gw(make_settings):
    # The SSE tests (here, test_sse_tenant_routing, test_notifier_receivers) hold up to 150
    # streams with one key: past the default caps, which test_gateway_limits covers.
    settings = await make_settings(port=0, request_timeout_s=3, max_request_bytes=2 * 2**20,
                                   sse_max_per_key=500, sse_max_per_tenant=500)
    names = Names(settings.prefix)
    nc = await bus.connect(settings, "fakes")
    fakes = Fakes()
    micro = fakes.services(nc, names)
    for service in micro:
        await service.start()
    engine = make_engine(settings, pool_size=2)
    acme = await create_tenant(engine, "acme")
    other = await create_tenant(engine, "other")
    keys = {role: await create_key(engine, acme, role, f"{role}-user") for role in ("member", "tenant_admin", "platform_admin")}
    keys["other"] = await create_key(engine, other, "tenant_admin", "olga")
    gateway = await build(settings)
    await gateway.start()
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gateway.port}") as http:
        yield {"http": http, "keys": keys, "acme": acme, "other": other, "fakes": fakes, "engine": engine,
               "nc": nc, "names": names, "gateway": gateway}
    await gateway.stop()
    for service in micro:
        await service.stop()
    await nc.close()
    await engine.dispose()


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


async def nonce_of(gw, key: str) -> str:
    """The nonce the gateway drew for a key (idempotency.py): a keyed run's id comes from it."""
    async with gw["engine"].connect() as conn:
        (nonce,) = (await conn.execute(text("SELECT nonce FROM gateway.idempotency WHERE key = :k"), {"k": key})).one()
    assert nonce
    return nonce


async def error_of(response: aiohttp.ClientResponse) -> dict:
    text_ = await response.text()
    assert "Traceback" not in text_ and 'File "' not in text_
    return json.loads(text_)["error"]


# ---- authentication and roles -------------------------------------------------------------------

async def test_a_request_without_a_key_or_with_an_unknown_key_is_401(gw):
    http = gw["http"]
    for headers in ({}, auth("rk_" + "x" * 43), auth("not-a-key"), {"Authorization": "Basic abc"}):
        r = await http.get("/api/v1/workflow-runs", headers=headers)
        assert r.status == 401 and (await error_of(r))["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert not gw["fakes"].calls["list_runs"]


async def test_a_revoked_key_stops_authenticating(gw):
    engine = gw["engine"]
    key = await create_key(engine, gw["acme"], "member", "leaver")
    principal = await authenticate(engine, key)
    assert principal is not None and principal.tenant_id == gw["acme"] and principal.role == "member"
    assert await revoke_key(engine, principal.key_id)
    assert await authenticate(engine, key) is None


async def test_a_member_may_not_retry_failed_files_but_a_tenant_admin_may(gw):
    http, keys = gw["http"], gw["keys"]
    r = await http.post("/api/v1/workflow-runs/r1/retry-failed", headers=auth(keys["member"]))
    assert r.status == 403 and (await error_of(r))["code"] == "forbidden"
    r = await http.post("/api/v1/workflow-runs/r1/retry-failed", headers=auth(keys["tenant_admin"]))
    assert r.status == 200
    assert (await r.json())["run_id"] == "r1"


async def test_retry_settings_are_read_and_changed_by_tenant_admins_only(gw):
    # product.md: "Retry-failed, recover, skip, cancel, settings: platform_admin and tenant_admin".
    http, keys = gw["http"], gw["keys"]
    r = await http.get("/api/v1/settings/retry", headers=auth(keys["member"]))
    assert r.status == 403 and not gw["fakes"].calls["get_settings"]
    assert (await http.get("/api/v1/settings/retry", headers=auth(keys["tenant_admin"]))).status == 200


async def test_x_tenant_id_for_another_tenant_from_a_non_admin_is_403(gw):
    r = await gw["http"].get("/api/v1/credits", headers=auth(gw["keys"]["tenant_admin"], **{"X-Tenant-Id": gw["other"]}))
    assert r.status == 403 and (await error_of(r))["code"] == "forbidden"
    own = await gw["http"].get("/api/v1/credits", headers=auth(gw["keys"]["member"], **{"X-Tenant-Id": gw["acme"]}))
    assert own.status == 200


async def test_a_platform_admin_acts_on_the_tenant_named_by_x_tenant_id(gw):
    r = await gw["http"].get("/api/v1/workflow-runs?status=failed&needs_attention=true&limit=5",
                             headers=auth(gw["keys"]["platform_admin"], **{"X-Tenant-Id": gw["other"]}))
    assert r.status == 200
    sent = await r.json()
    assert sent["tenant_id"] == gw["other"] and sent["actor"] == "platform_admin-user"
    assert sent["status"] == "FAILED" and sent["needs_attention"] is True and sent["limit"] == 5


async def test_attention_covers_every_tenant_only_for_a_platform_admin_without_x_tenant_id(gw):
    http, keys = gw["http"], gw["keys"]
    assert (await (await http.get("/api/v1/admin/attention", headers=auth(keys["platform_admin"]))).json())["tenant_id"] is None
    r = await http.get("/api/v1/admin/attention", headers=auth(keys["platform_admin"], **{"X-Tenant-Id": gw["other"]}))
    assert (await r.json())["tenant_id"] == gw["other"]
    assert (await (await http.get("/api/v1/admin/attention", headers=auth(keys["tenant_admin"]))).json())["tenant_id"] == gw["acme"]
    assert (await http.get("/api/v1/admin/attention", headers=auth(keys["member"]))).status == 403


async def test_me_says_who_the_key_is_and_which_tenant_it_acts_on(gw):
    http, keys = gw["http"], gw["keys"]
    answer = await http.get("/api/v1/me", headers=auth(keys["member"]))
    assert b'", "' not in await answer.read()  # written as every answer is (compact), not by json.dumps
    member = await answer.json()
    assert (member["tenant_id"], member["key_tenant_id"], member["role"]) == (gw["acme"], gw["acme"], "member")
    r = await http.get("/api/v1/me", headers=auth(keys["platform_admin"], **{"X-Tenant-Id": gw["other"]}))
    admin = await r.json()
    assert (admin["tenant_id"], admin["role"]) == (gw["other"], "platform_admin") and admin["key_tenant_id"] != gw["other"]
    assert (await http.get("/api/v1/me", headers=auth(keys["member"], **{"X-Tenant-Id": gw["other"]}))).status == 403
    assert (await http.get("/api/v1/me")).status == 401


async def test_a_grant_goes_to_the_tenant_in_the_path_under_a_namespaced_key(gw):
    http, keys, other = gw["http"], gw["keys"], gw["other"]
    path = f"/api/v1/admin/tenants/{other}/credits"
    assert (await http.post(path, json={"purchased": 5}, headers=auth(keys["tenant_admin"]))).status == 403
    r = await http.post(path, json={"purchased": 5}, headers=auth(keys["platform_admin"], **{"Idempotency-Key": "g-1"}))
    sent = await r.json()
    assert r.status == 200 and sent["tenant_id"] == other and sent["purchased"] == 5
    assert sent["idempotency_key"] == f"grant:g-1:{await nonce_of(gw, 'g-1')}"
    r = await http.post(path, json={"purchased": 0}, headers=auth(keys["platform_admin"]))
    assert r.status == 422 and "purchased" in (await error_of(r))["details"]["fields"]


# ---- errors -------------------------------------------------------------------------------------------

async def test_not_found_from_the_owning_service_is_404(gw):
    r = await gw["http"].get("/api/v1/workflow-runs/missing", headers=auth(gw["keys"]["member"]))
    error = await error_of(r)
    assert r.status == 404 and error["code"] == "not_found" and "missing" in error["message"]


@pytest.mark.parametrize("body, field", [
    ({**RUN_BODY, "max_retry_count": 0}, "max_retry_count"),
    ({**RUN_BODY, "max_retry_count": 11}, "max_retry_count"),
    ({**RUN_BODY, "files": []}, "files"),
    ({"files": [{"name": "a"}]}, "template_id"),
    ({**RUN_BODY, "mode": "sometimes"}, "mode"),
])
async def test_an_invalid_run_body_is_422_with_the_field_and_never_forwarded(gw, body, field):
    before = len(gw["fakes"].calls["create_run"])
    r = await gw["http"].post("/api/v1/workflow-runs", json=body, headers=auth(gw["keys"]["member"]))
    error = await error_of(r)
    assert r.status == 422 and error["code"] == "validation_error" and field in error["details"]["fields"]
    assert len(gw["fakes"].calls["create_run"]) == before


async def test_invalid_settings_query_strings_and_path_parameters_are_422(gw):
    http, admin = gw["http"], auth(gw["keys"]["tenant_admin"])
    r = await http.put("/api/v1/settings/retry", headers=admin,
                       json={"auto_retries": 11, "backoff_base_ms": 500, "backoff_max_ms": 100})
    assert r.status == 422 and {"auto_retries", "backoff_max_ms"} <= set((await error_of(r))["details"]["fields"])
    r = await http.put("/api/v1/webhook", headers=admin, json={"url": "ftp://x", "secret": "short"})
    assert r.status == 422 and {"url", "secret"} <= set((await error_of(r))["details"]["fields"])
    r = await http.get("/api/v1/workflow-runs?limit=lots", headers=admin)
    assert r.status == 422 and "limit" in (await error_of(r))["details"]["fields"]
    r = await http.post("/api/v1/workflow-runs/r1/files/first/retry", headers=admin)
    assert r.status == 422 and "file_index" in (await error_of(r))["details"]["fields"]
    r = await http.post("/api/v1/workflow-runs/r1/files/2/skip", headers=admin)
    assert r.status == 200 and (await r.json())["file_index"] == 2


async def test_a_body_that_is_not_json_is_400(gw):
    r = await gw["http"].post("/api/v1/workflow-runs", data=b"{not json", headers=auth(gw["keys"]["member"]))
    assert r.status == 400 and (await error_of(r))["code"] == "bad_request"


async def test_a_body_larger_than_the_api_takes_is_413(gw):
    big = {**RUN_BODY, "files": [{"name": f"f{i}", "url": "https://example.com/" + "x" * 1000} for i in range(2100)]}
    r = await gw["http"].post("/api/v1/workflow-runs", json=big, headers=auth(gw["keys"]["member"]))
    error = await error_of(r)
    assert r.status == 413 and error["code"] == "payload_too_large"
    assert "Maximum request body size" in error["message"] and "fewer files" in error["message"]


async def test_a_file_larger_than_the_bus_carries_is_413(gw):
    # Within the API's limit, but one file alone does not fit in a message: nothing can carry it.
    big = {**RUN_BODY, "files": [{"name": "a", "content_b64": "QUFB" * 300_000}]}
    r = await gw["http"].post("/api/v1/workflow-runs", json=big, headers=auth(gw["keys"]["member"]))
    error = await error_of(r)
    assert r.status == 413 and error["code"] == "payload_too_large" and "by url" in error["message"]


async def test_insufficient_credits_is_402_with_needed_and_available(gw):
    r = await gw["http"].post("/api/v1/workflow-runs", json={**RUN_BODY, "template_id": "poor"},
                              headers=auth(gw["keys"]["member"]))
    error = await error_of(r)
    assert r.status == 402 and error["code"] == "insufficient_credits"
    assert error["details"] == {"needed": 5, "available": 2}


async def test_a_service_nobody_answers_for_is_503_with_retry_after(gw):
    r = await gw["http"].get("/api/v1/admin/breakers", headers=auth(gw["keys"]["member"]))
    error = await error_of(r)
    assert r.status == 503 and r.headers["Retry-After"] == "2" and error["code"] == "service_unavailable"


async def test_a_command_without_an_answer_in_time_says_it_may_have_been_done(gw):
    r = await gw["http"].post("/api/v1/workflow-runs", json={**RUN_BODY, "template_id": "hangs"},
                              headers=auth(gw["keys"]["member"], **{"Idempotency-Key": "k-hangs"}))
    error = await error_of(r)
    assert r.status == 503 and error["code"] == "service_unavailable"
    assert error["message"] == ("the coordinator service did not answer in time; it may have been done: "
                                "send it again with the same Idempotency-Key to get its answer"), error


async def test_a_failing_service_is_a_500_without_its_stack(gw):
    r = await gw["http"].post("/api/v1/workflow-runs", json={**RUN_BODY, "template_id": "boom"},
                              headers=auth(gw["keys"]["member"]))
    assert r.status == 500 and (await error_of(r))["code"] == "internal"


async def test_unknown_routes_are_404_and_wrong_methods_405_in_the_error_shape(gw):
    http, member = gw["http"], auth(gw["keys"]["member"])
    r = await http.get("/api/v1/nowhere", headers=member)
    assert r.status == 404 and (await error_of(r))["code"] == "not_found"
    assert (await http.get("/api/v1/nowhere")).status == 404  # no key needed to learn that
    r = await http.patch("/api/v1/workflow-runs", headers=member)
    assert r.status == 405 and (await error_of(r))["code"] == "method_not_allowed" and "GET" in r.headers["Allow"]


async def test_archiving_a_template_is_204_with_no_body(gw):
    r = await gw["http"].delete("/api/v1/templates/t1", headers=auth(gw["keys"]["tenant_admin"]))
    assert r.status == 204 and await r.read() == b""
    assert gw["fakes"].calls["archive_template"][-1]["template_id"] == "t1"


async def test_removing_the_webhook_is_for_tenant_admins(gw):
    r = await gw["http"].delete("/api/v1/webhook", headers=auth(gw["keys"]["member"]))
    assert r.status == 403 and not gw["fakes"].calls["delete_webhook"]
    r = await gw["http"].delete("/api/v1/webhook", headers=auth(gw["keys"]["tenant_admin"]))
    assert r.status == 200 and gw["fakes"].calls["delete_webhook"][-1]["tenant_id"] == gw["acme"]


async def test_the_webhook_itself_is_shown_to_tenant_admins_only(gw):
    """Its URL is often a secret of its own (a Slack hook's path, a token, user:pass@)."""
    r = await gw["http"].get("/api/v1/webhook", headers=auth(gw["keys"]["member"]))
    assert r.status == 403 and not gw["fakes"].calls["get_webhook"]
    r = await gw["http"].get("/api/v1/webhook", headers=auth(gw["keys"]["tenant_admin"]))
    assert r.status == 200 and gw["fakes"].calls["get_webhook"][-1]["tenant_id"] == gw["acme"]


async def test_webhook_deliveries_are_read_by_members_and_sent_again_by_tenant_admins(gw):
    http, member, admin = gw["http"], auth(gw["keys"]["member"]), auth(gw["keys"]["tenant_admin"])
    r = await http.get("/api/v1/webhook/deliveries?status=failed&limit=5&cursor=12", headers=member)
    assert r.status == 200
    asked = gw["fakes"].calls["list_deliveries"][-1]
    assert (asked["tenant_id"], asked["status"], asked["limit"], asked["cursor"]) == (gw["acme"], "failed", 5, "12")
    r = await http.get("/api/v1/webhook/deliveries?status=lost", headers=member)
    assert r.status == 422 and "status" in (await error_of(r))["details"]["fields"]
    for path in ("/api/v1/webhook/deliveries/7/redeliver", "/api/v1/webhook/deliveries/redeliver-failed"):
        assert (await http.post(path, headers=member)).status == 403
    assert not gw["fakes"].calls["redeliver"] and not gw["fakes"].calls["redeliver_failed"]
    assert (await http.post("/api/v1/webhook/deliveries/7/redeliver", headers=admin)).status == 200
    asked = gw["fakes"].calls["redeliver"][-1]
    assert (asked["tenant_id"], asked["delivery_id"]) == (gw["acme"], "7")  # an opaque id: the notifier's 404
    assert (await http.post("/api/v1/webhook/deliveries/redeliver-failed", headers=admin)).status == 200
    assert gw["fakes"].calls["redeliver_failed"][-1]["tenant_id"] == gw["acme"]
    for bad in ("a" * 201, "%00"):  # too long, a control character: malformed before any lookup
        r = await http.post(f"/api/v1/webhook/deliveries/{bad}/redeliver", headers=admin)
        assert r.status == 422 and "delivery_id" in (await error_of(r))["details"]["fields"], bad


# ---- idempotency ---------------------------------------------------------------------------------

async def test_the_same_idempotency_key_and_body_replays_the_first_response_once(gw):
    http, acme, fakes = gw["http"], gw["acme"], gw["fakes"]
    headers = auth(gw["keys"]["member"], **{"Idempotency-Key": "same-1"})
    first = await http.post("/api/v1/workflow-runs", json=RUN_BODY, headers=headers)
    again = await http.post("/api/v1/workflow-runs", data=json.dumps(RUN_BODY, indent=2), headers=headers)
    assert first.status == again.status == 201 and await first.read() == await again.read()
    assert again.headers["Idempotent-Replayed"] == "true"
    run_id = run_id_for(acme, "same-1", await nonce_of(gw, "same-1"))
    made = [c for c in fakes.calls["create_run"] if c.get("run_id") == run_id]
    assert len(made) == 1 and (await first.json())["id"] == run_id


async def test_the_same_key_with_another_body_is_422_idempotency_key_reused(gw):
    headers = auth(gw["keys"]["member"], **{"Idempotency-Key": "same-2"})
    assert (await gw["http"].post("/api/v1/workflow-runs", json=RUN_BODY, headers=headers)).status == 201
    r = await gw["http"].post("/api/v1/workflow-runs", json={**RUN_BODY, "max_retry_count": 5}, headers=headers)
    assert r.status == 422 and (await error_of(r))["code"] == "idempotency_key_reused"


async def test_a_duplicate_while_the_first_is_in_flight_is_409(gw):
    headers = auth(gw["keys"]["member"], **{"Idempotency-Key": "slow-1"})
    body = {**RUN_BODY, "template_id": "slow"}
    first = asyncio.create_task(gw["http"].post("/api/v1/workflow-runs", json=body, headers=headers))
    await asyncio.sleep(0.3)
    second = await gw["http"].post("/api/v1/workflow-runs", json=body, headers=headers)
    assert second.status == 409 and (await error_of(second))["code"] == "idempotency_in_progress"
    assert (await first).status == 201


async def test_a_5xx_is_not_stored_so_a_retry_runs_again_under_the_same_run_id(gw):
    headers = auth(gw["keys"]["member"], **{"Idempotency-Key": "boom-1"})
    body = {**RUN_BODY, "template_id": "boom"}
    for _ in range(2):
        assert (await gw["http"].post("/api/v1/workflow-runs", json=body, headers=headers)).status == 500
    tries = [c for c in gw["fakes"].calls["create_run"]
             if c.get("run_id") == run_id_for(gw["acme"], "boom-1", await nonce_of(gw, "boom-1"))]
    assert len(tries) == 2


async def test_after_a_5xx_the_same_key_with_another_body_is_still_422(gw):
    """The failed attempt may have made its run: the key stays that request's."""
    headers = auth(gw["keys"]["member"], **{"Idempotency-Key": "boom-2"})
    body = {**RUN_BODY, "template_id": "boom"}
    assert (await gw["http"].post("/api/v1/workflow-runs", json=body, headers=headers)).status == 500
    r = await gw["http"].post("/api/v1/workflow-runs", json=RUN_BODY, headers=headers)
    assert r.status == 422 and (await error_of(r))["code"] == "idempotency_key_reused"


async def test_a_run_made_after_its_attempt_got_a_5xx_is_found_by_the_retry(gw):
    """The coordinator answered too late (the gateway had given up and said 500), but made
    the run: the retry under the same key must find it, not make and charge another."""
    acme, fakes = gw["acme"], gw["fakes"]
    headers = auth(gw["keys"]["member"], **{"Idempotency-Key": "late-1"})
    body = {**RUN_BODY, "template_id": "late"}
    assert (await gw["http"].post("/api/v1/workflow-runs", json=body, headers=headers)).status == 500
    run_id = run_id_for(acme, "late-1", await nonce_of(gw, "late-1"))
    for _ in range(100):
        if run_id in fakes.runs:
            break
        await asyncio.sleep(0.05)
    r = await gw["http"].post("/api/v1/workflow-runs", json=body, headers=headers)
    assert r.status == 201 and (await r.json())["id"] == run_id
    assert len([c for c in fakes.calls["create_run"] if c.get("run_id") == run_id]) == 1


async def test_a_run_made_whose_answer_was_lost_is_found_by_its_key(gw):
    headers = auth(gw["keys"]["member"], **{"Idempotency-Key": "lost-1"})
    r = await gw["http"].post("/api/v1/workflow-runs", json={**RUN_BODY, "template_id": "lost"}, headers=headers)
    assert r.status == 201 and (await r.json())["id"] == run_id_for(gw["acme"], "lost-1", await nonce_of(gw, "lost-1"))


@pytest.mark.parametrize("nonce", ["0f" * 16, None], ids=["nonce", "recorded-before-nonces"])
async def test_a_key_left_in_progress_by_a_dead_gateway_is_taken_over_and_finds_its_run(gw, nonce):
    acme, fakes, key = gw["acme"], gw["fakes"], f"crashed-{nonce}"
    run_id = run_id_for(acme, key, nonce)
    fakes.runs[run_id] = {"id": run_id, "tenant_id": acme, "template_id": "tpl", "status": "RUNNING"}
    async with gw["engine"].begin() as conn:
        await conn.execute(text("INSERT INTO gateway.idempotency (tenant_id, key, request_hash, state, nonce, created_at) "
                                "VALUES (:t, :k, :h, 'in_progress', :n, now() - interval '10 minutes')"),
                           {"t": acme, "k": key, "n": nonce,
                            "h": request_hash("POST", "/api/v1/workflow-runs", RUN_BODY)})
    r = await gw["http"].post("/api/v1/workflow-runs", json=RUN_BODY,
                              headers=auth(gw["keys"]["member"], **{"Idempotency-Key": key}))
    assert r.status == 201 and (await r.json())["id"] == run_id
    assert not [c for c in fakes.calls["create_run"] if c.get("run_id") == run_id]


# ---- live events ---------------------------------------------------------------------------------

async def _sse(http, key: str, out: list, connected: asyncio.Event, until: str) -> None:
    async with http.get("/api/v1/events", headers=auth(key)) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        kind = None
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line == ": connected":
                connected.set()
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[6:])))
                if kind == until:
                    return


async def test_live_events_and_breakers_reach_their_own_tenant_only(gw):
    http, keys, nc, names = gw["http"], gw["keys"], gw["nc"], gw["names"]
    mine, theirs = [], []
    ready = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(_sse(http, keys["member"], mine, ready[0], "breaker.open")),
             asyncio.create_task(_sse(http, keys["other"], theirs, ready[1], "breaker.open"))]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 10)
    publish = [
        (names.run_event("completed"), {"tenant_id": gw["acme"], "run_id": "r-acme"}, None),
        (names.run_event("completed"), {"tenant_id": gw["other"], "run_id": "r-other"}, None),
        (names.file_event("retrying"), {"tenant_id": gw["acme"], "run_id": "r-acme", "attempt": 2},
         {"Redrive-Tenant": gw["acme"]}),
        # Breakers are per tenant and dependency: each tenant hears of its own.
        (names.breaker_event("open"), {"tenant_id": gw["acme"], "dependency": "ocr", "state": "open"}, None),
        (names.breaker_event("open"), {"tenant_id": gw["other"], "dependency": "pdf", "state": "open"}, None),
    ]
    for subject, body, headers in publish:
        await nc.publish(subject, json.dumps(body).encode(), headers=headers)
    await nc.flush()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert [(k, e.get("run_id") or e.get("dependency")) for k, e in mine] == [
        ("run.completed", "r-acme"), ("file.retrying", "r-acme"), ("breaker.open", "ocr")]
    assert [(k, e.get("run_id") or e.get("dependency")) for k, e in theirs] == [
        ("run.completed", "r-other"), ("breaker.open", "pdf")]


async def test_events_need_a_key(gw):
    assert (await gw["http"].get("/api/v1/events")).status == 401


# ---- service endpoints and the document ---------------------------------------------------------

async def test_service_endpoints_need_no_key(gw):
    http = gw["http"]
    assert (await http.get("/api/v1/workflow-runs/missing", headers=auth(gw["keys"]["member"]))).status == 404
    assert await (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status == 200 and (await ready.json())["checks"] == {"nats": True, "database": True}
    metrics = await (await http.get("/metrics")).text()
    assert 'redrive_http_requests_total{method="GET",route="/api/v1/workflow-runs/{run_id}",status="404"}' in metrics
    # No executor answers here: the scrape still answers, and says that source is down.
    assert 'redrive_metrics_source_up{source="breakers"} 0.0' in metrics and "redrive_breaker_state{" not in metrics
    page = await http.get("/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")


async def test_the_openapi_document_lists_exactly_the_routes_that_run(gw):
    doc = await (await gw["http"].get("/api/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    running = {(r.method, r.resource.canonical) for r in gw["gateway"].app.router.routes() if r.method != "HEAD"}
    assert documented == running
