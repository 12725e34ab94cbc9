"""The served OpenAPI document against what runs (api.md: "must match what runs"): real
requests through a gateway over the real services, each answer's status listed for its
route, its body valid for that status's schema (every field it carries documented), and an
error's code among those the document names for that status."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from shared.db import make_engine
from services.gateway.identity import create_key, create_tenant
from services.gateway.routes import API, LOCAL_ROUTES, ROUTES
from tests.stack import Stack

SLOW = [{"name": "a", "handler": "flaky", "params": {"sleep_ms": 3000}}]
FAILING = [{"name": "a", "handler": "flaky", "params": {"fail_attempts": 99, "dependency": "dep"}}]
NOOP = [{"name": "a", "handler": "noop"}]


# ---- a validator for the subset of JSON Schema the document uses ---------------------------

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def problems(value: Any, schema: dict, doc: dict, where: str = "$") -> list[str]:
    """What is wrong with ``value`` under ``schema`` ($ref, anyOf, type, enum, required,
    properties, additionalProperties, items, minimum, maximum). Stricter than JSON Schema
    in one way: an object's field that its schema does not name is a problem unless the
    schema says additionalProperties, so that the document cannot leave out what runs."""
    if "$ref" in schema:
        return problems(value, doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]], doc, where)
    if "anyOf" in schema:
        found = [problems(value, option, doc, where) for option in schema["anyOf"]]
        return [] if any(not p for p in found) else [f"{where}: matches no anyOf option: {found}"]
    kinds = schema.get("type")
    if kinds is not None and not any(_is(value, k) for k in ([kinds] if isinstance(kinds, str) else kinds)):
        return [f"{where}: {value!r} is not {kinds}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not in {schema['enum']}"]
    out = []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"] or "maximum" in schema and value > schema["maximum"]:
            out.append(f"{where}: {value} out of range")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{where}: {name} is required" for name in schema.get("required", []) if name not in value]
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            if name in props:
                out += problems(item, props[name], doc, f"{where}.{name}")
            elif isinstance(extra, dict):
                out += problems(item, extra, doc, f"{where}.{name}")
            elif extra is None and kinds is not None:
                out.append(f"{where}: {name} is not documented")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += problems(item, schema["items"], doc, f"{where}[{i}]")
    return out


# ---- the system ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def api(make_settings):
    settings = await make_settings(port=0)
    stack = await Stack(settings).start("billing", "coordinator", "executor", "notifier", "gateway")
    gateway = stack.services["gateway"][0]
    engine = make_engine(settings, pool_size=1)
    tenants = {name: await create_tenant(engine, name) for name in ("acme", "other", "poor")}
    for name, tenant in tenants.items():
        await stack.call("billing", "open_account", tenant_id=tenant, monthly_allowance=1 if name == "poor" else 100)
    acme = tenants["acme"]
    keys = {role: await create_key(engine, acme, role, role) for role in ("member", "tenant_admin", "platform_admin")}
    keys["other"] = await create_key(engine, tenants["other"], "tenant_admin", "o")
    keys["poor"] = await create_key(engine, tenants["poor"], "tenant_admin", "p")
    await engine.dispose()
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gateway.port}") as http:
        doc = await (await http.get(API + "/openapi.json")).json()
        yield Api(http, doc, keys, tenants, gateway.app)
    await stack.stop()


class Api:
    def __init__(self, http, doc, keys, tenants, app) -> None:
        self.http, self.doc, self.keys, self.tenants, self.app = http, doc, keys, tenants, app

    async def ask(self, method: str, route: str, status: int, key: str | None = "tenant_admin", *, code: str | None = None,
                  json: Any = None, data: bytes | None = None, headers: dict | None = None, query: dict | None = None,
                  **params: Any) -> Any:
        """Send ``method route`` (``route`` as the route table names it, its {params} from
        ``params``); check the answer is ``status`` (and ``code``) and as documented."""
        path = _full(route)
        sent = {**({"Authorization": f"Bearer {self.keys[key]}"} if key else {}), **(headers or {})}
        async with self.http.request(method, path.format(**params), json=json, data=data, headers=sent,
                                     params=query) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
        assert r.status == status, (method, path, r.status, body)
        if code is not None:
            assert body["error"]["code"] == code, body
        check(self.doc, method, path, r.status, r.content_type, body)
        return body


def _full(route: str) -> str:
    return route if route in {r.path for r in LOCAL_ROUTES} else API + route


def check(doc: dict, method: str, path: str, status: int, content_type: str, body: Any) -> None:
    """``status`` is listed for the operation (not only covered by ``default``); the body
    is valid for its schema; an error's code is among those listed for that status."""
    responses = doc["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, documented: {sorted(responses)}"
    response = responses[str(status)]
    if status == 204:
        assert "content" not in response
        return
    assert content_type in response["content"], (method, path, status, content_type)
    schema = response["content"][content_type]["schema"]
    assert schema, f"{method} {path} {status}: empty schema"
    assert not (found := problems(body, schema, doc)), f"{method} {path} {status}: {found}"
    if status >= 400:
        assert body["error"]["code"] in response["x-redrive-error-codes"], (method, path, status, body)


async def until(api: Api, method: str, route: str, done, key: str = "tenant_admin", timeout: float = 30, **params):
    deadline = time.monotonic() + timeout
    while True:
        body = await api.ask(method, route, 200, key, **params)
        if done(body):
            return body
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.1)


async def template(api: Api, steps: list[dict], key: str = "tenant_admin") -> str:
    return (await api.ask("POST", "/templates", 201, key, json={"name": "t", "steps": steps}))["id"]


def finished(run: dict) -> bool:
    return run["status"] != "RUNNING"


# ---- the tests -----------------------------------------------------------------------------

async def test_every_route_is_served_and_documented_with_its_methods(api):
    doc = api.doc
    documented = {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}
    routed = {(r.method, r.resource.canonical) for r in api.app.router.routes() if r.method != "HEAD"}
    tables = {(r.method, API + r.path) for r in ROUTES} | {(r.method, r.path) for r in LOCAL_ROUTES}
    assert documented == routed == tables
    for route in ROUTES:
        op = doc["paths"][API + route.path][route.method.lower()]
        assert {str(route.status), "401", "403", "503", "default"} <= set(op["responses"]), route
        success = op["responses"][str(route.status)]
        assert route.status == 204 or success["content"]["application/json"]["schema"], route
    for name in ("Run", "RunPage", "Template", "TemplatePage", "Balance", "LedgerPage", "NotificationPage",
                 "RetrySettings", "BreakerList", "AttentionPage", "TimelinePage", "Error"):
        assert name in doc["components"]["schemas"], name


async def test_templates_and_runs_answer_as_documented(api):
    tid = await api.ask("POST", "/templates", 201, json={"name": "t", "steps": NOOP},
                        headers={"Idempotency-Key": "tpl-1"})
    again = await api.ask("POST", "/templates", 201, json={"name": "t", "steps": NOOP},
                          headers={"Idempotency-Key": "tpl-1"})
    assert again == tid
    tid = tid["id"]
    await api.ask("GET", "/templates", 200)
    await api.ask("GET", "/templates/{template_id}", 200, "member", template_id=tid)
    await api.ask("GET", "/templates/{template_id}", 404, code="not_found", template_id="missing")
    body = {"template_id": tid, "files": [{"name": "a"}, {"name": "b"}]}
    run = await api.ask("POST", "/workflow-runs", 201, "member", json=body, headers={"Idempotency-Key": "run-1"})
    await api.ask("POST", "/workflow-runs", 422, "member", code="idempotency_key_reused",
                  json={**body, "max_retry_count": 5}, headers={"Idempotency-Key": "run-1"})
    await api.ask("POST", "/workflow-runs", 422, "member", code="validation_error", json={**body, "max_retry_count": 0})
    await api.ask("POST", "/workflow-runs", 400, "member", code="bad_request", data=b"{not json",
                  headers={"Content-Type": "application/json"})
    await api.ask("POST", "/workflow-runs", 404, "member", code="not_found", json={**body, "template_id": "missing"})
    run = await until(api, "GET", "/workflow-runs/{run_id}", finished, "member", run_id=run["id"])
    assert run["status"] == "COMPLETED" and len(run["files"]) == 2
    listed = await api.ask("GET", "/workflow-runs", 200, "member", query={"status": "completed", "limit": "5"})
    assert run["id"] in [r["id"] for r in listed["items"]]
    await api.ask("GET", "/workflow-runs", 422, "member", code="validation_error", query={"limit": "0"})
    await api.ask("GET", "/workflow-runs/{run_id}/timeline", 200, "member", run_id=run["id"])
    await api.ask("GET", "/workflow-runs/{run_id}", 404, "other", code="not_found", run_id=run["id"])


async def test_refusals_of_the_run_actions_are_documented(api):
    done = await api.ask("POST", "/workflow-runs", 201, "member",
                         json={"template_id": await template(api, NOOP), "files": [{"name": "a"}]})
    done = await until(api, "GET", "/workflow-runs/{run_id}", finished, run_id=done["id"])
    run_id = done["id"]
    await api.ask("POST", "/workflow-runs/{run_id}/retry-failed", 400, code="run_completed", run_id=run_id)
    await api.ask("POST", "/workflow-runs/{run_id}/retry-failed", 403, "member", code="forbidden", run_id=run_id)
    await api.ask("POST", "/workflow-runs/{run_id}/retry-failed", 404, "other", code="not_found", run_id=run_id)
    await api.ask("POST", "/workflow-runs/{run_id}/retry-failed", 401, None, code="unauthorized", run_id=run_id)
    await api.ask("POST", "/workflow-runs/{run_id}/recover", 409, code="run_not_recoverable", run_id=run_id)
    await api.ask("POST", "/workflows/{run_id}/recover", 409, code="run_not_recoverable", run_id=run_id)
    await api.ask("POST", "/workflow-runs/{run_id}/cancel", 409, code="conflict", run_id=run_id)
    for action, code in (("retry", "file_not_failed"), ("skip", "step_not_optional")):
        await api.ask("POST", f"/workflow-runs/{{run_id}}/files/{{file_index}}/{action}", 400, code=code,
                      run_id=run_id, file_index=0)
        await api.ask("POST", f"/workflow-runs/{{run_id}}/files/{{file_index}}/{action}", 404, code="not_found",
                      run_id=run_id, file_index=9)
    running = await api.ask("POST", "/workflow-runs", 201, "member",
                            json={"template_id": await template(api, SLOW), "files": [{"name": "a"}]})
    await api.ask("POST", "/workflow-runs/{run_id}/retry-failed", 409, code="run_running", run_id=running["id"],
                  headers={"Idempotency-Key": "continue-1"})
    await api.ask("POST", "/workflow-runs/{run_id}/files/{file_index}/retry", 409, code="file_pending",
                  run_id=running["id"], file_index=0)
    await api.ask("POST", "/workflow-runs/{run_id}/recover", 409, code="run_not_recoverable", run_id=running["id"])
    await api.ask("POST", "/workflow-runs/{run_id}/cancel", 200, run_id=running["id"])
    await api.ask("POST", "/admin/workflow-runs/{run_id}/restore", 409, "platform_admin", code="conflict",
                  json={"checkpoint_step": -1}, run_id=running["id"])


async def test_credits_settings_notifications_and_operators_are_documented(api):
    tenant = api.tenants["poor"]  # 1 credit a month
    settings = await api.ask("PUT", "/settings/retry", 200, "poor", json={"auto_retries": 0})
    assert settings["auto_retries"] == 0
    await api.ask("GET", "/settings/retry", 200, "poor")
    await api.ask("PUT", "/settings/retry", 422, "poor", code="validation_error", json={"auto_retries": 11})
    tid = await template(api, FAILING, "poor")
    run = await api.ask("POST", "/workflow-runs", 201, "poor", json={"template_id": tid, "files": [{"name": "a"}]})
    run = await until(api, "GET", "/workflow-runs/{run_id}", finished, "poor", run_id=run["id"])
    assert run["files"][0]["status"] == "FAILED" and run["files"][0]["last_error"], run
    short = await api.ask("POST", "/workflow-runs/{run_id}/retry-failed", 402, "poor", code="insufficient_credits",
                          run_id=run["id"])
    assert short["error"]["details"] == {"needed": 1, "available": 0}
    await api.ask("POST", "/workflow-runs/{run_id}/files/{file_index}/retry", 402, "poor",
                  code="insufficient_credits", run_id=run["id"], file_index=0)
    await api.ask("POST", "/workflow-runs", 402, "poor", code="insufficient_credits",
                  json={"template_id": tid, "files": [{"name": "b"}]})
    await api.ask("POST", "/workflow-runs/{run_id}/files/{file_index}/skip", 400, "poor", code="step_not_optional",
                  run_id=run["id"], file_index=0)
    await api.ask("GET", "/credits", 200, "poor")
    await api.ask("GET", "/credits/ledger", 200, "poor")
    await api.ask("POST", "/admin/tenants/{tenant_id}/credits", 200, "platform_admin", json={"purchased": 5},
                  tenant_id=tenant, headers={"Idempotency-Key": "grant-1"})
    await api.ask("POST", "/admin/tenants/{tenant_id}/credits", 403, "poor", code="forbidden", json={"purchased": 5},
                  tenant_id=tenant)
    notes = await until(api, "GET", "/notifications", lambda page: page["items"], "poor")
    await api.ask("POST", "/notifications/{id}/read", 200, "poor", id=notes["items"][0]["id"])
    await api.ask("POST", "/notifications/{id}/read", 404, "poor", code="not_found", id="missing")
    attention = await until(api, "GET", "/admin/attention", lambda page: page["items"], "poor")
    assert attention["items"][0]["id"] == run["id"]
    await until(api, "GET", "/admin/breakers", lambda breakers: breakers, "poor")
    await api.ask("GET", "/admin/breakers", 200, "platform_admin")
    assert await api.ask("GET", "/webhook", 200, "poor") is None
    await api.ask("GET", "/webhook/deliveries", 200, "poor")
    await api.ask("POST", "/webhook/deliveries/redeliver-failed", 409, "poor", code="conflict")
    # A delivery's id is an opaque string (a UUID): an integer names none.
    await api.ask("POST", "/webhook/deliveries/{delivery_id}/redeliver", 404, "poor", code="not_found", delivery_id="1")
    await api.ask("GET", "/api/v1/me", 200, "poor")
    await api.ask("GET", "/api/v1/me", 404, "platform_admin", code="not_found", headers={"X-Tenant-Id": "nobody"})
    await api.ask("GET", "/healthz", 200, None)
    await api.ask("GET", "/readyz", 200, None)
