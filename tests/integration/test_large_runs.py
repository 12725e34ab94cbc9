"""A run body larger than one bus message (services/gateway/staging.py): still one POST,
created in one transaction, charged once, and nothing left behind."""

from __future__ import annotations

import json

import aiohttp
import pytest
from sqlalchemy import text

from services.coordinator.commands import staged_files
from services.gateway.identity import create_key, create_tenant
from shared.db import make_engine
from tests.stack import Stack, counts_add_up, expect_error

RUNS = "/api/v1/workflow-runs"


@pytest.fixture(scope="module")
async def big(make_settings):
    settings = await make_settings(port=0)
    stack = await Stack(settings).start("billing", "coordinator", "executor", "gateway")
    engine = make_engine(settings, pool_size=2)
    tenant = await create_tenant(engine, "bulk")
    await stack.call("billing", "open_account", tenant_id=tenant, monthly_allowance=100_000)
    key = await create_key(engine, tenant, "tenant_admin", "bulk")
    port = stack.services["gateway"][0].port
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}",
                                     headers={"Authorization": f"Bearer {key}"}) as http:
        template = await (await http.post("/api/v1/templates", json={
            "name": "bulk", "steps": [{"name": "a", "handler": "noop"}]})).json()
        yield {"stack": stack, "http": http, "tenant": tenant, "template": template["id"], "engine": engine}
    await engine.dispose()
    await stack.stop()


async def staged_rows(engine) -> int:
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT count(*) FROM coordinator.staged_files"))).scalar_one()


async def test_a_run_larger_than_a_bus_message_is_one_post_charged_once(big):
    stack, http, tenant = big["stack"], big["http"], big["tenant"]
    max_payload = stack.nc.max_payload
    n = max_payload // 1000 + 300  # ~1,000 bytes a file: a third more than one message carries
    files = [{"name": f"doc-{i:05d}.pdf", "url": f"https://files.example.com/{'x' * 950}/{i}"} for i in range(n)]
    body = {"template_id": big["template"], "files": files}
    assert len(json.dumps(body)) > max_payload
    first = await http.post(RUNS, json=body, headers={"Idempotency-Key": "bulk-1"})
    assert first.status == 201, await first.text()
    run = await first.json()
    again = await http.post(RUNS, json=body, headers={"Idempotency-Key": "bulk-1"})
    assert again.status == 201 and (await again.json())["id"] == run["id"]
    assert run["counts"]["total"] == n and run["files"][0]["name"] == "doc-00000.pdf"

    done = await stack.wait_run(tenant, run["id"])
    assert done["status"] == "COMPLETED" and done["counts"]["succeeded"] == n and counts_add_up(done)
    assert done["credits"]["consumed"] == n
    # Every file in its place: the parts were joined in order.
    last = await (await http.get(f"{RUNS}/{run['id']}?file_offset={n - 1}&file_limit=1")).json()
    assert [(f["index"], f["name"]) for f in last["files"]] == [(n - 1, f"doc-{n - 1:05d}.pdf")]
    charges = [e for e in await stack.ledger(tenant) if e["kind"] == "charge" and e["run_id"] == run["id"]]
    assert [c["amount"] for c in charges] == [-n]
    await stack.assert_books_balance(tenant)
    assert await staged_rows(big["engine"]) == 0  # taken by the run's transaction


async def test_a_batch_run_larger_than_a_message_is_413_before_any_charge(big):
    # Its one job carries every file: it cannot fit where the body did not.
    stack, http, tenant = big["stack"], big["http"], big["tenant"]
    before = await stack.ledger(tenant)
    n = stack.nc.max_payload // 1000 + 300
    files = [{"name": f"doc-{i:05d}.pdf", "url": f"https://files.example.com/{'x' * 950}/{i}"} for i in range(n)]
    r = await http.post(RUNS, json={"template_id": big["template"], "files": files, "mode": "batch"})
    assert r.status == 413 and (await r.json())["error"]["code"] == "payload_too_large"
    assert await stack.ledger(tenant) == before


async def test_parts_that_never_became_a_run_charge_nothing_and_are_pruned(big):
    stack, tenant = big["stack"], big["tenant"]
    await staged_files.prune(big["engine"], older_than_s=0)  # what earlier tests left
    part = {"tenant_id": tenant, "actor": "test", "upload_id": "abandoned-upload"}
    await stack.call("coordinator", "stage_files", **part, offset=0, files=[{"name": "a"}, {"name": "b"}])
    await stack.call("coordinator", "stage_files", **part, offset=0, files=[{"name": "a"}])  # a repeat: no change
    # Another tenant can neither take them nor, refused, delete them.
    other = await stack.tenant()
    await expect_error("bad_request", stack.call(
        "coordinator", "create_run", tenant_id=other, actor="test",
        template_id=await stack.template(other, [{"name": "a", "handler": "noop"}]),
        staged={"upload_id": "abandoned-upload", "count": 2}))
    assert await staged_rows(big["engine"]) == 2
    # Parts whose run never came (a gateway that died mid-upload) go after a day.
    assert await staged_files.prune(big["engine"], older_than_s=3600) == (0, False)  # young: kept
    assert await staged_files.prune(big["engine"], older_than_s=0) == (2, False)
    assert await staged_rows(big["engine"]) == 0


async def test_a_run_refused_deletes_the_parts_it_names_at_once(big):
    stack, tenant = big["stack"], big["tenant"]
    before = await stack.ledger(tenant)
    part = {"tenant_id": tenant, "actor": "test", "upload_id": "incomplete-upload"}
    await stack.call("coordinator", "stage_files", **part, offset=0, files=[{"name": "a"}, {"name": "b"}])
    # The run names three files but only two arrived: refused before any charge, and its
    # upload is of no use to anything any more.
    err = await expect_error("bad_request", stack.call(
        "coordinator", "create_run", tenant_id=tenant, actor="test", template_id=big["template"],
        staged={"upload_id": "incomplete-upload", "count": 3}))
    assert "2 of the run's 3 files" in err.message
    assert await stack.ledger(tenant) == before
    assert await staged_rows(big["engine"]) == 0


async def test_a_run_names_its_files_inline_or_staged_not_both(big):
    stack, tenant = big["stack"], big["tenant"]
    for extra, field in (({"files": [{"name": "a"}], "staged": {"upload_id": "some-upload", "count": 1}}, "staged"),
                         ({}, "files"), ({"files": []}, "files")):
        err = await expect_error("validation_error", stack.call(
            "coordinator", "create_run", tenant_id=tenant, actor="test", template_id=big["template"], **extra))
        assert list(err.details["fields"]) == [field]
