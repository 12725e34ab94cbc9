"""Bad input through the gateway, over the real services: every refusal is a 4xx in the
contract's error shape with a reason, nothing is created or charged, and nothing is a 500,
a stack trace or a hang.

Found by probing every route of api.md; each row here was once a 500, a silent coercion or
a resource made from nonsense (see the comments on the rows)."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.integration.test_http_api import api, auth  # noqa: F401  (the module's stack)

API = "/api/v1"
TEMPLATE = {"name": "t", "steps": [{"name": "a", "handler": "noop"}]}
SETTINGS = {"auto_retries": 2, "backoff_base_ms": 100, "backoff_max_ms": 1000, "jitter": False,
            "breaker_failure_threshold": 5, "breaker_reset_s": 30}


async def refused(response, status: int, code: str | None = None, field: str | None = None) -> dict:
    text = await response.text()
    assert response.status == status, f"{response.method} {response.url}: {response.status} {text[:300]}"
    assert "Traceback" not in text and 'File "' not in text
    error = json.loads(text)["error"]
    assert set(error) == {"code", "message", "details"} and error["message"]
    assert code is None or error["code"] == code, error
    assert field is None or field in error["details"]["fields"], error
    return error


@pytest.fixture(scope="module")
async def world(api):  # noqa: F811
    """A template, a finished run and known settings, and a snapshot of what must not change."""
    http, keys = api["http"], api["keys"]
    admin = auth(keys["tenant_admin"])
    assert (await http.put(f"{API}/settings/retry", json=SETTINGS, headers=admin)).status == 200
    template = (await (await http.post(f"{API}/templates", json=TEMPLATE, headers=admin)).json())["id"]
    run = await (await http.post(f"{API}/workflow-runs", json={"template_id": template, "files": [{"name": "a"}]},
                                 headers=admin)).json()
    for _ in range(200):
        if (await (await http.get(f"{API}/workflow-runs/{run['id']}", headers=admin)).json())["status"] != "RUNNING":
            break
        await asyncio.sleep(0.05)
    return {**api, "template": template, "run": run["id"], "before": await snapshot(api)}


async def snapshot(api) -> dict:
    """What bad input must never change: templates, runs, balances, ledgers, settings, webhook."""
    http, keys = api["http"], api["keys"]
    out = {}
    for name, key, path in [("templates", "tenant_admin", "/templates"), ("runs", "tenant_admin", "/workflow-runs?limit=500"),
                            ("credits", "tenant_admin", "/credits"), ("ledger", "tenant_admin", "/credits/ledger?limit=500"),
                            ("settings", "tenant_admin", "/settings/retry"), ("webhook", "tenant_admin", "/webhook"),
                            ("other_credits", "other", "/credits"), ("other_templates", "other", "/templates")]:
        r = await http.get(API + path, headers=auth(keys[key]))
        assert r.status == 200, (path, r.status, await r.text())  # a stored bad value once broke a list for good
        out[name] = await r.json()
    out["runs"] = sorted(run["id"] for run in out["runs"]["items"])  # their statuses move on by themselves
    return out


async def test_a_body_that_is_not_a_json_object_is_refused_on_every_body_route(world):
    http, keys = world["http"], world["keys"]
    routes = [("POST", "/templates"), ("POST", "/workflow-runs"), ("PUT", "/settings/retry"), ("PUT", "/webhook"),
              ("POST", f"/admin/tenants/{world['other']}/credits"), ("POST", f"/admin/workflow-runs/{world['run']}/restore")]
    json_type = {"Content-Type": "application/json"}
    bodies = [
        (b"{not json", json_type, 400, "bad_request", None),
        (b"\xff\xfe", json_type, 400, "bad_request", None),
        (b"NaN", json_type, 400, "bad_request", None),
        (b"[" * 5000 + b"]" * 5000, json_type, 400, "bad_request", None),
        (b'{"name": "\\ud800"}', json_type, 400, "bad_request", None),  # a lone surrogate
        (b"a=b", {"Content-Type": "application/x-www-form-urlencoded"}, 400, "bad_request", None),
        (b"{}", {"Content-Encoding": "gzip"}, 400, "bad_request", None),  # not gzip: was a 500
        (b"[]", json_type, 422, "validation_error", "body"),
        (b'"x"', json_type, 422, "validation_error", "body"),
        (b"null", json_type, 422, "validation_error", "body"),
        (b"7", json_type, 422, "validation_error", "body"),
        (b"true", json_type, 422, "validation_error", "body"),
        (b"", json_type, 422, "validation_error", "body"),  # PUT /settings/retry reset everything to defaults
        (b"  \n", json_type, 422, "validation_error", "body"),
    ]
    for method, path in routes:
        for raw, headers, status, code, field in bodies:
            r = await http.request(method, API + path, data=raw, headers=auth(keys["platform_admin"], **headers))
            await refused(r, status, code, field)
    assert await snapshot(world) == world["before"]


async def test_a_body_that_is_not_json_is_told_where_and_why_without_quoting_it(world):
    headers = auth(world["keys"]["tenant_admin"], **{"Content-Type": "application/json"})
    for raw, why in ((b'{"name": 1e400}', "number is infinity when parsed as double: line 1 column"),
                     (b'{"name": "secret-ish', "unexpected end of data: line 1 column")):
        r = await world["http"].post(API + "/templates", data=raw, headers=headers)
        error = await refused(r, 400, "bad_request")
        assert error["message"].startswith(f"the request body is not valid JSON: {why}"), error
        assert "secret" not in error["message"]


TPL = "{tpl}"  # replaced by the world's template id


@pytest.mark.parametrize("method, path, key, body, field", [
    # Lax coercion accepted these: a string or a bool where JSON says number, and so on.
    ("POST", "/templates", "tenant_admin", {**TEMPLATE, "credits_per_file": True}, "credits_per_file"),
    ("POST", "/templates", "tenant_admin", {**TEMPLATE, "steps": [{"name": "a", "handler": "noop", "auto_retries": 11}]},
     "steps.0.auto_retries"),
    ("POST", "/templates", "tenant_admin", {**TEMPLATE, "credits_per_file": "1"}, "credits_per_file"),
    ("POST", "/templates", "tenant_admin", {**TEMPLATE, "credits_per_file": 1.5}, "credits_per_file"),
    ("POST", "/templates", "tenant_admin", {**TEMPLATE, "credits_per_file": -1}, "credits_per_file"),
    ("POST", "/templates", "tenant_admin", {**TEMPLATE, "steps": {"name": "a"}}, "steps"),
    ("POST", "/templates", "tenant_admin", {**TEMPLATE, "steps": [{"name": "a", "handler": "noop", "optional": "no"}]},
     "steps.0.optional"),
    ("POST", "/templates", "tenant_admin", {**TEMPLATE, "name": "x" * 100_000}, "name"),
    ("POST", "/templates", "tenant_admin", {**TEMPLATE, "unknown": 1}, "unknown"),
    # NUL reached PostgreSQL (text and jsonb refuse it): 500s.
    ("POST", "/templates", "tenant_admin", {**TEMPLATE, "name": "t\x00"}, "name"),
    ("POST", "/templates", "tenant_admin", {"name": "t", "steps": [{"name": "a", "handler": "no\x00op"}]},
     "steps.0.handler"),
    ("POST", "/templates", "tenant_admin", {"name": "t", "steps": [{"name": "a", "handler": "noop",
                                                                     "params": {"k": ["v\x00"]}}]}, "steps.0.params.k.0"),
    ("POST", "/templates", "tenant_admin", {"name": "t", "steps": [{"name": "a", "handler": "noop",
                                                                     "params": {"k\x00": 1}}]}, "steps.0.params.k\\0"),
    # A typo in a param would be ignored: a template that never does what it says.
    ("POST", "/templates", "tenant_admin", {"name": "t", "steps": [{"name": "a", "handler": "flaky",
                                                                     "params": {"fail_attempt": 2}}]}, "steps.0.params"),
    ("POST", "/templates", "tenant_admin", {"name": "t", "steps": [{"name": "a", "handler": "noop"},
                                                                    {"name": "a", "handler": "noop"}]}, "steps"),
    # Stored as jsonb, a number this large read back as an int nobody could encode: the
    # create was a 500 after the commit, and every later GET /templates of the tenant too.
    ("POST", "/templates", "tenant_admin", {"name": "t", "steps": [{"name": "a", "handler": "noop",
                                                                     "params": {"x": 1e30}}]}, "steps.0.params.x"),
    ("POST", "/templates", "tenant_admin", {"name": "t", "steps": [{"name": "a", "handler": "noop",
                                                                     "params": {"x": -1.5e300}}]}, "steps.0.params.x"),
    ("POST", "/workflow-runs", "member", {"template_id": TPL, "files": [{"name": "a"}], "max_retry_count": "3"},
     "max_retry_count"),
    ("POST", "/workflow-runs", "member", {"template_id": TPL, "files": [{"name": "a"}], "max_retry_count": 2.5},
     "max_retry_count"),
    ("POST", "/workflow-runs", "member", {"template_id": TPL, "files": [{"name": "a"}], "max_retry_count": None},
     "max_retry_count"),
    ("POST", "/workflow-runs", "member", {"template_id": 5, "files": [{"name": "a"}]}, "template_id"),
    # Echoed back in full by the 404.
    ("POST", "/workflow-runs", "member", {"template_id": "t" * 100_000, "files": [{"name": "a"}]}, "template_id"),
    ("POST", "/workflow-runs", "member", {"template_id": TPL, "files": ["a"]}, "files.0"),
    ("POST", "/workflow-runs", "member", {"template_id": TPL, "files": [{"name": "a", "size": -1}]}, "files.0.size"),
    ("POST", "/workflow-runs", "member", {"template_id": TPL, "files": [{"name": "a", "size": 2**70}]}, "files.0.size"),
    ("POST", "/workflow-runs", "member", {"template_id": TPL, "files": [{"name": "a", "content_b64": "!!"}]},
     "files.0.content_b64"),
    ("POST", "/workflow-runs", "member", {"template_id": "t\x00", "files": [{"name": "a"}]}, "template_id"),
    # Params a handler can never use: made (201), then charged for and every file ERROR.
    ("POST", "/templates", "tenant_admin", {"name": "t", "steps": [{"name": "a", "handler": "flaky",
                                                                     "params": {"poison": "(a+)+$["}}]}, "steps.0.params"),
    ("POST", "/templates", "tenant_admin", {"name": "t", "steps": [{"name": "a", "handler": "noop"}, {
        "name": "b", "handler": "flaky", "params": {"sleep_ms": -5}}]}, "steps.1.params"),
    ("POST", "/templates", "tenant_admin", {"name": "t", "steps": [{"name": "a", "handler": "http_call",
                                                                     "params": {"url": "ftp://x"}}]}, "steps.0.params"),
    # Calls the platform's own network (SSRF): the cloud metadata service.
    ("POST", "/templates", "tenant_admin", {"name": "t", "steps": [{"name": "a", "handler": "http_call", "params": {
        "url": "http://169.254.169.254/latest/meta-data/"}}]}, "steps.0.params"),
    ("POST", "/workflow-runs", "member", {"template_id": TPL, "files": [{"name": "a\x00"}]}, "files.0.name"),
    # Names are shown in operators' terminals, where an escape sequence would be obeyed.
    ("POST", "/workflow-runs", "member", {"template_id": TPL, "files": [{"name": "\x1b]0;pwned\x07"}]}, "files.0.name"),
    ("POST", "/workflow-runs", "member", {"template_id": TPL, "files": [{"name": "a", "url": "https://e.com/\u2028"}]},
     "files.0.url"),
    ("POST", "/templates", "tenant_admin", {"name": "t\x1b[31m", "steps": [{"name": "a", "handler": "noop"}]}, "name"),
    ("POST", "/templates", "tenant_admin", {"name": "t", "steps": [{"name": "a\x85", "handler": "noop"}]},
     "steps.0.name"),
    # A bidirectional override shows "invoice\u202egpj.exe" as "invoiceexe.jpg".
    ("POST", "/workflow-runs", "member", {"template_id": TPL, "files": [{"name": "invoice\u202egpj.exe"}]},
     "files.0.name"),
    ("POST", "/workflow-runs", "member", {"template_id": TPL, "files": [{"name": "a", "url": "http://x/\x00"}]},
     "files.0.url"),
    ("PUT", "/settings/retry", "tenant_admin", {**SETTINGS, "jitter": "yes"}, "jitter"),
    ("PUT", "/settings/retry", "tenant_admin", {**SETTINGS, "auto_retries": True}, "auto_retries"),
    ("PUT", "/settings/retry", "tenant_admin", {**SETTINGS, "auto_retries": "2"}, "auto_retries"),
    ("PUT", "/settings/retry", "tenant_admin", {**SETTINGS, "backoff_base_ms": 10**30}, "backoff_base_ms"),
    ("PUT", "/settings/retry", "tenant_admin", {**SETTINGS, "auto_retries": -1}, "auto_retries"),
    ("PUT", "/settings/retry", "tenant_admin", {**SETTINGS, "backoff_max_ms": 10}, "backoff_max_ms"),
    # Every bound api.md gives, each side.
    *[("PUT", "/settings/retry", "tenant_admin", {**SETTINGS, field: value}, field) for field, value in (
        ("auto_retries", 11), ("backoff_base_ms", 9), ("backoff_base_ms", 60_001), ("backoff_max_ms", 3_600_001),
        ("breaker_failure_threshold", 0), ("breaker_failure_threshold", 101), ("breaker_reset_s", 0),
        ("breaker_reset_s", 3601))],
    # A base above the stored maximum (1,000), the maximum left out: the base is named.
    ("PUT", "/settings/retry", "tenant_admin", {"backoff_base_ms": 40_000}, "backoff_base_ms"),
    ("PUT", "/webhook", "tenant_admin", {"url": "https://example.com/h", "secret": "s\x00" * 16}, "secret"),
    ("PUT", "/webhook", "tenant_admin", {"url": "https://example.com/h", "secret": 10**20}, "secret"),
    ("PUT", "/webhook", "tenant_admin", {"url": "ftp://example.com/h", "secret": "s" * 16}, "url"),
    # 169.254.169.254 behind the NAT64 prefix: an IPv6 form of a private IPv4 address.
    ("PUT", "/webhook", "tenant_admin", {"url": "http://[64:ff9b::a9fe:a9fe]/h", "secret": "s" * 16}, "url"),
    # {"purchased": true} granted 1 credit; "5" and 5.0 granted 5.
    ("POST", "/admin/tenants/{other}/credits", "platform_admin", {"purchased": True}, "purchased"),
    ("POST", "/admin/tenants/{other}/credits", "platform_admin", {"purchased": "5"}, "purchased"),
    ("POST", "/admin/tenants/{other}/credits", "platform_admin", {"purchased": 5.0}, "purchased"),
    ("POST", "/admin/tenants/{other}/credits", "platform_admin", {"purchased": 10**30}, "purchased"),
    ("POST", "/admin/tenants/{other}/credits", "platform_admin", {"purchased": 0}, "purchased"),
    ("POST", "/admin/workflow-runs/{run}/restore", "platform_admin", {"checkpoint_step": 2**63}, "checkpoint_step"),
    ("POST", "/admin/workflow-runs/{run}/restore", "platform_admin", {"checkpoint_step": "0"}, "checkpoint_step"),
    ("POST", "/admin/workflow-runs/{run}/restore", "platform_admin", {"checkpoint_step": 0, "file_index": -1},
     "file_index"),
])
async def test_wrong_types_and_values_are_a_422_naming_the_field_and_change_nothing(world, method, path, key, body,
                                                                                   field):
    body = json.loads(json.dumps(body).replace(TPL, world["template"]))
    path = path.format(other=world["other"], run=world["run"])
    # json.dumps writes 10**30 as an integer literal: what a client would send.
    r = await world["http"].request(method, API + path, data=json.dumps(body), headers=auth(world["keys"][key]))
    await refused(r, 422, "validation_error", field)
    assert await snapshot(world) == world["before"]


ID_ROUTES = [("GET", "/workflow-runs/{id}"), ("GET", "/workflow-runs/{id}/timeline"),
             ("POST", "/workflow-runs/{id}/retry-failed"), ("POST", "/workflow-runs/{id}/recover"),
             ("POST", "/workflows/{id}/recover"), ("POST", "/workflow-runs/{id}/cancel"),
             ("POST", "/workflow-runs/{id}/files/0/retry"), ("POST", "/workflow-runs/{id}/files/0/skip"),
             ("GET", "/templates/{id}"), ("DELETE", "/templates/{id}"), ("POST", "/notifications/{id}/read")]


async def test_garbage_ids_in_paths_are_404_or_422_never_500(world):
    http, admin = world["http"], auth(world["keys"]["platform_admin"])
    restore = {"checkpoint_step": 0}
    # A NUL reached PostgreSQL on every one of these routes: 500s.
    for id_ in ("%00", "a%00b", "%01"):
        for method, path in ID_ROUTES:
            await refused(await http.request(method, API + path.format(id=id_), headers=admin), 422, "validation_error")
        await refused(await http.post(f"{API}/admin/tenants/{id_}/credits", json={"purchased": 1}, headers=admin),
                      422, "validation_error", "tenant_id")
        await refused(await http.post(f"{API}/admin/workflow-runs/{id_}/restore", json=restore, headers=admin),
                      422, "validation_error", "run_id")
    for method, path in ID_ROUTES:  # longer than any id: a 100 KB one was echoed back in full by the 404
        r = await http.request(method, API + path.format(id="x" * 201), headers=admin)
        assert len(await refused(r, 422, "validation_error")) and len(await r.read()) < 1000
    for id_ in ("missing", "%E6%97%A5", "x" * 200, "%ff", "%20", "null", "-1", "'%3B--", "%5C"):
        for method, path in ID_ROUTES:
            r = await http.request(method, API + path.format(id=id_), headers=admin)
            assert r.status in (404, 422), (method, path, id_, r.status)
            await refused(r, r.status)
        r = await http.post(f"{API}/admin/tenants/{id_}/credits", json={"purchased": 1}, headers=admin)
        await refused(r, 422 if len(id_) > 64 else 404)  # longer than any tenant id
    for index in ("-1", "1.5", "abc", "0x1", "%EF%BC%91", "9999999999", "%00"):  # %EF%BC%91: a fullwidth 1
        for action in ("retry", "skip"):
            r = await http.post(f"{API}/workflow-runs/{world['run']}/files/{index}/{action}", headers=admin)
            await refused(r, 422, "validation_error", "file_index")
    r = await http.post(f"{API}/workflow-runs/{world['run']}/files/999999999/retry", headers=admin)
    await refused(r, 404, "not_found")
    assert await snapshot(world) == world["before"]


async def test_bad_query_strings_are_refused_with_the_parameter(world):
    http, member = world["http"], auth(world["keys"]["member"])
    for path, limit in (("/workflow-runs", 500), ("/credits/ledger", 500), ("/notifications", 200), ("/templates", 500),
                        (f"/workflow-runs/{world['run']}/timeline", 1000), ("/webhook/deliveries", 200)):
        for value in ("-1", "0", "abc", "1.5", "1e3"):
            await refused(await http.get(f"{API}{path}?limit={value}", headers=member), 422, "validation_error", "limit")
        # api.md sets no bound: a larger page counts as the largest; empty is not given.
        for value in (str(limit + 1), "9" * 40, ""):
            assert (await http.get(f"{API}{path}?limit={value}", headers=member)).status == 200, (path, value)
        for cursor in ("garbage", "%00", "%ff", "W10%3D", "bnVsbA%3D%3D", "A" * 501, "0" * 20,
                       "2026-01-01T00:00:00 00:00|x",  # a cursor whose "+" was not URL-encoded
                       "0001-01-01T00:00:00%2B05:00|x",  # before year 1 in UTC: a vague 400 from PostgreSQL
                       "2026-01-01T00:00:00|x"):  # no time zone
            r = await http.get(f"{API}{path}?cursor={cursor}", headers=member)
            if r.status != 200:  # "0"*20 may be a valid, empty page of a numeric cursor
                await refused(r, 422, "validation_error", "cursor")
    await refused(await http.get(f"{API}/workflow-runs?status=bogus", headers=member), 422, "validation_error", "status")
    await refused(await http.get(f"{API}/workflow-runs?needs_attention=maybe", headers=member), 422, None,
                  "needs_attention")
    await refused(await http.get(f"{API}/notifications?unread=maybe", headers=member), 422, None, "unread")
    # api.md's own template, its blanks sent empty: not given.
    for path in ("/workflow-runs?status=&needs_attention=&limit=&cursor=", "/credits/ledger?limit=&cursor=",
                 "/notifications?unread=&limit=&cursor="):
        assert (await http.get(f"{API}{path}", headers=member)).status == 200, path
    run = f"{API}/workflow-runs/{world['run']}"
    # Past PostgreSQL's integer the query failed (500); past 64 bits the gateway could not send it (500).
    for value in ("-1", "abc", str(2**31), str(2**63 - 1), str(2**64)):
        await refused(await http.get(f"{run}?file_offset={value}", headers=member), 422, "validation_error", "file_offset")
    for value in ("0", "x"):
        await refused(await http.get(f"{run}?file_limit={value}", headers=member), 422, "validation_error", "file_limit")
    larger = await (await http.get(f"{run}?file_limit=1001", headers=member)).json()
    assert larger["files_page"]["limit"] == 1000
    assert (await http.get(f"{run}?file_offset={2**31 - 1}", headers=member)).status == 200


async def raw_request(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_bad_authorization_and_x_tenant_id_headers(world):
    http, keys = world["http"], world["keys"]
    runs = f"{API}/workflow-runs"
    for value in ("", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token " + keys["member"], "Bearer rk_",
                  "Bearer rk_" + "a" * 6000, "Bearer " + keys["member"] + " extra", "Bearer\t" + keys["member"],
                  "Bearer ключ"):
        r = await http.get(runs, headers={"Authorization": value})
        await refused(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    # Bytes that are not UTF-8 arrive as surrogates: hashing the key was a 500, and so was
    # sending such a tenant id over NATS.
    port = world["stack"].services["gateway"][0].port
    answer = await raw_request(port, b"GET /api/v1/workflow-runs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                     b"Authorization: Bearer rk_\xff\xfe\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401") and b'"unauthorized"' in answer, answer
    admin = keys["platform_admin"].encode()
    answer = await raw_request(port, b"GET /api/v1/workflow-runs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                     b"Authorization: Bearer " + admin + b"\r\nX-Tenant-Id: \xff\xfe\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 422") and b"X-Tenant-Id" in answer, answer
    platform = auth(keys["platform_admin"], **{"X-Tenant-Id": "t" * 65})
    await refused(await http.get(f"{API}/credits", headers=platform), 422, "validation_error", "X-Tenant-Id")
    # A mistyped X-Tenant-Id made a template for a tenant that does not exist (201).
    ghost = auth(keys["platform_admin"], **{"X-Tenant-Id": "no-such-tenant"})
    await refused(await http.post(f"{API}/templates", json=TEMPLATE, headers=ghost), 404, "not_found")
    await refused(await http.get(runs, headers=ghost), 404, "not_found")
    await refused(await http.get(f"{API}/events", headers=ghost), 404, "not_found")  # streamed nobody's events
    await refused(await http.get(runs, headers=auth(keys["member"], **{"X-Tenant-Id": world["other"]})), 403, "forbidden")
    assert (await http.get(runs, headers=auth(keys["member"], **{"X-Tenant-Id": ""}))).status == 200
    assert await snapshot(world) == world["before"]


async def test_idempotency_key_edge_cases(world):
    http, keys = world["http"], world["keys"]
    body = {"template_id": world["template"], "files": [{"name": "a"}]}
    runs = f"{API}/workflow-runs"

    def keyed(key: str, role: str = "member") -> dict:
        return auth(keys[role], **{"Idempotency-Key": key})

    for key in ("", "   ", "k" * 256, "a\tb"):
        await refused(await http.post(runs, json=body, headers=keyed(key)), 422, "validation_error", "Idempotency-Key")
    # A refused body is not stored under the key: the corrected request goes ahead once.
    await refused(await http.post(runs, json={**body, "files": []}, headers=keyed("fix-then-send")), 422)
    first = await http.post(runs, json=body, headers=keyed("fix-then-send"))
    again = await http.post(runs, json=body, headers=keyed("fix-then-send "))  # surrounding spaces do not count
    assert first.status == again.status == 201 and await first.json() == await again.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    # The same key elsewhere, or with another body, is reuse.
    await refused(await http.post(f"{API}/templates", json=TEMPLATE, headers=keyed("fix-then-send", "tenant_admin")),
                  422, "idempotency_key_reused")
    await refused(await http.post(runs, json={**body, "max_retry_count": 4}, headers=keyed("fix-then-send")),
                  422, "idempotency_key_reused")
    wide = await http.post(runs, json=body, headers=keyed("ключ-🎉-" + "k" * 200))
    assert wide.status == 201
    charges = [e for e in (await (await http.get(f"{API}/credits/ledger?limit=500", headers=auth(keys["member"]))).json())
               ["items"] if e["run_id"] == (await first.json())["id"] and e["kind"] == "charge"]
    assert len(charges) == 1
    world["before"] = await snapshot(world)  # the two runs made here are the last things made


async def test_wrong_methods_are_405_with_allow(world):
    http, member = world["http"], auth(world["keys"]["member"])
    for method, path, allowed in [("PATCH", "/workflow-runs", "GET"), ("PUT", "/workflow-runs/x", "GET"),
                                  ("GET", "/workflow-runs/x/cancel", "POST"), ("POST", "/credits", "GET"),
                                  ("DELETE", "/settings/retry", "PUT"), ("POST", "/webhook", "PUT"),
                                  ("POST", "/events", "GET"), ("OPTIONS", "/templates", "POST"),
                                  ("TRACE", "/templates", "GET")]:
        r = await http.request(method, API + path, headers=member)
        await refused(r, 405, "method_not_allowed")
        assert allowed in r.headers["Allow"]
    assert (await http.post("/healthz")).status == 405
    # HEAD is a GET without the body (RFC 9110), but for the live stream, which never ends.
    assert (await http.head(f"{API}/events", headers=member)).status == 405


async def test_every_get_answers_head_without_a_body(world):
    http, member = world["http"], auth(world["keys"]["member"])
    for path in (f"{API}/workflow-runs", f"{API}/templates", "/healthz", "/readyz", "/"):
        got = await http.get(path, headers=member)
        head = await http.head(path, headers=member)
        assert got.status == head.status == 200, path
        assert head.headers["Content-Type"] == got.headers["Content-Type"], path
        assert await head.read() == b"" and await got.read() != b""
    # The same checks as its GET: no key, no answer.
    assert (await http.head(f"{API}/workflow-runs")).status == 401


async def test_a_query_parameter_given_twice_is_a_422_naming_it(world):
    http, member = world["http"], auth(world["keys"]["member"])
    r = await http.get(f"{API}/workflow-runs?limit=5&limit=500&status=RUNNING", headers=member)
    error = await refused(r, 422, "validation_error")
    assert error["details"]["fields"] == {"limit": "given more than once"}
    assert (await http.get(f"{API}/workflow-runs?limit=5", headers=member)).status == 200


async def test_json_nested_deeper_than_anything_of_ours_needs_is_a_422(world):
    http, admin = world["http"], auth(world["keys"]["tenant_admin"])
    for depth in (100, 600):  # 500 deep was a 500 when the gateway sent it on; 1000 deep, in its own check
        nested: object = 1
        for _ in range(depth):
            nested = [nested]
        body = {"name": "t", "steps": [{"name": "a", "handler": "noop", "params": {"k": nested}}]}
        error = await refused(await http.post(f"{API}/templates", json=body, headers=admin), 422, "validation_error")
        [field] = error["details"]["fields"]
        assert field.startswith("steps.0.params.k.0.0") and "nested" in error["details"]["fields"][field]
    assert await snapshot(world) == world["before"]


async def test_a_body_that_never_arrives_is_a_408_not_a_connection_held_forever(world, monkeypatch):
    from services.gateway import routes

    monkeypatch.setattr(routes, "BODY_READ_TIMEOUT_S", 0.3)
    port = world["stack"].services["gateway"][0].port
    key = world["keys"]["tenant_admin"].encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /api/v1/templates HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
                     + key + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
        body = await asyncio.wait_for(reader.readexactly(length), 5)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout", head + body
    assert await snapshot(world) == world["before"]


async def test_a_run_whose_files_outgrow_one_reply_is_answered_a_page_of_files_at_a_time(world):
    """800 files with 1,000-character names: the run body with all of them is over NATS's
    1 MB. It was a 500 after the run had been created and charged (a retry charged again)."""
    http, admin = world["http"], auth(world["keys"]["tenant_admin"])
    free = await (await http.post(f"{API}/templates", json={**TEMPLATE, "credits_per_file": 0}, headers=admin)).json()
    files = [{"name": f"{i:04}" + "n" * 996} for i in range(800)]
    r = await http.post(f"{API}/workflow-runs", json={"template_id": free["id"], "files": files}, headers=admin)
    assert r.status == 201, await r.text()
    run = await r.json()
    first = [f["index"] for f in run["files"]]
    assert 0 < len(first) < 800 and first == list(range(len(first)))
    assert run["files_page"]["next_offset"] == len(first)
    seen = first
    while (offset := run["files_page"]["next_offset"]) is not None:  # the rest, page by page
        r = await http.get(f"{API}/workflow-runs/{run['id']}?file_offset={offset}&file_limit=1000", headers=admin)
        assert r.status == 200, await r.text()
        run = await r.json()
        seen += [f["index"] for f in run["files"]]
    assert seen == list(range(800))
    world["before"] = await snapshot(world)  # the template and run made here


async def test_nothing_above_was_answered_with_a_5xx_and_the_gateway_still_serves(world):
    metrics = await (await world["http"].get("/metrics")).text()
    failures = [line for line in metrics.splitlines()
                if line.startswith("redrive_http_requests_total") and 'status="5' in line and not line.endswith(" 0.0")]
    assert not failures, failures
    assert (await world["http"].get("/healthz")).status == 200
    assert await snapshot(world) == world["before"]


async def test_an_undecodable_body_is_a_400_and_no_server_error_in_the_log(world, caplog):
    """aiohttp read the rest of such a body after the answer, failed again and logged
    "Unhandled exception" with three tracebacks."""
    http, keys = world["http"], world["keys"]
    r = await http.post(API + "/templates", data=b"{}",
                        headers=auth(keys["tenant_admin"], **{"Content-Encoding": "gzip", "Content-Type": "application/json"}))
    await refused(r, 400, "bad_request")
    ok = await http.get(API + "/templates", headers=auth(keys["tenant_admin"]))  # the gateway goes on
    assert ok.status == 200
    assert not [rec for rec in caplog.records if rec.name.startswith("aiohttp") and rec.levelname == "ERROR"]
