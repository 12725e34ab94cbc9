"""Jobs bigger than the broker's max payload: refused up front when a run's jobs would not
fit, and never allowed to block the outbox when one gets there anyway."""

from __future__ import annotations

import asyncio
import base64

import pytest
from sqlalchemy import text

from services.coordinator import jobs, outbox, store
from shared.db import transaction
from tests.stack import Stack, counts_add_up, expect_error


@pytest.fixture(scope="module")
async def stack(make_settings):
    # No executor: the jobs that do go out stay in the stream, where the test counts them.
    s = await Stack(await make_settings()).start("billing", "coordinator")
    yield s
    await s.stop()


async def _until_jobs_in_stream(stack: Stack, n: int, timeout: float = 20) -> None:
    async def count() -> int:
        return (await stack.js.stream_info(stack.names.jobs_stream)).state.messages

    async with asyncio.timeout(timeout):
        while await count() < n:
            await asyncio.sleep(0.05)


async def test_a_batch_run_whose_job_would_not_fit_is_refused_before_any_charge(stack):
    tenant = await stack.tenant(monthly=5000)
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    # ~1 MB of request: it fits in a message, but one batch job carrying every file does not.
    content = base64.b64encode(b"x" * 735).decode()
    files = [{"name": f"file-{i:04d}.txt", "content_b64": content} for i in range(1000)]
    err = await expect_error("payload_too_large", stack.submit(tenant, template, 0, files=files, mode="batch"))
    assert "send large files by url" in err.message and err.details["job_bytes"] > err.details["max_payload"]
    assert (await stack.call("coordinator", "list_runs", tenant_id=tenant))["items"] == []
    assert [e["kind"] for e in await stack.ledger(tenant)] == ["grant", "grant"]
    # The same files one job each are fine.
    run = await stack.submit(tenant, template, 0, files=files, mode="per_file")
    assert run["status"] == "RUNNING" and run["counts"]["pending"] == 1000


async def test_a_job_that_cannot_be_published_errors_its_file_and_holds_back_nothing(stack):
    tenant = await stack.tenant(monthly=100)
    template_id = await stack.template(tenant, [{"name": "a", "handler": "noop"}, {"name": "b", "handler": "noop"}])
    first = await stack.submit(tenant, template_id, 2)
    await _until_jobs_in_stream(stack, 2)  # its jobs are out (nobody pulls them)
    # A job that grew past the max payload (a later round would carry a big checkpoint
    # output) lands in the outbox ahead of everything else.
    engine = stack.services["coordinator"][0].engine
    async with transaction(engine) as conn:
        run = (await conn.execute(text("SELECT * FROM coordinator.runs WHERE id = :id"),
                                  {"id": first["id"]})).mappings().one()
        template = await store.load_template(conn, tenant, template_id, include_archived=True)
        big = {"idx": 1, "name": "f1.txt", "checkpoint_step": 0, "checkpoint_output": {"text": "x" * (1 << 20)}}
        await outbox.add(conn, jobs.job_rows(stack.names, run, template, [big], await store.retry_policy(conn, tenant),
                                             msg_suffix=":big"))
    second = await stack.submit(tenant, template_id, 1)
    await _until_jobs_in_stream(stack, 3)  # the next run's job went out behind it
    done = await stack.wait_run(tenant, first["id"], until=lambda r: r["counts"]["errored"] == 1)
    assert counts_add_up(done) and done["counts"]["pending"] == 1
    errored = next(f for f in done["files"] if f["index"] == 1)
    assert errored["status"] == "ERROR" and errored["attempts"] == 0
    assert errored["last_error"]["class"] == "JobTooLarge" and "a message may carry at most" in errored["last_error"]["message"]
    assert (await stack.run(tenant, second["id"]))["status"] == "RUNNING"
