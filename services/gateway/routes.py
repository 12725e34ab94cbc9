"""The route tables: one row per HTTP route. The router (app.py) and the OpenAPI document
(openapi.py) are both built from them, so the document cannot drift from what runs.

``ROUTES`` are forwarded to the owning service's verb (paths under ``/api/v1``);
``LOCAL_ROUTES`` are answered by the gateway itself (full paths).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

import nats
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.messages import ServiceError, dumps
from shared.rpc import RpcClient
from services.gateway import idempotency, staging
from services.gateway.large_bodies import LargeBodies
from services.gateway.auth import asked_tenant, existing_tenant, principal_of, require_role
from services.gateway.errors import error_response, from_http_exception, from_service_error
from services.gateway.identity import Principal
from services.gateway.schemas import (
    DeliveriesQuery, GrantBody, NotificationsQuery, PageQuery, RunFilesQuery, RestoreBody, RunBody, RunsQuery, SettingsBody, TemplateBody, TimelineQuery, WebhookBody,
    path_params, single_valued, validate,
)

API = "/api/v1"
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # under API
    service: str
    verb: str
    role: str = "member"  # the weakest role allowed
    body: type[BaseModel] | None = None
    status: int = 200
    idempotent: bool = False  # honours Idempotency-Key
    query: type[BaseModel] | None = None
    summary: str = ""
    all_tenants_for_admin: bool = False  # platform admin without X-Tenant-Id: tenant_id None


@dataclass(frozen=True, slots=True)
class LocalRoute:
    method: str
    path: str  # full path
    name: str  # key of the handler in app.py
    summary: str
    public: bool = True  # no key needed
    content_type: str = "application/json"


_R = Route
ROUTES: list[Route] = [
    _R("POST", "/templates", "coordinator", "create_template", "tenant_admin", TemplateBody, 201, True,
       summary="Create a template"),
    _R("GET", "/templates", "coordinator", "list_templates", query=PageQuery,
       summary="List templates, newest first (next_cursor for the next page)"),
    _R("GET", "/templates/{template_id}", "coordinator", "get_template", summary="Get a template"),
    _R("DELETE", "/templates/{template_id}", "coordinator", "archive_template", "tenant_admin", status=204,
       summary="Archive a template (runs on it keep working)"),
    _R("POST", "/workflow-runs", "coordinator", "create_run", "member", RunBody, 201, True, summary="Start a run"),
    _R("GET", "/workflow-runs", "coordinator", "list_runs", query=RunsQuery, summary="List runs"),
    _R("GET", "/workflow-runs/{run_id}", "coordinator", "get_run", query=RunFilesQuery,
       summary="A run with a page of its files (files_page.next_offset for the next)"),
    _R("GET", "/workflow-runs/{run_id}/timeline", "coordinator", "timeline", query=TimelineQuery,
       summary="A run's execution log, oldest first, a page at a time (next_cursor)"),
    _R("POST", "/workflow-runs/{run_id}/retry-failed", "coordinator", "retry_failed", "tenant_admin", idempotent=True,
       summary="Continue: retry the failed files"),
    _R("POST", "/workflow-runs/{run_id}/recover", "coordinator", "recover", "tenant_admin", status=202,
       summary="Recover from the last checkpoints"),
    _R("POST", "/workflows/{run_id}/recover", "coordinator", "recover", "tenant_admin", status=202,
       summary="Recover from the last checkpoints (alias)"),
    _R("POST", "/workflow-runs/{run_id}/files/{file_index}/retry", "coordinator", "retry_file", "tenant_admin",
       idempotent=True, summary="Retry one failed file"),
    _R("POST", "/workflow-runs/{run_id}/files/{file_index}/skip", "coordinator", "skip_file", "tenant_admin",
       summary="Skip a file whose failed step is optional"),
    _R("POST", "/workflow-runs/{run_id}/cancel", "coordinator", "cancel", "tenant_admin", idempotent=True,
       summary="Cancel a run"),
    _R("GET", "/settings/retry", "coordinator", "get_settings", "tenant_admin", summary="Retry and breaker settings"),
    _R("PUT", "/settings/retry", "coordinator", "put_settings", "tenant_admin", SettingsBody,
       summary="Change retry and breaker settings"),
    _R("GET", "/credits", "billing", "balance", summary="Credit balance"),
    _R("GET", "/credits/ledger", "billing", "ledger", query=PageQuery, summary="Credit ledger"),
    _R("POST", "/admin/tenants/{tenant_id}/credits", "billing", "grant", "platform_admin", GrantBody, idempotent=True,
       summary="Grant purchased credits to a tenant"),
    _R("GET", "/notifications", "notifier", "list", query=NotificationsQuery, summary="Notifications"),
    _R("POST", "/notifications/{id}/read", "notifier", "mark_read", summary="Mark a notification read"),
    _R("PUT", "/webhook", "notifier", "put_webhook", "tenant_admin", WebhookBody, summary="Set the webhook"),
    # tenant_admin: a webhook's URL is often a secret itself (Slack's, Zapier's, user:pass@…).
    _R("GET", "/webhook", "notifier", "get_webhook", "tenant_admin", summary="The webhook (without its secret)"),
    _R("DELETE", "/webhook", "notifier", "delete_webhook", "tenant_admin", summary="Stop sending notifications to the webhook"),
    _R("GET", "/webhook/deliveries", "notifier", "list_deliveries", query=DeliveriesQuery,
       summary="The webhook's deliveries, newest first: attempts, last error, pending / delivered / failed"),
    _R("POST", "/webhook/deliveries/redeliver-failed", "notifier", "redeliver_failed", "tenant_admin",
       summary="Send every failed delivery again"),
    _R("POST", "/webhook/deliveries/{delivery_id}/redeliver", "notifier", "redeliver", "tenant_admin",
       summary="Send one delivery again"),
    _R("GET", "/admin/attention", "coordinator", "attention", "tenant_admin", query=PageQuery, all_tenants_for_admin=True,
       summary="Runs needing attention, a page at a time, and how many per tenant "
               "(platform admin: every tenant unless X-Tenant-Id)"),
    _R("GET", "/admin/breakers", "executor", "breakers", all_tenants_for_admin=True,
       summary="Circuit breakers, per tenant and dependency (platform admin: every tenant unless X-Tenant-Id)"),
    _R("POST", "/admin/workflow-runs/{run_id}/restore", "coordinator", "restore", "platform_admin", RestoreBody,
       summary="Rewind files to an earlier checkpoint and resume them"),
]

LOCAL_ROUTES: list[LocalRoute] = [
    LocalRoute("GET", API + "/events", "events", "Server-Sent Events for the caller's tenant", public=False,
               content_type="text/event-stream"),
    LocalRoute("GET", API + "/me", "me", "Who the key is: its tenant, role and user (and the tenant acted on)",
               public=False),
    LocalRoute("GET", API + "/openapi.json", "openapi", "This document"),
    LocalRoute("GET", "/healthz", "healthz", "The process is up"),
    LocalRoute("GET", "/readyz", "readyz", "NATS and PostgreSQL are reachable (503 otherwise)"),
    LocalRoute("GET", "/metrics", "metrics", "Prometheus metrics", content_type="text/plain"),
    LocalRoute("GET", "/", "dashboard", "The operations dashboard", content_type="text/html"),
]


def public_paths() -> frozenset[str]:
    return frozenset(r.path for r in LOCAL_ROUTES if r.public)


# ---- the forwarding handler: authorise, validate, ask the owning service --------------------

def run_id_for(tenant_id: str, idempotency_key: str, nonce: str | None) -> str:
    """The run one use of an Idempotency-Key names: a gateway that dies mid-request and a
    client that retries reach the same run, never a second one. The nonce is drawn when the
    gateway first records the key and kept for the record's 24 h (idempotency.py), so the
    same key after its window names a new run, not the old one. None: a record from before
    nonces, whose run was named by the key alone."""
    return hashlib.sha256(_use_of(f"{tenant_id}:{idempotency_key}", nonce).encode()).hexdigest()[:32]


def grant_key_for(idempotency_key: str, nonce: str | None) -> str:
    """The ledger key of a grant, as run_id_for: once per use of the Idempotency-Key.
    Namespaced so an admin's key can never collide with the coordinator's charge keys."""
    return _use_of(f"grant:{idempotency_key}", nonce)


def request_id_for(verb: str, idempotency_key: str, nonce: str | None) -> str:
    """The name of one use of an Idempotency-Key for a command the coordinator applies once
    (Continue, file retry), as run_id_for."""
    return _use_of(f"{verb}:{idempotency_key}", nonce)


def _use_of(name: str, nonce: str | None) -> str:
    return name if nonce is None else f"{name}:{nonce}"


# A client that announces a body and sends it slowly, or never (a 1-byte body with
# Content-Length: 1000), would otherwise hold a connection and a handler forever.
BODY_READ_TIMEOUT_S = 30.0
async def read_json(request: web.Request) -> Any:
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            raw = await request.read()
    except RequestPayloadError:  # e.g. Content-Encoding: gzip over bytes that are not gzip
        # Nothing more of it can be read (errors.py closes the connection after the answer):
        # said so, aiohttp does not read on after the answer, fail again and log that as a
        # server error with three tracebacks.
        request.content.feed_eof()
        raise ServiceError("bad_request", "the request body could not be decoded (check its Content-Encoding)") from None
    except TimeoutError:
        raise ServiceError("request_timeout", f"the request body did not arrive within {BODY_READ_TIMEOUT_S:g} s") from None
    if not raw.strip():
        # Not {}: a PUT without a body would reset every setting to its default in silence.
        raise ServiceError("validation_error", "a JSON object body is required",
                           {"fields": {"body": "a JSON object is required"}})
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # The parser's reason says where, and quotes nothing of the body: "unexpected end
        # of data: line 1 column 7", or what it could not take ("number is infinity…").
        raise ServiceError("bad_request", f"the request body is not valid JSON: {str(exc)[:200]}") from None


async def call(rpc: RpcClient, route: Route, payload: dict[str, Any], timeout: float | None = None) -> web.Response:
    """The service's answer as an HTTP response (its refusals included, so they can be stored)."""
    try:
        try:
            data = await rpc.call(route.service, route.verb, payload, timeout=timeout)
        except nats.errors.MaxPayloadError:
            if route.verb != "create_run":
                raise
            # Too many files for one message: they go ahead in parts (staging.py).
            data = await rpc.call(route.service, route.verb, await staging.send_files_ahead(rpc, payload),
                                  timeout=timeout)
    except ServiceError as exc:
        if route.method != "GET" and (exc.details or {}).get("outcome") == "unknown":
            # Asked, and no answer: it may have been done (the service died after its commit).
            again = ("send it again with the same Idempotency-Key to get its answer" if route.idempotent
                     else "look before sending it again")
            exc = ServiceError(exc.code, f"{exc.message}; it may have been done: {again}", exc.details)
        return from_service_error(exc)
    except nats.errors.MaxPayloadError:
        return error_response("payload_too_large", "the request is larger than the message bus carries; "
                              "send large files by url")
    if route.status == 204:
        return web.Response(status=204)
    return web.Response(status=route.status, body=dumps(data), content_type="application/json")


def forwarder(route: Route, rpc: RpcClient, engine: AsyncEngine, lease_s: float, large_bodies: LargeBodies):
    """The aiohttp handler of one forwarded route."""

    async def handle(request: web.Request) -> web.Response:
        principal = principal_of(request)
        require_role(principal, route.role)
        tenant_id = await existing_tenant(request, principal, engine)
        if route.body is None:
            return await forward(request, principal, tenant_id, None)
        if not large_bodies.is_large(request, rpc.max_payload):
            return await forward(request, principal, tenant_id, await read_json(request))
        try:
            async with large_bodies.slot():  # taken by a known caller, before a byte is read; kept until answered
                response = await forward(request, principal, tenant_id, await read_json(request))
        except ServiceError as exc:
            response = from_service_error(exc)
        except web.HTTPException as exc:  # 413: past REDRIVE_MAX_REQUEST_BYTES
            if exc.status < 400:
                raise
            response = from_http_exception(exc)
        # aiohttp keeps a connection's last request, and the body it read, until the next
        # request comes or the connection closes: ended with its answer, a large body is let
        # go at once, not held by each idle connection beyond the slots (a new connection
        # costs nothing next to a body over a message).
        response.force_close()
        return response

    async def forward(request: web.Request, principal: Principal, tenant_id: str, body: Any) -> web.Response:
        payload = validate(route.body, body, "request body", strict=True) if route.body is not None else {}
        if route.query is not None:
            payload.update(validate(route.query, single_valued(request.query), "query string"))
        all_tenants = route.all_tenants_for_admin and principal.role == "platform_admin" and asked_tenant(request) is None
        payload["tenant_id"] = None if all_tenants else tenant_id
        payload["actor"] = principal.actor
        payload.update(path_params(dict(request.match_info)))  # a path's tenant_id (grants) wins
        key = request.headers.get("Idempotency-Key") if route.idempotent else None
        if key is None:
            return await call(rpc, route, payload)
        key = idempotency.check_key(key)
        digest = idempotency.request_hash(request.method, request.path, body)

        async def work(begun: idempotency.Begun) -> web.Response:
            return await _keyed_call(rpc, route, payload, tenant_id, key, begun)

        return await idempotency.once(engine, tenant_id, key, digest, lease_s, work)

    handle.__name__ = route.verb
    return handle


async def _keyed_call(rpc: RpcClient, route: Route, payload: dict[str, Any], tenant_id: str, key: str,
                      begun: idempotency.Begun) -> web.Response:
    # create_template passes nothing derived from the key on: the gateway's record alone
    # keeps it once per use (a second template after a lost answer charges nothing).
    if route.verb == "grant":
        payload["idempotency_key"] = grant_key_for(key, begun.nonce)
    if route.verb in ("retry_failed", "retry_file", "cancel"):
        # The coordinator applies this use of the key once (requests_applied.py): retried
        # after a gateway died with it applied, it answers with the run, not a second charge
        # (a cancel: not a 409 for a run it cancelled itself).
        payload["request_id"] = request_id_for(route.verb, key, begun.nonce)
    if route.verb != "create_run":
        return await call(rpc, route, payload)
    payload["run_id"] = run_id_for(tenant_id, key, begun.nonce)
    if begun.taken_over and (found := await _existing_run(rpc, payload)) is not None:
        return found
    response = await call(rpc, route, payload)
    if response.status >= 500 and (found := await _existing_run(rpc, payload)) is not None:
        return found  # the run was made although the answer was lost (timeout, duplicate id)
    return response


async def _existing_run(rpc: RpcClient, payload: dict[str, Any]) -> web.Response | None:
    probe = {"tenant_id": payload["tenant_id"], "actor": payload["actor"], "run_id": payload["run_id"]}
    try:
        run = await rpc.call("coordinator", "get_run", probe, timeout=PROBE_TIMEOUT_S)
    except ServiceError:
        return None
    return web.Response(status=201, body=dumps(run), content_type="application/json")
