"""The tenant window under a crash: a coordinator killed -9 while its relay publishes a
tenant's runs a few jobs at a time (the expansions' progress is written in the
transaction that publishes each page) loses no job and runs none twice."""

from __future__ import annotations

import time

import pytest

from tests.chaos.test_scenarios import finish, some_progress, workload
from tests.procs import ProcStack

pytestmark = pytest.mark.chaos


async def test_coordinator_killed_while_a_tenant_waits_for_room(chaos_settings, tmp_path):
    stack = await ProcStack(await chaos_settings(), env={"REDRIVE_JOBS_IN_FLIGHT_PER_TENANT": "4"}).start(
        "billing", "coordinator", "notifier", "executor")
    try:
        log = tmp_path / "steps.log"
        tenant, _, ids = await workload(stack, log, sleep_ms=60)  # 2 runs of 30 files, 3 steps each
        await some_progress(stack, tenant, ids[0])
        stack.kill("coordinator")  # the watcher restarts it
        await finish(stack, "kill -9 coordinator, tenant window 4", tenant, ids, log, time.monotonic())
    finally:
        await stack.stop()
