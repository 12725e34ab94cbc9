"""One tenant never buries another under its jobs: every executor pulls from one FIFO
consumer, so the relay keeps at most ``REDRIVE_JOBS_IN_FLIGHT_PER_TENANT`` of a tenant's
jobs out at once, all its runs together (services/coordinator/window.py: room), and a run
submitted later waits behind that many at most, not behind all of the earlier runs' files."""

from __future__ import annotations

import pytest

from tests.stack import Stack, counts_add_up

BIG, WINDOW, SLOTS = 400, 8, 4


@pytest.fixture(scope="module")
async def stack(make_settings):
    # Four slots and 40 ms a file: the big run alone takes 4 s; the small run's 3 files
    # behind 8 of its jobs, about 0.1 s.
    s = await Stack(await make_settings(jobs_in_flight_per_tenant=WINDOW, executor_concurrency=SLOTS,
                                        executor_fetch_batch=SLOTS)).start("billing", "coordinator", "executor")
    yield s
    await s.stop()


async def test_a_small_run_submitted_after_a_big_one_does_not_wait_for_all_of_it(stack):
    big_tenant, small_tenant = await stack.tenant(), await stack.tenant()
    slow = {"name": "work", "handler": "flaky", "params": {"sleep_ms": 40}}
    big = await stack.submit(big_tenant, await stack.template(big_tenant, [slow]), BIG)
    small = await stack.submit(small_tenant, await stack.template(small_tenant, [slow]), 3)
    done = await stack.wait_run(small_tenant, small["id"], timeout=30)
    assert done["status"] == "COMPLETED"
    # Published whole, the big run's 400 jobs were ahead of the small run's: it would have
    # finished first. With the window, most of it is still to do.
    still = await stack.run(big_tenant, big["id"])
    assert still["status"] == "RUNNING" and still["counts"]["pending"] > BIG // 2, still["counts"]
    await stack.call("coordinator", "cancel", tenant_id=big_tenant, run_id=big["id"])


async def test_a_tenants_runs_share_one_window(stack):
    """Five runs of one tenant have at most WINDOW jobs out together (in the jobs stream:
    queued, or delivered and not yet acked), not WINDOW each."""
    import asyncio

    busy, other = await stack.tenant(), await stack.tenant()
    slow = {"name": "work", "handler": "flaky", "params": {"sleep_ms": 40}}
    template = await stack.template(busy, [slow])
    runs = [await stack.submit(busy, template, 40) for _ in range(5)]
    subject, seen = stack.names.job(busy), []
    while len(seen) < 30:  # about 1 s of the 2 s their 200 files take
        info = await stack.js.stream_info(stack.names.jobs_stream, subjects_filter=subject)
        seen.append((info.state.subjects or {}).get(subject, 0))
        await asyncio.sleep(0.02)
    assert max(seen) > 0 and max(seen) <= WINDOW, seen
    small = await stack.submit(other, await stack.template(other, [slow]), 2)
    assert (await stack.wait_run(other, small["id"], timeout=30))["status"] == "COMPLETED"
    statuses = [(await stack.run(busy, r["id"]))["status"] for r in runs]
    assert "RUNNING" in statuses, statuses  # it did not wait for them all
    for r in runs:  # the module's next tests want the slots
        assert (await stack.wait_run(busy, r["id"], timeout=30))["status"] == "COMPLETED"


async def test_a_batch_run_is_one_job_out_not_one_per_file(stack):
    tenant = await stack.tenant()
    batch = await stack.submit(tenant, await stack.template(
        tenant, [{"name": "work", "handler": "flaky", "params": {"sleep_ms": 100}}]), 3 * WINDOW, mode="batch")
    quick = await stack.submit(tenant, await stack.template(tenant, [{"name": "s", "handler": "noop"}]), 2)
    assert (await stack.wait_run(tenant, quick["id"], timeout=30))["status"] == "COMPLETED"
    assert (await stack.run(tenant, batch["id"]))["status"] == "RUNNING"  # its 24 files did not fill the window
    assert (await stack.wait_run(tenant, batch["id"], timeout=30))["status"] == "COMPLETED"


async def test_continue_on_a_big_run_keeps_to_the_window_too(stack):
    # Round 0 fails every file at once (no automatic retries); Continue reopens all of them.
    big_tenant, small_tenant = await stack.tenant(), await stack.tenant()
    await stack.call("coordinator", "put_settings", tenant_id=big_tenant, auto_retries=0, backoff_base_ms=100,
                     backoff_max_ms=100, jitter=False, breaker_failure_threshold=50, breaker_reset_s=1)
    failing_once = {"name": "work", "handler": "flaky", "params": {"sleep_ms": 40, "fail_rounds": 1}}
    big = await stack.submit(big_tenant, await stack.template(big_tenant, [failing_once]), BIG // 4)
    failed = await stack.wait_run(big_tenant, big["id"], timeout=60)
    assert failed["counts"]["failed"] == BIG // 4
    await stack.call("coordinator", "retry_failed", tenant_id=big_tenant, run_id=big["id"])
    slow = {"name": "work", "handler": "flaky", "params": {"sleep_ms": 40}}
    small = await stack.submit(small_tenant, await stack.template(small_tenant, [slow]), 3)
    assert (await stack.wait_run(small_tenant, small["id"], timeout=30))["status"] == "COMPLETED"
    still = await stack.run(big_tenant, big["id"])
    assert still["status"] == "RUNNING" and still["counts"]["pending"] > BIG // 8, still["counts"]
    done = await stack.wait_run(big_tenant, big["id"], timeout=60)
    assert done["status"] == "COMPLETED" and done["counts"]["succeeded"] == BIG // 4 and counts_add_up(done)
    await stack.assert_books_balance(big_tenant)


async def test_a_run_many_times_its_window_completes_exactly_once_per_file(stack):
    tenant = await stack.tenant()
    template = await stack.template(tenant, [{"name": "s", "handler": "noop"}])
    run = await stack.submit(tenant, template, 300)
    done = await stack.wait_run(tenant, run["id"], timeout=60)
    assert done["status"] == "COMPLETED" and done["counts"]["succeeded"] == 300 and counts_add_up(done)
    assert done["credits"]["consumed"] == 300
    info = await stack.js.consumer_info(stack.names.jobs_stream, stack.names.executor_consumer)
    assert info.num_redelivered == 0
    await stack.assert_books_balance(tenant)


async def test_recovery_keeps_to_the_window_and_gives_each_file_one_job(make_settings):
    """Its jobs lost (the stream purged), a run whose expansion waits for room is recovered
    within its tenant's window: a stuck run of 100,000 files re-published at once would bury
    every other tenant's jobs. The waiting expansion is dropped, or it would publish the
    files it had not reached a second time: each file gets one job after the loss."""
    import asyncio

    import asyncpg

    # No executor at first: the window's jobs stay out, and the expansion waits.
    settings = await make_settings(jobs_in_flight_per_tenant=5, recovery_interval_s=0.2, recovery_lease_s=0.5)
    stack = await Stack(settings).start("billing", "coordinator")
    db = await asyncpg.connect(settings.database_url)

    async def stream_state():
        return (await stack.js.stream_info(stack.names.jobs_stream)).state

    try:
        tenant = await stack.tenant()
        run = await stack.submit(tenant, await stack.template(tenant, [{"name": "s", "handler": "noop"}]), 20)
        while (await stream_state()).messages < 5:
            await asyncio.sleep(0.05)
        assert await db.fetchval("SELECT count(*) FROM coordinator.outbox WHERE expand IS NOT NULL") == 1
        await stack.js.purge_stream(stack.names.jobs_stream)  # the jobs are lost
        await stack.wait_run(tenant, run["id"], until=lambda r: r["attention_reason"] == "stuck", timeout=30)
        # The relay publishes before it commits: wait for the recovery's expansion to have
        # published its first page.
        for _ in range(200):
            spec = await db.fetchval("SELECT expand->>'published' FROM coordinator.outbox WHERE msg_id LIKE '%:rec%'")
            if spec == "5":
                break
            await asyncio.sleep(0.05)
        rows = await db.fetch("SELECT msg_id FROM coordinator.outbox")
        assert [r["msg_id"] for r in rows] == [f"{run['id']}:jobs:r0:rec1"], rows
        assert (await stream_state()).messages == 5  # the window, not the run's 20 files

        await stack.start("executor")
        done = await stack.wait_run(tenant, run["id"], timeout=60)
        assert done["status"] == "COMPLETED" and done["counts"]["succeeded"] == 20 and counts_add_up(done)
        assert done["credits"]["consumed"] == 20
        # 5 jobs before the loss, then one per file.
        assert (await stream_state()).last_seq == 5 + 20
        await stack.assert_books_balance(tenant)
    finally:
        await db.close()
        await stack.stop()


async def test_a_run_waiting_on_an_open_breaker_does_not_hold_its_tenants_window(stack):
    """The jobs of a run whose dependency's breaker is open wait, deferred by the executors:
    counted in the window, they kept every other run of the tenant from starting until the
    breaker closed (never, for a dependency that stays down)."""
    tenant = await stack.tenant()
    # Retries enough to keep the files PENDING; the breaker opens after 2 failures and
    # probes again after a minute, longer than this test.
    await stack.call("coordinator", "put_settings", tenant_id=tenant, auto_retries=10, backoff_base_ms=50,
                     backoff_max_ms=50, jitter=False, breaker_failure_threshold=2, breaker_reset_s=60)
    down = {"name": "call", "handler": "flaky", "params": {"p": 1.0, "dependency": "down-for-good"}}
    blocked = await stack.submit(tenant, await stack.template(tenant, [down]), 5 * WINDOW)
    flagged = await stack.wait_run(tenant, blocked["id"], until=lambda r: r.get("attention_reason") == "breaker_open",
                                   timeout=30)
    assert flagged["status"] == "RUNNING" and flagged["counts"]["pending"] == 5 * WINDOW
    other = await stack.submit(tenant, await stack.template(tenant, [{"name": "s", "handler": "noop"}]), 3)
    assert (await stack.wait_run(tenant, other["id"], timeout=20))["status"] == "COMPLETED"
    # The blocked run published no more of its jobs meanwhile: at most a window of them.
    subject = stack.names.job(tenant)
    info = await stack.js.stream_info(stack.names.jobs_stream, subjects_filter=subject)
    assert (info.state.subjects or {}).get(subject, 0) <= WINDOW
    await stack.call("coordinator", "cancel", tenant_id=tenant, run_id=blocked["id"])
