"""Several processes of the same service on one run; a job that kills its executor."""

from __future__ import annotations

import asyncio
import time

from tests.procs import ProcStack
from tests.stack import counts_add_up


async def test_two_coordinators_and_two_executors_keep_counts_exact(make_settings):
    stack = await ProcStack(await make_settings(), executors=2, coordinators=2).start(
        "billing", "coordinator", "executor")
    try:
        tenant = await stack.tenant(monthly=5000)
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}, {"name": "b", "handler": "noop"}])
        run = await stack.submit(tenant, template, 2000)
        done = await stack.wait_run(tenant, run["id"], timeout=90)
        assert done["status"] == "COMPLETED" and done["counts"]["succeeded"] == 2000 and counts_add_up(done)
        timeline = await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"])
        assert [e["kind"] for e in timeline["items"]].count("run_completed") == 1
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()


async def test_a_job_that_kills_its_executor_every_time_ends_failed_while_the_rest_complete(make_settings):
    # flaky's crash param works only where the operator allows it (a fault test's system).
    settings = await make_settings(executor_ack_wait_s=1.0, executor_max_deliver=3, executor_allow_crash=True)
    stack = await ProcStack(settings).start("billing", "coordinator", "notifier", "executor")
    try:
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"crash": "^poison"}}])
        files = [{"name": "poison.pdf"}] + [{"name": f"ok{i}.pdf"} for i in range(20)]
        run = await stack.submit(tenant, template, 0, files=files)
        done = await stack.wait_run(tenant, run["id"], timeout=90)
        assert done["status"] == "COMPLETED_WITH_ERRORS"
        poison = done["files"][0]
        assert poison["status"] == "FAILED" and poison["last_error"]["class"] == "PoisonJob"
        assert all(f["status"] == "SUCCEEDED" for f in done["files"][1:])
        assert stack.deaths["executor"] >= 3
    finally:
        await stack.stop()


async def test_a_poison_jobs_advisory_sent_while_no_coordinator_runs_is_kept_and_fails_the_job(make_settings):
    """The max-deliveries advisory is a core NATS message: sent while the coordinator was
    down, it was lost, and the run stayed RUNNING for good (its dead job in the stream made
    its tenant look busy to recovery). The advisories stream keeps it until handled."""
    settings = await make_settings(executor_ack_wait_s=1.0, executor_max_deliver=3, executor_allow_crash=True)
    stack = await ProcStack(settings).start("billing", "coordinator", "notifier", "executor")
    try:
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"crash": "^poison"}}])
        files = [{"name": "poison.pdf"}] + [{"name": f"ok{i}.pdf"} for i in range(5)]
        run = await stack.submit(tenant, template, 0, files=files)
        deadline = time.monotonic() + 30
        while not stack.deaths.get("executor"):  # the job is out: its first delivery killed an executor
            assert time.monotonic() < deadline, "the poison job never reached an executor"
            await asyncio.sleep(0.05)
        stack.kill("coordinator")
        stack.procs["coordinator"].clear()  # and it stays down
        while (await stack.js.stream_info(stack.names.advisories_stream)).state.messages < 1:
            assert time.monotonic() < deadline + 60, "no advisory was kept"
            await asyncio.sleep(0.1)
        stack.spawn("coordinator")
        await stack.wait_services("coordinator")
        done = await stack.wait_run(tenant, run["id"], timeout=60)
        assert done["status"] == "COMPLETED_WITH_ERRORS" and counts_add_up(done)
        assert done["files"][0]["status"] == "FAILED" and done["files"][0]["last_error"]["class"] == "PoisonJob"
        assert all(f["status"] == "SUCCEEDED" for f in done["files"][1:])
        assert (await stack.js.stream_info(stack.names.advisories_stream)).state.messages == 0  # handled: gone
        assert (await stack.js.stream_info(stack.names.jobs_stream)).state.messages == 0  # and the dead job with it
    finally:
        await stack.stop()


async def test_a_tenant_cannot_crash_or_freeze_the_shared_executor_by_default(make_settings):
    """No executor_allow_crash: flaky's crash param is refused in templates and errors the
    files of a template made before (never exiting), and a catastrophic poison regex errors
    its file within a bound instead of holding the executor's loop."""
    from sqlalchemy import text

    from shared.db import make_engine
    from shared.messages import ServiceError

    settings = await make_settings(executor_ack_wait_s=1.0, executor_max_deliver=3)
    stack = await ProcStack(settings).start("billing", "coordinator", "notifier", "executor")
    engine = make_engine(settings, pool_size=1)
    try:
        tenant = await stack.tenant()
        ok = [{"name": f"ok{i}.pdf"} for i in range(5)]
        # A template made before crash needed the operator (or while no executor could check
        # it): its runs reach the executor with the param anyway.
        old = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"poison": "^never"}}])
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE coordinator.templates SET steps = jsonb_set(steps, '{0,params}', "
                                    "CAST(:params AS jsonb)) WHERE id = :id"),
                               {"params": '{"crash": "^boom"}', "id": old})
        run = await stack.submit(tenant, old, 0, files=[{"name": "boom.pdf"}] + ok)
        done = await stack.wait_run(tenant, run["id"], timeout=60)
        for file in done["files"]:  # the step's params are refused, whatever the name
            assert file["status"] == "ERROR", file
            assert "'crash' is disabled on this system" in str(file["last_error"])
            assert "REDRIVE_EXECUTOR_ALLOW_CRASH" in str(file["last_error"])

        # (a+)+$ on the longest name a run takes: the match gives up, the file errors for good.
        slow = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"poison": "(a+)+$"}}])
        run = await stack.submit(tenant, slow, 0, files=[{"name": "a" * 1023 + "!"}, {"name": "a" * 30}] + ok)
        done = await stack.wait_run(tenant, run["id"], timeout=30)
        assert [f["status"] for f in done["files"][:2]] == ["ERROR", "ERROR"]
        assert "pattern took too long" in str(done["files"][0]["last_error"])
        assert "is poison" in str(done["files"][1]["last_error"])
        assert all(f["status"] == "SUCCEEDED" for f in done["files"][2:])
        assert not stack.deaths.get("executor")

        # And a new template using crash is refused, naming the step and the setting.
        try:
            await stack.template(tenant, [{"name": "a", "handler": "noop"},
                                          {"name": "b", "handler": "flaky", "params": {"crash": "^boom"}}])
            raise AssertionError("a template using crash was made")
        except ServiceError as exc:
            assert exc.code == "validation_error", exc
            why = exc.details["fields"]["steps.1.params"]
            assert "'crash' is disabled on this system" in why and "REDRIVE_EXECUTOR_ALLOW_CRASH" in why
    finally:
        await engine.dispose()
        await stack.stop()
