"""The OpenAPI 3.1 document, built from the route tables the router is built from, from the
pydantic models that validate each request, and from the catalogue below of what each
route answers: its success body (a schema of openapi_schemas.py) and every error status it
can return, with the error codes behind each (``x-redrive-error-codes``).

The catalogue follows the code: a route's errors are the gateway's own (authentication,
X-Tenant-Id, body, query string, Idempotency-Key: from the route's row) plus those its
service raises (``ROUTE_ERRORS``, by verb), turned into statuses by errors.STATUS_BY_CODE.
tests/unit/test_openapi_catalogue.py keeps both complete; tests/integration/
test_openapi_matches_responses.py checks real answers against the document.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from services.gateway.errors import status_for
from services.gateway.openapi_schemas import REF, SCHEMAS, ref
from services.gateway.routes import API, LOCAL_ROUTES, ROUTES, LocalRoute, Route
from services.gateway.schemas import INT_PATH_PARAMS

Reason = tuple[str, str]  # an error code (its status: errors.status_for) and when it is answered

# ---- the catalogue -------------------------------------------------------------------------

AUTH: list[Reason] = [
    ("unauthorized", "no API key, or an unknown or revoked one"),
    ("forbidden", "the key's role is below the route's, or X-Tenant-Id names another tenant and the key is "
                  "not a platform admin's"),
    ("not_found", "X-Tenant-Id (a platform admin's) names no tenant"),
    ("validation_error", "X-Tenant-Id is not a tenant id (details.fields)"),
    ("dependency_unavailable", "the gateway's database is unavailable"),
]
FORWARDED: list[Reason] = AUTH + [
    ("validation_error", "a path parameter is malformed"),
    ("service_unavailable", "the owning service is not running or did not answer in time"),
    ("dependency_unavailable", "the service's database or the message bus is unavailable"),
]
BODY: list[Reason] = [
    ("bad_request", "the body is not JSON, or its Content-Encoding cannot be decoded"),
    ("request_timeout", "the body did not arrive within 30 s"),
    ("payload_too_large", "the body is larger than REDRIVE_MAX_REQUEST_BYTES or than the message bus carries"),
    ("validation_error", "the body is missing or not valid (details.fields)"),
    ("service_unavailable", "the gateway is reading as many large bodies as it may at once "
                            "(REDRIVE_MAX_CONCURRENT_LARGE_BODIES)"),
]
QUERY: list[Reason] = [
    ("validation_error", "the query string is not valid, names a parameter twice, or its cursor is not one this "
                         "list returned (details.fields)"),
]
IDEMPOTENT: list[Reason] = [
    ("idempotency_in_progress", "a request with this Idempotency-Key is still in progress"),
    ("idempotency_key_reused", "this Idempotency-Key was used with a different request within 24 h"),
    ("validation_error", "Idempotency-Key is not 1 to 255 printable characters"),
]
DEFAULT = "`internal` (500): a bug, logged without reaching the answer; `unknown_verb` (501): a service older " \
          "than this gateway (mid-upgrade)"

_RUN_404 = ("not_found", "no such run in the tenant (another tenant's run included)")
_RUN_BUSY = ("run_running", "another request is changing this run right now")
_NO_HANDLER = ("validation_error", "a step names a handler that no executor offers")
_CREDITS = ("insufficient_credits", "the credits are short (details: needed, available)")
_WITHDRAWN = ("service_unavailable", "an earlier attempt's credit reservation was withdrawn meanwhile; nothing "
                                     "was made or charged: send it again (the same Idempotency-Key will do)")
_NO_ACCOUNT = ("not_found", "the tenant has no billing account")

# The success body of each verb (a components.schemas name; None: no body).
SUCCESS: dict[str, str | None] = {
    "coordinator.create_template": "Template", "coordinator.list_templates": "TemplatePage",
    "coordinator.get_template": "Template", "coordinator.archive_template": None,
    "coordinator.create_run": "Run", "coordinator.list_runs": "RunPage", "coordinator.get_run": "Run",
    "coordinator.timeline": "TimelinePage", "coordinator.retry_failed": "Run", "coordinator.recover": "Run",
    "coordinator.retry_file": "Run", "coordinator.skip_file": "Run", "coordinator.cancel": "Run",
    "coordinator.get_settings": "RetrySettings", "coordinator.put_settings": "RetrySettings",
    "coordinator.attention": "AttentionPage", "coordinator.restore": "Run",
    "billing.balance": "Balance", "billing.ledger": "LedgerPage", "billing.grant": "Balance",
    "notifier.list": "NotificationPage", "notifier.mark_read": "Notification", "notifier.put_webhook": "Webhook",
    "notifier.get_webhook": "Webhook", "notifier.delete_webhook": "WebhookDeleted",
    "notifier.list_deliveries": "DeliveryPage", "notifier.redeliver_failed": "Redelivered",
    "notifier.redeliver": "Delivery", "executor.breakers": "BreakerList",
}
NULLABLE_SUCCESS = {"notifier.get_webhook"}  # null: no webhook is set

# What the owning service refuses, beyond FORWARDED/BODY/QUERY/IDEMPOTENT.
ROUTE_ERRORS: dict[str, list[Reason]] = {
    "coordinator.create_template": [_NO_HANDLER, ("validation_error", "a step's params are refused by its handler")],
    "coordinator.get_template": [("not_found", "no such template in the tenant")],
    "coordinator.archive_template": [("not_found", "no such template in the tenant, or it is archived already")],
    "coordinator.create_run": [
        ("bad_request", "files sent ahead in parts are missing some"),
        _CREDITS,
        ("not_found", "the template is unknown or archived"),
        ("conflict", "the run id this Idempotency-Key names is taken"), _WITHDRAWN,
        ("payload_too_large", "a job of the run would not fit in a message, or its files take more than a "
                              "tenant may stage"),
        ("validation_error", "the file list is empty or over REDRIVE_MAX_FILES_PER_RUN"), _NO_HANDLER,
        ("too_many_requests", "the tenant's other requests in progress hold all the staging space it may use "
                              "(Retry-After)"),
    ],
    "coordinator.get_run": [_RUN_404],
    "coordinator.timeline": [_RUN_404],
    "coordinator.retry_failed": [
        ("run_completed", "the run completed without errors"),
        ("nothing_to_retry", "no FAILED or PENDING file (ERROR files are never retried)"),
        ("max_retry_count_exceeded", "a file to retry reached max_retry_count (details.file_indexes)"),
        _CREDITS, _RUN_404, ("run_running", "the run is still running"), _RUN_BUSY,
        ("conflict", "the run was cancelled"), _WITHDRAWN, _NO_HANDLER,
        ("payload_too_large", "a batch run's job of the reopened files would not fit in a message"),
    ],
    "coordinator.recover": [_RUN_404, ("run_not_recoverable", "the run is COMPLETED or CANCELLED, has no pending "
                                                              "file, or is RUNNING and making progress")],
    "coordinator.retry_file": [
        ("file_not_failed", "the file is not FAILED"),
        ("max_retry_count_exceeded", "the file reached max_retry_count"), _CREDITS,
        ("not_found", "no such run in the tenant, or no such file in it"),
        ("file_pending", "the file is still in progress"), _RUN_BUSY, ("conflict", "the run was cancelled"),
        _WITHDRAWN, _NO_HANDLER,
    ],
    "coordinator.skip_file": [
        ("step_not_optional", "the file is not FAILED or ERROR, or its failed step is not optional"),
        ("not_found", "no such run in the tenant, or no such file in it"), _RUN_BUSY,
        ("conflict", "the run was cancelled"),
    ],
    "coordinator.cancel": [_RUN_404, ("conflict", "the run is COMPLETED or CANCELLED already, or has no PENDING file")],
    "coordinator.put_settings": [("validation_error", "backoff_max_ms would be below backoff_base_ms")],
    "coordinator.restore": [
        ("bad_request", "checkpoint_step is past the template's steps, or a file has no checkpoint there"),
        ("not_found", "no such run in the tenant, or no such file in it"), ("conflict", "the run was cancelled"),
        ("file_pending", "the file named is PENDING in a run making progress: its job is out"),
        ("run_running", "the run is making progress and has PENDING files, and no file is named"),
    ],
    "billing.balance": [_NO_ACCOUNT],
    "billing.grant": [_NO_ACCOUNT],
    "notifier.mark_read": [("not_found", "no such notification in the tenant")],
    "notifier.put_webhook": [("validation_error", "the url is refused (a private or unresolvable host…)")],
    "notifier.redeliver_failed": [("conflict", "no webhook is set")],
    "notifier.redeliver": [("not_found", "no such delivery in the tenant"),
                           ("conflict", "the delivery is still pending, or no webhook is set")],
}

# The gateway's own routes: their success body, their errors, and what else they answer.
LOCAL_SUCCESS: dict[str, dict[str, Any]] = {
    "events": {"type": "string", "description": "text/event-stream: run, file, retry, recovery and breaker events"},
    "me": ref("Me"), "openapi": {"type": "object", "description": "this OpenAPI 3.1 document"},
    "healthz": ref("Health"), "readyz": ref("Ready"),
    "metrics": {"type": "string", "description": "Prometheus text format"},
    "dashboard": {"type": "string", "description": "the dashboard's HTML"},
}
LOCAL_ERRORS: dict[str, list[Reason]] = {
    "events": AUTH + [("too_many_requests", "the key or the tenant has all the live streams it may "
                                            "(REDRIVE_SSE_MAX_PER_KEY, REDRIVE_SSE_MAX_PER_TENANT); see Retry-After")],
    "me": AUTH,
    "metrics": [("unauthorized", "only when the operator set REDRIVE_METRICS_TOKEN: send it as "
                                 "Authorization: Bearer <token>")],
}
LOCAL_EXTRA: dict[str, dict[str, Any]] = {
    "readyz": {"503": {"description": "a dependency is unreachable (see checks; Retry-After)",
                       "content": {"application/json": {"schema": ref("Ready")}}}},
    "dashboard": {"304": {"description": "not modified (If-None-Match matched its ETag)"}},
}

# ---- the document --------------------------------------------------------------------------

_TENANT_HEADER = {"name": "X-Tenant-Id", "in": "header", "required": False, "schema": {"type": "string"},
                  "description": "platform admins: the tenant to act on"}
_IDEMPOTENCY_HEADER = {"name": "Idempotency-Key", "in": "header", "required": False,
                       "schema": {"type": "string", "maxLength": 255},
                       "description": "same key and body within 24 h: the first response again"}
_HEADERS = {
    "401": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    "429": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
    "503": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
}


def openapi_document(routes: list[Route] = ROUTES, local_routes: list[LocalRoute] = LOCAL_ROUTES) -> dict[str, Any]:
    schemas: dict[str, Any] = dict(SCHEMAS)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(API + route.path, {})[route.method.lower()] = _forwarded(route, schemas)
    for local in local_routes:
        paths.setdefault(local.path, {})[local.method.lower()] = _local(local)
    return {
        "openapi": "3.1.0",
        "info": {"title": "redrive", "version": "1", "description": "Batch workflows that make failure boring."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "API key"}}},
    }


def route_reasons(route: Route) -> list[Reason]:
    """Every refusal ``route`` can answer with, the gateway's and its service's."""
    reasons = list(FORWARDED)
    if route.body is not None:
        reasons += BODY
    if route.query is not None:
        reasons += QUERY
    if route.idempotent:
        reasons += IDEMPOTENT
    return reasons + ROUTE_ERRORS.get(f"{route.service}.{route.verb}", [])


def error_responses(reasons: list[Reason]) -> dict[str, Any]:
    """One response per status, naming each code and when it is answered; then ``default``."""
    by_status: dict[int, dict[str, list[str]]] = {}
    for code, when in reasons:
        whens = by_status.setdefault(status_for(code), {}).setdefault(code, [])
        if when not in whens:
            whens.append(when)
    out: dict[str, Any] = {}
    for status in sorted(by_status):
        codes = by_status[status]
        response = {"description": "; ".join(f"`{code}`: {', or '.join(whens)}" for code, whens in codes.items()),
                    "x-redrive-error-codes": list(codes), **_json(ref("InsufficientCreditsError" if status == 402
                                                                      else "Error"))}
        if str(status) in _HEADERS:
            response["headers"] = _HEADERS[str(status)]
        out[str(status)] = response
    out["default"] = {"description": DEFAULT, **_json(ref("Error"))}
    return out


def _json(schema: dict[str, Any], content_type: str = "application/json") -> dict[str, Any]:
    return {"content": {content_type: {"schema": schema}}}


def _operation_id(method: str, path: str) -> str:
    return method.lower() + "_" + "_".join(p for p in re.split(r"[^A-Za-z0-9]+", path) if p)


def _success(route: Route) -> dict[str, Any]:
    verb = f"{route.service}.{route.verb}"
    name = SUCCESS.get(verb)
    if route.status == 204 or name is None:
        return {"description": "no content"}
    schema = ref(name)
    response = {"description": route.summary or "success",
                **_json({"anyOf": [schema, {"type": "null"}]} if verb in NULLABLE_SUCCESS else schema)}
    if route.idempotent:
        response["headers"] = {"Idempotent-Replayed": {
            "schema": {"type": "string", "enum": ["true"]},
            "description": "present when this is the stored first answer to the same Idempotency-Key"}}
    return response


def _parameters(route: Route) -> list[dict[str, Any]]:
    params = [{"name": p, "in": "path", "required": True,
               "schema": {"type": "integer", "minimum": 0} if p in INT_PATH_PARAMS else {"type": "string"}}
              for p in re.findall(r"{(\w+)}", route.path)]
    if route.query is not None:
        query = route.query.model_json_schema(by_alias=True)
        params += [{"name": name, "in": "query", "required": False, "schema": schema}
                   for name, schema in query.get("properties", {}).items()]
    params.append(_TENANT_HEADER)
    if route.idempotent:
        params.append(_IDEMPOTENCY_HEADER)
    return params


def _forwarded(route: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": _operation_id(route.method, route.path),
        "summary": route.summary or route.verb,
        "description": f"Needs the {route.role} role or above. Answered by `{route.service}.{route.verb}`.",
        "security": [{"bearer": []}],
        "parameters": _parameters(route),
        "responses": {str(route.status): _success(route), **error_responses(route_reasons(route))},
        "x-redrive-verb": f"{route.service}.{route.verb}",
    }
    if route.body is not None:
        op["requestBody"] = {"required": True, **_json(_ref(route.body, schemas))}
    return op


def _ref(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template=REF.replace("{name}", "{model}"))
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas[model.__name__] = schema
    return ref(model.__name__)


def _local(route: LocalRoute) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": _operation_id(route.method, route.path) if route.path != "/" else "get_dashboard",
        "summary": route.summary,
        "responses": {"200": {"description": route.summary, **_json(LOCAL_SUCCESS.get(route.name, {}), route.content_type)},
                      **LOCAL_EXTRA.get(route.name, {})},
    }
    if route.name in LOCAL_ERRORS:
        errors = error_responses(LOCAL_ERRORS[route.name])
        if route.public:  # /metrics: only its token's 401
            errors.pop("default")
        op["responses"] |= errors
    if not route.public:
        op["parameters"] = [{**_TENANT_HEADER, "description": "platform admins: the tenant to act on (events: whose "
                                                              "events to stream; without it: their own)"}]
    op["security"] = [] if route.public else [{"bearer": []}]
    return op
