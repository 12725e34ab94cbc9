"""A tenant's window follows the executors' slots (services/coordinator/jobs.py: Window):
about HEADROOM × the slots of the executors alive, shared among the tenants with work
waiting, so with the default cap (REDRIVE_JOBS_IN_FLIGHT_PER_TENANT, 4,096) one tenant's
slow files do not queue thousands of jobs ahead of every other tenant on a small fleet."""

from __future__ import annotations

import asyncio
import time

from tests.stack import Stack, counts_add_up

SLOW = {"name": "work", "handler": "flaky", "params": {"sleep_ms": 100}}


async def slots_known(stack: Stack, expected: int, timeout: float = 10.0) -> None:
    """Until the coordinator's live view counts ``expected`` slots (the executors announce
    theirs as they start; the coordinator's copy follows the bucket)."""
    handlers = stack.services["coordinator"][0].deps.handlers
    deadline = time.monotonic() + timeout
    while handlers.slots() != expected:
        assert time.monotonic() < deadline, f"the coordinator counts {handlers.slots()} slots, not {expected}"
        await asyncio.sleep(0.02)


async def jobs_out(stack: Stack, tenant_id: str) -> int:
    """The tenant's jobs in the jobs stream: queued, or delivered and not yet acked."""
    subject = stack.names.job(tenant_id)
    info = await stack.js.stream_info(stack.names.jobs_stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def test_a_tenant_alone_has_twice_the_fleets_slots_out_and_completes(make_settings):
    from services.coordinator.window import HEADROOM, MIN_WINDOW

    slots = 16  # HEADROOM × slots above MIN_WINDOW: the slots bind, not the floor
    stack = await Stack(await make_settings(executor_concurrency=slots, executor_fetch_batch=slots)).start(
        "billing", "coordinator", "executor")
    try:
        assert HEADROOM * slots > MIN_WINDOW
        await slots_known(stack, slots)
        tenant = await stack.tenant()
        run = await stack.submit(tenant, await stack.template(tenant, [SLOW], credits_per_file=0), 200)
        seen = []
        while (await stack.run(tenant, run["id"]))["status"] == "RUNNING":  # 200 × 0.1 s / 16 slots: 1.3 s
            seen.append(await jobs_out(stack, tenant))
            await asyncio.sleep(0.02)
        # The default cap (4,096) would have had all 200 out at once.
        assert max(seen) > slots and max(seen) <= HEADROOM * slots, seen
        done = await stack.run(tenant, run["id"])
        assert done["status"] == "COMPLETED" and done["counts"]["succeeded"] == 200 and counts_add_up(done)
    finally:
        await stack.stop()


async def test_a_small_run_waits_behind_a_few_of_a_busy_tenants_jobs_not_all_of_them(make_settings):
    """The audit's case scaled down: 4 slots, a tenant's 200 slow free files (5 s of work),
    then another tenant's 3 noop files. With the cap alone, 196 of the slow jobs were queued
    ahead of them (about 5 s); with the window, at most MIN_WINDOW."""
    stack = await Stack(await make_settings(executor_concurrency=4, executor_fetch_batch=4)).start(
        "billing", "coordinator", "executor")
    try:
        await slots_known(stack, 4)
        busy, newcomer = await stack.tenant(), await stack.tenant()
        big = await stack.submit(busy, await stack.template(busy, [SLOW], credits_per_file=0), 200)
        quick = await stack.template(newcomer, [{"name": "s", "handler": "noop"}])
        while await jobs_out(stack, busy) == 0:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # the busy tenant's jobs are out and running
        started = time.monotonic()
        small = await stack.submit(newcomer, quick, 3)
        done = await stack.wait_run(newcomer, small["id"], timeout=30)
        took = time.monotonic() - started
        assert done["status"] == "COMPLETED" and done["counts"]["succeeded"] == 3
        # About 16 jobs ahead × 0.1 s / 4 slots = 0.4 s; with the cap alone, about 5 s.
        assert took < 1.5, f"the small run took {took:.2f} s"
        assert (await stack.run(busy, big["id"]))["status"] == "RUNNING"
        await stack.call("coordinator", "cancel", tenant_id=busy, run_id=big["id"])
    finally:
        await stack.stop()
