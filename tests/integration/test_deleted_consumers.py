"""A durable consumer deleted while the system runs (an operator's `nats consumer rm`, a
stream tool, a mistake) is declared again by the loop that pulls from it, with the config
it was made with, and the run goes on to its exact end: no service restarts.

How a missing consumer shows differs by server (shared/pull_loop.py, ConsumerKeeper): a
pull request open at the deletion ends with "409 Consumer Deleted"; later ones get "503"
on NATS 2.15 and no answer at all on 2.9. These tests run on whichever server the session
has, so run them on both."""

from __future__ import annotations

import asyncio
import time

import pytest

from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError

from tests.stack import Stack, counts_add_up

FILES = 40
# Long enough that the deletion lands mid-run; short enough for a quick test.
STEPS = [{"name": "a", "handler": "flaky", "params": {"sleep_ms": 200}}]


async def until_consumer_is_back(stack: Stack, stream: str, durable: str, timeout: float = 20) -> ConsumerConfig:
    """The consumer's config, once some loop has declared it again (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return (await stack.js.consumer_info(stream, durable)).config
        except NotFoundError:
            if time.monotonic() > deadline:
                raise AssertionError(f"the consumer {stream}/{durable} was not declared again within {timeout:g} s")
            await asyncio.sleep(0.05)


async def run_with_a_consumer_deleted_midway(stack: Stack, stream: str, durable: str) -> None:
    tenant = await stack.tenant()
    template = await stack.template(tenant, STEPS)
    before = (await stack.js.consumer_info(stream, durable)).config
    run = await stack.submit(tenant, template, FILES)
    midway = await stack.wait_run(tenant, run["id"], until=lambda r: r["counts"]["succeeded"] >= 3, timeout=30)
    assert midway["counts"]["pending"] > 0, f"the run ended before the deletion: {midway['counts']}"
    await stack.js.delete_consumer(stream, durable)
    # No restart: the loop that lost its consumer declares it again and the run finishes.
    done = await stack.wait_run(tenant, run["id"], timeout=60)
    assert done["status"] == "COMPLETED", done["counts"]
    assert done["counts"]["succeeded"] == FILES and counts_add_up(done) and done["credits"]["consumed"] == FILES
    assert [f["status"] for f in done["files"]] == ["SUCCEEDED"] * FILES  # all on the first page (up to 1000)
    after = await until_consumer_is_back(stack, stream, durable)
    # Declared again as it was made (the same call as at start), not with some default.
    assert (after.filter_subject, after.filter_subjects, after.ack_wait, after.max_deliver, after.backoff) == \
        (before.filter_subject, before.filter_subjects, before.ack_wait, before.max_deliver, before.backoff)
    await stack.assert_books_balance(tenant)


@pytest.mark.parametrize("which", ["executor", "coordinator-results"])
async def test_a_run_completes_when_a_consumer_it_needs_is_deleted_mid_run(make_settings, which):
    stack = await Stack(await make_settings(executor_concurrency=4)).start("billing", "coordinator", "executor")
    n = stack.names
    stream, durable = {"executor": (n.jobs_stream, n.executor_consumer),
                       "coordinator-results": (n.events_stream, n.results_consumer)}[which]
    try:
        await run_with_a_consumer_deleted_midway(stack, stream, durable)
    finally:
        await stack.stop()


async def test_every_pull_loops_consumer_is_declared_again(make_settings):
    """The notifier's and the advisories' consumers come back too (each bootstrap gives its
    loop the call that declared it), while the services sit idle."""
    stack = await Stack(await make_settings()).start("billing", "coordinator", "notifier", "executor")
    try:
        n = stack.names
        consumers = [(n.jobs_stream, n.executor_consumer), (n.events_stream, n.results_consumer),
                     (n.events_stream, n.notifier_consumer), (n.advisories_stream, n.advisories_consumer)]
        before = {c: (await stack.js.consumer_info(*c)).config for c in consumers}
        for stream, durable in consumers:
            await stack.js.delete_consumer(stream, durable)
        for consumer in consumers:
            after = await until_consumer_is_back(stack, *consumer)
            assert (after.filter_subject, after.filter_subjects, after.ack_wait, after.max_deliver) == \
                (before[consumer].filter_subject, before[consumer].filter_subjects, before[consumer].ack_wait,
                 before[consumer].max_deliver), consumer
        # And they are pulled from again: a run goes through all of them.
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
        run = await stack.submit(tenant, template, 3)
        done = await stack.wait_run(tenant, run["id"], timeout=30)
        assert done["status"] == "COMPLETED" and counts_add_up(done)
        deadline = time.monotonic() + 20
        while not [i for i in (await stack.call("notifier", "list", tenant_id=tenant, limit=50))["items"]
                   if i["run_id"] == run["id"] and i["kind"] == "run_completed"]:
            assert time.monotonic() < deadline, "no notice of the run's end: the notifier's consumer is not pulled from"
            await asyncio.sleep(0.05)
    finally:
        await stack.stop()
