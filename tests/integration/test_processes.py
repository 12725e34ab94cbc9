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
        # Its second step kills the executor: the failure is that step's, after the checkpoint
        # of the first (the coordinator fails the job knowing only where it started).
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"},
                                                 {"name": "b", "handler": "flaky", "params": {"crash": "^poison"}}])
        files = [{"name": "poison.pdf"}] + [{"name": f"ok{i}.pdf"} for i in range(20)]
        run = await stack.submit(tenant, template, 0, files=files)
        done = await stack.wait_run(tenant, run["id"], timeout=90)
        assert done["status"] == "COMPLETED_WITH_ERRORS"
        poison = done["files"][0]
        assert poison["status"] == "FAILED" and poison["last_error"]["class"] == "PoisonJob"
        assert all(f["status"] == "SUCCEEDED" for f in done["files"][1:])
        assert stack.deaths["executor"] >= 3
        deadline = time.monotonic() + 20
        while not (told := [n["message"] for n in (await stack.call("notifier", "list", tenant_id=tenant))["items"]
                            if n["kind"] == "file_failed"]):
            assert time.monotonic() < deadline, "no file_failed notification"
            await asyncio.sleep(0.05)
        assert len(told) == 1 and "(file 0, step 'b':" in told[0], told
    finally:
        await stack.stop()


async def test_the_jobs_in_flight_beside_a_job_that_kills_its_executor_survive_a_max_deliver_of_3(make_settings):
    """The jobs in flight with a poison job die with it at its first delivery, and again at
    its second (after one crash, redelivered jobs run side by side); from then on each of
    them is a suspect and runs alone, fetched alone: their third and last delivery is never
    spent beside the poison job."""
    settings = await make_settings(executor_ack_wait_s=1.0, executor_max_deliver=3, executor_allow_crash=True)
    stack = await ProcStack(settings).start("billing", "coordinator", "notifier", "executor")
    try:
        tenant = await stack.tenant()
        warm = await stack.submit(tenant, await stack.template(tenant, [{"name": "a", "handler": "noop"}]), 1)
        await stack.wait_run(tenant, warm["id"])  # at full speed: the jobs below are fetched together
        template = await stack.template(
            tenant, [{"name": "a", "handler": "flaky", "params": {"crash": "^poison", "sleep_ms": 800}}])
        files = [{"name": f"ok{i}.pdf"} for i in range(3)] + [{"name": "poison.pdf"}]
        run = await stack.submit(tenant, template, 0, files=files)
        done = await stack.wait_run(tenant, run["id"], timeout=60)
        assert done["status"] == "COMPLETED_WITH_ERRORS" and counts_add_up(done)
        assert [f["status"] for f in done["files"][:3]] == ["SUCCEEDED"] * 3
        assert done["files"][3]["status"] == "FAILED" and done["files"][3]["last_error"]["class"] == "PoisonJob"
        assert stack.deaths["executor"] == 3  # one per delivery of the poison job
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


async def test_the_jobs_in_flight_at_one_executor_crash_run_again_side_by_side(make_settings, tmp_path):
    """A crash that has nothing to do with the jobs (a deploy's kill, an OOM, a node lost)
    redelivers every job that was in flight, each once unexplained. Taken for suspects, they
    ran one after another (N step times of recovery instead of one); a job becomes a suspect
    only when it was in flight at a second death (test above: a poison job is still failed)."""
    import json

    step_s = 1.5
    log = tmp_path / "starts.log"
    settings = await make_settings(executor_ack_wait_s=1.0, handlers="tests.chaos.handlers")
    stack = await ProcStack(settings).start("billing", "coordinator", "executor")
    try:
        tenant = await stack.tenant()
        warm = await stack.submit(tenant, await stack.template(tenant, [{"name": "a", "handler": "noop"}]), 1)
        await stack.wait_run(tenant, warm["id"])  # a started executor is at full speed once it ran a job
        template = await stack.template(tenant, [{"name": "slow", "handler": "chaos_step",
                                                  "params": {"log": str(log), "sleep_ms": int(step_s * 1000)}}])
        n = 4
        run = await stack.submit(tenant, template, n)

        def starts() -> list[dict]:
            return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

        deadline = time.monotonic() + 20
        while len(starts()) < n:  # every job is in its step
            assert time.monotonic() < deadline, "the jobs never started"
            await asyncio.sleep(0.02)
        stack.kill("executor")  # kill -9 mid-step; the watcher starts another
        killed_at = time.time()
        done = await stack.wait_run(tenant, run["id"], timeout=30)
        assert done["status"] == "COMPLETED" and counts_add_up(done)
        again = [s["t"] for s in starts() if s["t"] > killed_at]
        assert sorted(s["file"] for s in starts() if s["t"] > killed_at) == list(range(n))  # each ran again once
        # Side by side: the last one started before the first one could have finished.
        assert max(again) - min(again) < step_s, f"one after another: started {[round(t - min(again), 2) for t in sorted(again)]}"
    finally:
        await stack.stop()


async def test_a_poison_batch_fails_only_its_files_not_done_and_tells_only_of_those(make_settings):
    """A batch job killed its executor at its third file, every delivery: at max deliver the
    coordinator fails the job's files. Those done before (SUCCEEDED) stay so, and nobody is
    told they failed (they were: "Step failed after multiple attempts" for each)."""
    settings = await make_settings(executor_ack_wait_s=1.0, executor_max_deliver=3, executor_allow_crash=True)
    stack = await ProcStack(settings).start("billing", "coordinator", "notifier", "executor")
    try:
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"crash": "^f2"}}])
        run = await stack.submit(tenant, template, 4, mode="batch")
        done = await stack.wait_run(tenant, run["id"], timeout=90)
        assert [f["status"] for f in done["files"]] == ["SUCCEEDED", "SUCCEEDED", "FAILED", "FAILED"], done["files"]
        deadline = time.monotonic() + 20
        while len(told := [n["file_index"] for n in (await stack.call("notifier", "list", tenant_id=tenant))["items"]
                           if n["kind"] == "file_failed"]) < 2:
            assert time.monotonic() < deadline, told
            await asyncio.sleep(0.05)
        assert sorted(told) == [2, 3]
    finally:
        await stack.stop()
