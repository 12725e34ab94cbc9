"""The aiohttp application: authentication, validation, forwarding, errors."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import ValidationError

from shared.db import ping
from shared.messages import ServiceError, dumps
from shared.rpc import RpcClient
from services.gateway import idempotency
from services.gateway.errors import error_response, from_service_error
from services.gateway.events import EventHub
from services.gateway.identity import KeyStore, Principal
from services.gateway.openapi import openapi_document
from services.gateway.routes import ROUTES, Route, query_payload
from services.gateway.schemas import field_errors

log = structlog.get_logger(__name__)
API = "/api/v1"
PUBLIC = {"/healthz", "/readyz", "/metrics", "/", f"{API}/openapi.json"}
DASHBOARD = Path(__file__).parent / "static" / "dashboard.html"

PRINCIPAL = web.RequestKey("principal", object)


class Deps:
    def __init__(self, nc, engine, rpc: RpcClient, keys: KeyStore, hub: EventHub) -> None:
        self.nc, self.engine, self.rpc, self.keys, self.hub = nc, engine, rpc, keys, hub
        self.registry = CollectorRegistry()
        self.requests = Counter("redrive_http_requests_total", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("redrive_http_request_seconds", "HTTP latency", ["route"], registry=self.registry)


def build_app(deps: Deps) -> web.Application:
    @web.middleware
    async def errors(request: web.Request, handler):
        started = time.perf_counter()
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "bad_request")
            response = error_response(code, exc.reason or "request refused", status=exc.status)
        except ServiceError as exc:
            response = from_service_error(exc)
        except Exception as exc:  # a bug: log it with its stack, answer without it
            log.exception("gateway.unhandled", path=request.path, error=repr(exc))
            response = error_response("internal", "the gateway could not complete the request")
        deps.requests.labels(route, str(response.status)).inc()
        deps.latency.labels(route).observe(time.perf_counter() - started)
        return response

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path in PUBLIC or not request.path.startswith(API):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        principal = await deps.keys.authenticate(key) if key else None
        if principal is None:
            return error_response("unauthorized", "a valid API key is required (Authorization: Bearer <key>)")
        request[PRINCIPAL] = principal
        return await handler(request)

    app = web.Application(middlewares=[errors, auth], client_max_size=256 * 1024 * 1024)
    for route in ROUTES:
        app.router.add_route(route.method, API + route.path, _forwarder(deps, route))
    document = openapi_document(ROUTES)

    async def events(request):
        return await deps.hub.stream(request, effective_tenant(request, request[PRINCIPAL]))

    async def openapi(request):
        return web.json_response(document)

    async def healthz(request):
        return web.json_response({"status": "ok"})

    async def readyz(request):
        return await _ready(deps)

    async def metrics(request):
        return web.Response(body=generate_latest(deps.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get(API + "/events", events)
    app.router.add_get(API + "/openapi.json", openapi)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", _dashboard)
    return app


def effective_tenant(request: web.Request, principal: Principal) -> str:
    asked = request.headers.get("X-Tenant-Id")
    if asked and asked != principal.tenant_id:
        if principal.role != "platform_admin":
            raise ServiceError("forbidden", "only a platform admin may act for another tenant")
        return asked
    return principal.tenant_id


def _forwarder(deps: Deps, route: Route):
    async def handle(request: web.Request) -> web.Response:
        principal: Principal = request[PRINCIPAL]
        if not principal.at_least(route.role):
            raise ServiceError("forbidden", f"this action needs the {route.role} role")
        tenant_id = effective_tenant(request, principal)
        raw = await request.read() if route.body is not None else b""
        payload: dict = {}
        if route.body is not None:
            try:
                parsed = orjson.loads(raw or b"{}")
            except orjson.JSONDecodeError:
                raise ServiceError("bad_request", "the request body is not valid JSON")
            try:
                payload = route.body.model_validate(parsed).model_dump(exclude_none=True)
            except ValidationError as exc:
                raise ServiceError("validation_error", "the request body is not valid", field_errors(exc))
        payload.update(query_payload(route, request.query))
        payload.update(request.match_info)
        payload["tenant_id"] = tenant_id
        if route.all_tenants_for_admin and principal.role == "platform_admin" and "X-Tenant-Id" not in request.headers:
            payload["tenant_id"] = None
        payload["actor"] = principal.user or f"key:{principal.key_id}"
        key = request.headers.get("Idempotency-Key") if route.idempotent else None
        if key:
            return await _idempotent(deps, route, request, tenant_id, key, raw, payload)
        return await _call(deps, route, payload)

    return handle


async def _call(deps: Deps, route: Route, payload: dict) -> web.Response:
    try:
        data = await deps.rpc.call(route.service, route.verb, payload)
    except ServiceError as exc:
        return from_service_error(exc)
    if route.status == 204:
        return web.Response(status=204)
    return web.Response(status=route.status, body=dumps(data), content_type="application/json")


async def _idempotent(deps, route, request, tenant_id, key, raw, payload) -> web.Response:
    digest = idempotency.request_hash(request.method, request.path, raw)
    stored = await idempotency.begin(deps.engine, tenant_id, key, digest)
    if stored is not None:
        return web.Response(status=stored[0], body=stored[1], content_type="application/json")
    if route.verb == "create_run":
        # Same key → same run id: even a gateway crash mid-request cannot make two runs.
        payload["run_id"] = hashlib.sha256(f"{tenant_id}:{key}".encode()).hexdigest()[:32]
    if route.verb == "grant":
        payload["idempotency_key"] = f"grant:{tenant_id}:{key}"
    try:
        response = await _call(deps, route, payload)
    except BaseException:
        await idempotency.finish(deps.engine, tenant_id, key, 500, b"")
        raise
    await idempotency.finish(deps.engine, tenant_id, key, response.status, response.body or b"")
    return response


async def _ready(deps: Deps) -> web.Response:
    checks = {"nats": deps.nc.is_connected, "database": await ping(deps.engine)}
    status = 200 if all(checks.values()) else 503
    return web.json_response({"ready": status == 200, "checks": checks}, status=status)


async def _dashboard(request: web.Request) -> web.Response:
    if DASHBOARD.exists():
        return web.FileResponse(DASHBOARD)
    return web.Response(text="<h1>redrive</h1><p>The dashboard is not installed.</p>", content_type="text/html")
