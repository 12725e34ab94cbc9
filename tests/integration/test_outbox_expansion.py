"""A run's jobs are written as one expansion row and published by the relay a page at a
time: every PENDING file once, in order, never again after a re-expansion (dedupe), and
nothing for a run that is no longer RUNNING."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import orjson
import pytest
from sqlalchemy import text

from tests.stack import Stack


@pytest.fixture(scope="module")
async def stack(make_settings):
    # No executor: the jobs stay in the stream to be counted. Pages of 40 jobs.
    s = await Stack(await make_settings(outbox_batch=40)).start("billing", "coordinator")
    yield s
    await s.stop()


async def jobs_in_stream(stack, until, timeout=20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while (info := await stack.js.stream_info(stack.names.jobs_stream)).state.messages < until:
        assert time.monotonic() < deadline, f"{info.state.messages} jobs published, {until} expected"
        await asyncio.sleep(0.05)
    return [orjson.loads((await stack.js.get_msg(stack.names.jobs_stream, seq)).data)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)]


async def outbox_drained(stack, timeout=10.0) -> None:
    """Until the relay has published (and deleted) every outbox row."""
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        while rows := await conn.fetch("SELECT msg_id, after FROM coordinator.outbox, "
                                       "LATERAL (SELECT expand->>'after_idx' AS after) a"):
            assert time.monotonic() < deadline, f"the outbox still holds {[tuple(r) for r in rows]}"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def noop_run(stack, files: int) -> tuple[str, dict]:
    tenant = await stack.tenant(monthly=1000)
    template = await stack.template(tenant, [{"name": "s", "handler": "noop"}])
    return tenant, await stack.submit(tenant, template, files)


async def test_a_run_larger_than_a_page_publishes_each_job_once_in_order(stack):
    tenant, run = await noop_run(stack, 130)
    jobs = [j for j in await jobs_in_stream(stack, 130) if j["run_id"] == run["id"]]
    assert [j["file_index"] for j in jobs] == list(range(130))
    assert all(j["file"]["name"] == f"f{j['file_index']}.txt" and j["round"] == 0 for j in jobs)
    await outbox_drained(stack)

    # The relay dies after publishing, before its commit: the row comes back and is
    # expanded again from the start. JetStream drops every repeat (same job ids).
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        spec = {"run_id": run["id"], "round": 0, "policy": jobs[0]["retry"], "after_idx": -1}
        await conn.execute("INSERT INTO coordinator.outbox (subject, msg_id, payload, expand) VALUES ($1, 'again', '', $2)",
                           stack.names.job(tenant), orjson.dumps(spec).decode())
        stack.services["coordinator"][0].relay.kick()
        await outbox_drained(stack)
        info = await stack.js.stream_info(stack.names.jobs_stream)
        assert info.state.messages == 130
    finally:
        await conn.close()


async def test_pages_resume_after_the_last_index_and_stop_when_the_run_stops(stack):
    from services.coordinator.jobs import expand_page

    _, run = await noop_run(stack, 90)
    await outbox_drained(stack)  # the relay is done with it: the files are as the run left them
    engine = stack.services["coordinator"][0].engine
    spec = {"run_id": run["id"], "round": 0, "policy": {}, "after_idx": -1}
    async with engine.begin() as conn:
        first, after, _ = await expand_page(conn, spec, 40, names=stack.names)
        second, after2, _ = await expand_page(conn, after, 40, names=stack.names)
        last, done, _ = await expand_page(conn, after2, 40, names=stack.names)
        assert (after["after_idx"], after2["after_idx"], done) == (39, 79, None)
        assert (after["published"], after2["published"]) == (40, 80)
        assert [m.msg_id for m in first + second + last] == [f"{run['id']}:file:{i}:r0" for i in range(90)]
        # With a window, a page stops where the tenant's jobs out would pass it: all 90 of
        # this one's are out (published, no executor here).
        page = await expand_page(conn, after, 40, names=stack.names, window=90)
        assert page.waiting and not page.messages
        page = await expand_page(conn, spec, 40, names=stack.names, window=100)
        assert [m.msg_id for m in page.messages] == [f"{run['id']}:file:{i}:r0" for i in range(10)]
        await conn.execute(text("UPDATE coordinator.runs SET status = 'CANCELLED' WHERE id = :id"), {"id": run["id"]})
        assert await expand_page(conn, spec, 40, names=stack.names) == ([], None, False)
        await conn.rollback()  # leave the run as it was


async def test_a_page_walks_the_run_in_spans_past_files_that_are_done(stack, monkeypatch):
    """Pages are read a span of indexes at a time (jobs.SPAN): sparse PENDING files (a
    Continue of a few failed files in a big run) are all found, in order, across spans, and
    so are files past the run's last index (the unbounded read at the end)."""
    from services.coordinator import jobs

    monkeypatch.setattr(jobs, "SPAN", 8)
    _, run = await noop_run(stack, 90)
    await outbox_drained(stack)
    engine = stack.services["coordinator"][0].engine
    pending = [3, 4, 30, 31, 32, 77, 89]
    spec = {"run_id": run["id"], "round": 0, "policy": {}, "after_idx": -1}
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE coordinator.files SET status = 'SUCCEEDED' WHERE run_id = :id "
                                "AND NOT idx = ANY(:keep)"), {"id": run["id"], "keep": pending})
        seen, pages, page_spec = [], 0, spec
        while page_spec is not None:
            page = await jobs.expand_page(conn, page_spec, 2, names=stack.names)
            seen += [int(m.msg_id.split(":")[2]) for m in page.messages]
            page_spec, pages = page.next_spec, pages + 1
        assert seen == pending and pages == 4
        # A run whose total says 60 (indexes 0..59) still gets its files 77 and 89.
        await conn.execute(text("UPDATE coordinator.runs SET total = 60, pending = 60 WHERE id = :id"), {"id": run["id"]})
        page = await jobs.expand_page(conn, {**spec, "after_idx": 32}, 5, names=stack.names)
        assert [int(m.msg_id.split(":")[2]) for m in page.messages] == [77, 89] and page.next_spec is None
        await conn.rollback()  # leave the run as it was
