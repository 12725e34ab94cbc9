"""A run over real NATS JetStream and PostgreSQL, end to end through the real services."""

from __future__ import annotations

import pytest

from tests.stack import Stack, counts_add_up, expect_error


@pytest.fixture(scope="module")
async def stack(make_settings):
    s = await Stack(await make_settings()).start("billing", "coordinator", "executor")
    yield s
    await s.stop()


async def test_a_200_file_run_completes_with_exact_counts_and_credits(stack):
    tenant = await stack.tenant(monthly=150, purchased=100)
    template = await stack.template(tenant, [{"name": "hash", "handler": "noop"}], credits_per_file=1)
    run = await stack.submit(tenant, template, 200)
    assert run["status"] == "RUNNING" and run["counts"]["pending"] == 200
    assert run["credits"] == {"consumed": 200, "from_monthly": 150, "from_purchased": 50, "refunded": 0}
    assert run["trace_id"] == run["id"]  # asked with no trace: the run's own id is its trace
    # api.md: 201 run, the run body with its files (the first page of them).
    assert [f["index"] for f in run["files"]] == list(range(200)) and {f["status"] for f in run["files"]} == {"PENDING"}
    done = await stack.wait_run(tenant, run["id"])
    assert done["status"] == "COMPLETED"
    assert done["counts"]["succeeded"] == 200 and counts_add_up(done)
    assert all(f["status"] == "SUCCEEDED" and f["attempts"] == 1 for f in done["files"])
    timeline = await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"])
    assert [e["kind"] for e in timeline["items"]].count("run_completed") == 1
    # Every file's success is in the log (an entry per results batch, not per file).
    logged = [i for e in timeline["items"] if e["kind"] == "files_succeeded" for i in e["details"]["files"]]
    assert sorted(logged) == list(range(200))
    await stack.assert_books_balance(tenant)


async def test_multi_step_checkpoints_and_batch_mode(stack):
    tenant = await stack.tenant()
    steps = [{"name": "a", "handler": "checksum"}, {"name": "b", "handler": "noop"}]
    template = await stack.template(tenant, steps)
    files = [{"name": "x", "content_b64": "aGVsbG8="}, {"name": "y", "content_b64": "d29ybGQ="}]
    for mode in ("per_file", "batch"):
        run = await stack.submit(tenant, template, 0, files=files, mode=mode)
        done = await stack.wait_run(tenant, run["id"])
        assert done["status"] == "COMPLETED", done
        assert [f["checkpoint_step"] for f in done["files"]] == [1, 1]


async def test_insufficient_credits_leaves_no_run_and_no_charge(stack):
    tenant = await stack.tenant(monthly=5, purchased=0)
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}], credits_per_file=2)
    err = await expect_error("insufficient_credits", stack.submit(tenant, template, 3))
    assert err.details == {"needed": 6, "available": 5}
    runs = await stack.call("coordinator", "list_runs", tenant_id=tenant)
    assert runs["items"] == []
    assert [e["kind"] for e in await stack.ledger(tenant)] == ["grant", "grant"]


async def test_another_tenants_run_is_not_found(stack):
    a, b = await stack.tenant(), await stack.tenant()
    template = await stack.template(a, [{"name": "a", "handler": "noop"}])
    run = await stack.submit(a, template, 1)
    await expect_error("not_found", stack.run(b, run["id"]))


async def test_invalid_requests_are_refused_with_field_errors(stack):
    tenant = await stack.tenant()
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    for bad in ({"max_retry_count": 0}, {"max_retry_count": 11}):
        err = await expect_error("validation_error", stack.submit(tenant, template, 1, **bad))
        assert "max_retry_count" in err.details["fields"]
    err = await expect_error("validation_error", stack.call("coordinator", "create_run", tenant_id=tenant,
                                                             template_id=template, files=[]))
    assert "files" in err.details["fields"]


async def test_a_large_run_is_read_a_page_of_files_at_a_time(stack):
    tenant = await stack.tenant(monthly=5000)
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    run = await stack.submit(tenant, template, 2500)
    assert len(run.get("files", [])) == 0 or len(run["files"]) <= 1000
    await stack.wait_run(tenant, run["id"])
    first = await stack.call("coordinator", "get_run", tenant_id=tenant, run_id=run["id"])
    assert len(first["files"]) == 1000 and first["files_page"]["next_offset"] == 1000
    last = await stack.call("coordinator", "get_run", tenant_id=tenant, run_id=run["id"], file_offset=2000)
    assert [f["index"] for f in last["files"]][:1] == [2000] and len(last["files"]) == 500
    assert last["files_page"]["next_offset"] is None and last["counts"]["succeeded"] == 2500


async def test_creating_a_run_with_an_existing_run_id_returns_that_run_and_charges_once(stack):
    tenant = await stack.tenant(monthly=10)
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    first = await stack.submit(tenant, template, 2, run_id="fixed-run-id-0001")
    again = await stack.submit(tenant, template, 2, run_id="fixed-run-id-0001")
    assert again["id"] == first["id"]
    assert [e["amount"] for e in await stack.ledger(tenant) if e["kind"] == "charge"] == [-2]


async def test_the_timeline_is_read_a_page_at_a_time_oldest_first(stack, monkeypatch):
    from services.coordinator import pages as pages_module

    tenant = await stack.tenant()
    await stack.call("coordinator", "put_settings", tenant_id=tenant, auto_retries=3, backoff_base_ms=10, backoff_max_ms=20)
    template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_attempts": 1}}])
    run = await stack.submit(tenant, template, 5)
    await stack.wait_run(tenant, run["id"])
    whole = await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"])
    assert whole["next_cursor"] is None and len(whole["items"]) >= 8  # created, charged, 5 retries, completed

    async def pages(**kw):
        items, cursor, sizes = [], None, []
        while True:
            page = await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"], cursor=cursor, **kw)
            items += page["items"]
            sizes.append(len(page["items"]))
            if (cursor := page["next_cursor"]) is None:
                return items, sizes

    items, sizes = await pages(limit=3)
    assert items == whole["items"] and set(sizes[:-1]) == {3}
    monkeypatch.setattr(pages_module, "PAGE_BYTES", 1)  # a page ends early rather than outgrow a reply
    items, sizes = await pages()
    assert items == whole["items"] and set(sizes) == {1}
    await expect_error("validation_error", stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"],
                                                      cursor="not-ours"))
