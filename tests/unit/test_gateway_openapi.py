"""The OpenAPI document is built from the tables the router is built from: it lists every
route that runs, no other, with the request models that validate them."""

from services.gateway.app import Deps, build_app
from services.gateway.openapi import openapi_document
from services.gateway.routes import API, ROUTES


def _app():
    return build_app(Deps(nc=None, engine=None, rpc=None, hub=None))


def test_every_route_of_the_app_is_documented_and_every_documented_route_runs():
    doc = openapi_document()
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    running = {(r.method, r.resource.canonical) for r in _app().router.routes() if r.method != "HEAD"}
    assert documented == running


def test_bodies_queries_and_idempotency_keys_are_described():
    doc = openapi_document()
    create = doc["paths"][API + "/workflow-runs"]["post"]
    ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["properties"]["max_retry_count"]["minimum"] == 1
    assert schema["properties"]["max_retry_count"]["maximum"] == 10
    assert "Idempotency-Key" in {p["name"] for p in create["parameters"]}
    listing = {p["name"] for p in doc["paths"][API + "/workflow-runs"]["get"]["parameters"]}
    assert {"status", "needs_attention", "limit", "cursor"} <= listing
    assert "unread" in {p["name"] for p in doc["paths"][API + "/notifications"]["get"]["parameters"]}
    retry = doc["paths"][API + "/workflow-runs/{run_id}/files/{file_index}/retry"]["post"]
    assert {p["name"]: p["schema"]["type"] for p in retry["parameters"] if p["in"] == "path"} == {
        "run_id": "string", "file_index": "integer"}


def test_every_reference_resolves_and_operation_ids_are_unique():
    doc = openapi_document()
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].rsplit("/", 1)[1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc["paths"])
    walk(doc["components"])
    assert refs <= set(doc["components"]["schemas"])
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


def test_the_public_endpoints_need_no_key_in_the_document():
    doc = openapi_document()
    for path in ("/healthz", "/readyz", "/metrics", "/", API + "/openapi.json"):
        assert doc["paths"][path]["get"]["security"] == []
    assert doc["paths"][API + "/events"]["get"]["security"] == [{"bearer": []}]
    assert all(op["security"] == [{"bearer": []}] for r in ROUTES
               for op in [doc["paths"][API + r.path][r.method.lower()]])


def test_the_event_stream_is_documented_as_it_answers():
    """It honours X-Tenant-Id and answers 401, 403 and 404 like the forwarded routes."""
    events = openapi_document()["paths"][API + "/events"]["get"]
    assert [p["name"] for p in events["parameters"]] == ["X-Tenant-Id"]
    assert {"200", "401", "403", "404", "429", "503", "default"} <= set(events["responses"])
