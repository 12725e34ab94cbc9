"""Several processes of the same service on one run; a job that kills its executor."""

from __future__ import annotations


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
    settings = await make_settings(executor_ack_wait_s=1.0, executor_max_deliver=3)
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
