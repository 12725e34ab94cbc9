"""The OpenAPI 3.1 document, built from the route tables the router is built from and from
the pydantic models that validate each request: what it says is what runs."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from services.gateway.routes import API, LOCAL_ROUTES, ROUTES, LocalRoute, Route
from services.gateway.schemas import INT_PATH_PARAMS

REF = "#/components/schemas/{model}"
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message", "details"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}}}},
}
_ERROR_REF = {"content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}}
_TENANT_HEADER = {"name": "X-Tenant-Id", "in": "header", "required": False, "schema": {"type": "string"},
                  "description": "platform admins: the tenant to act on"}
_COMMON_ERRORS = {
    "401": "missing or unknown API key",
    "403": "the key's role may not do this, or X-Tenant-Id names another tenant",
    "503": "a service or dependency is unavailable (Retry-After)",
}


def openapi_document(routes: list[Route] = ROUTES, local_routes: list[LocalRoute] = LOCAL_ROUTES) -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
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


def _operation_id(method: str, path: str) -> str:
    return method.lower() + "_" + "_".join(p for p in re.split(r"[^A-Za-z0-9]+", path) if p)


def _forwarded(route: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    params = [{"name": p, "in": "path", "required": True,
               "schema": {"type": "integer", "minimum": 0} if p in INT_PATH_PARAMS else {"type": "string"}}
              for p in re.findall(r"{(\w+)}", route.path)]
    if route.query is not None:
        query = route.query.model_json_schema(by_alias=True)
        params += [{"name": name, "in": "query", "required": False, "schema": schema}
                   for name, schema in query.get("properties", {}).items()]
    params.append(_TENANT_HEADER)
    if route.idempotent:
        params.append({"name": "Idempotency-Key", "in": "header", "required": False,
                       "schema": {"type": "string", "maxLength": 255},
                       "description": "same key and body within 24 h: the first response again"})
    success = {"description": "no content"} if route.status == 204 else {
        "description": "success", "content": {"application/json": {"schema": {}}}}
    responses: dict[str, Any] = {str(route.status): success}
    responses |= {code: {"description": text, **_ERROR_REF} for code, text in _COMMON_ERRORS.items()}
    if route.body is not None or route.query is not None:
        responses["400"] = {"description": "the body is not JSON, or a rule forbids the action", **_ERROR_REF}
        responses["422"] = {"description": "validation failed (details.fields)", **_ERROR_REF}
    responses["default"] = {"description": "error", **_ERROR_REF}
    op: dict[str, Any] = {
        "operationId": _operation_id(route.method, route.path),
        "summary": route.summary or route.verb,
        "description": f"Needs the {route.role} role or above. Answered by `{route.service}.{route.verb}`.",
        "security": [{"bearer": []}],
        "parameters": params,
        "responses": responses,
        "x-redrive-verb": f"{route.service}.{route.verb}",
    }
    if route.body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(route.body, schemas)}}}
    return op


def _ref(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, str]:
    schema = model.model_json_schema(ref_template=REF)
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def _local(route: LocalRoute) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": _operation_id(route.method, route.path) if route.path != "/" else "get_dashboard",
        "summary": route.summary,
        "responses": {"200": {"description": route.summary, "content": {route.content_type: {"schema": {}}}}},
    }
    if route.name == "readyz":
        op["responses"]["503"] = {"description": "a dependency is unreachable (see checks)"}
    if route.name == "events":
        op["parameters"] = [{**_TENANT_HEADER, "description": "platform admins: the tenant whose events to "
                                                              "stream (without it: their own)"}]
        op["responses"] |= {code: {"description": text, **_ERROR_REF} for code, text in _COMMON_ERRORS.items()}
        op["responses"]["404"] = {"description": "X-Tenant-Id names no tenant", **_ERROR_REF}
        op["responses"]["429"] = {"description": "the key or the tenant has all the live streams it may "
                                                 "(REDRIVE_SSE_MAX_PER_KEY, REDRIVE_SSE_MAX_PER_TENANT); "
                                                 "see Retry-After", **_ERROR_REF}
        op["responses"]["default"] = {"description": "error", **_ERROR_REF}
    if route.name == "metrics":
        op["responses"]["401"] = {"description": "only when the operator set REDRIVE_METRICS_TOKEN: "
                                                 "send it as Authorization: Bearer <token>", **_ERROR_REF}
    op["security"] = [] if route.public else [{"bearer": []}]
    return op
