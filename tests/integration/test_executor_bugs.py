"""A bug in the executor's own code on a job's path: the job comes back soon and runs,
instead of sitting unacked until the ack wait (and, on every delivery, for 20 of them)."""

from __future__ import annotations

import pytest

from tests.stack import Stack


@pytest.fixture(scope="module")
async def stack(make_settings):
    s = await Stack(await make_settings(executor_ack_wait_s=30.0, executor_redelivery_backoff_s=[30, 120])).start(
        "billing", "coordinator", "executor")
    yield s
    await s.stop()


async def test_a_job_that_met_a_bug_comes_back_before_the_ack_wait_and_runs(stack, monkeypatch):
    runner = stack.services["executor"][0].worker._runner
    handle, calls = runner.handle, []

    async def buggy_once(msg, *args):
        calls.append(msg)
        if len(calls) == 1:
            raise RuntimeError("a bug of ours")
        return await handle(msg, *args)

    monkeypatch.setattr(runner, "handle", buggy_once)
    tenant = await stack.tenant()
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    run = await stack.submit(tenant, template, 1)
    # Well within the 30 s ack wait: only a nak with a short delay brings it back this soon.
    done = await stack.wait_run(tenant, run["id"], timeout=10)
    assert done["status"] == "COMPLETED" and len(calls) == 2
    assert done["credits"]["consumed"] == 1


def test_the_backoff_after_a_bug_grows_and_is_capped():
    from services.executor.worker import bug_backoff_s

    assert [bug_backoff_s(n) for n in (1, 2, 3, 4, 5, 20)] == [1, 2, 4, 8, 10, 10]


async def test_the_executor_consumer_takes_its_redelivery_backoff_from_the_settings(stack):
    consumer = await stack.js.consumer_info(stack.names.jobs_stream, stack.names.executor_consumer)
    assert (consumer.config.backoff, consumer.config.ack_wait, consumer.config.max_deliver) == ([30, 120], 30, 20)
