"""OpenAPI 3.1 document built from the route table and the pydantic body models."""

from __future__ import annotations

import re

from services.gateway.routes import Route

ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}}}}}


def openapi_document(routes: list[Route]) -> dict:
    paths: dict = {}
    for route in routes:
        op: dict = {"summary": route.summary or route.verb, "operationId": f"{route.verb}_{route.method.lower()}",
                    "security": [{"bearer": []}],
                    "parameters": [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                   for p in re.findall(r"{(\w+)}", route.path)]
                    + [{"name": q, "in": "query", "schema": {"type": "string"}} for q in route.query],
                    "responses": {str(route.status): {"description": "success"},
                                  "default": {"description": "error", "content": {"application/json": {"schema": ERROR}}}}}
        if route.idempotent:
            op["parameters"].append({"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}})
        if route.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": route.body.model_json_schema()}}}
        paths.setdefault("/api/v1" + route.path, {})[route.method.lower()] = op
    paths["/api/v1/events"] = {"get": {"summary": "Server-Sent Events for the caller's tenant", "security": [{"bearer": []}],
                                       "responses": {"200": {"description": "text/event-stream"}}}}
    for path, summary in (("/healthz", "process up"), ("/readyz", "NATS and database reachable"), ("/metrics", "Prometheus")):
        paths[path] = {"get": {"summary": summary, "responses": {"200": {"description": "ok"}}}}
    return {"openapi": "3.1.0", "info": {"title": "redrive", "version": "0.1.0"}, "paths": paths,
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
