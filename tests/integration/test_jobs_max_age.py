"""The jobs stream's max age (REDRIVE_JOBS_MAX_AGE_S): declared and applied to a stream made
without one, and end to end, a job that no executor took within it is dropped by JetStream
and its RUNNING run is re-published by the recovery sweep, then completes, charged once."""

from __future__ import annotations

import asyncio
import time

from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from shared import bus, streams
from shared.subjects import Names
from tests.stack import Stack, counts_add_up


async def test_the_jobs_stream_gets_its_max_age_even_when_made_without_one(make_settings):
    settings = await make_settings(migrate=False)
    names = Names(settings.prefix)
    nc = await bus.connect(settings, "test")
    try:
        js = nc.jetstream()
        # As an older redrive made it: no max age.
        await js.add_stream(StreamConfig(name=names.jobs_stream, subjects=[names.jobs_all],
                                         retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                                         duplicate_window=float(settings.duplicate_window_s)))
        assert (await js.stream_info(names.jobs_stream)).config.max_age in (None, 0, 0.0)
        for _ in range(2):  # an update, then again as it is
            await streams.ensure_streams(js, settings)
            config = (await js.stream_info(names.jobs_stream)).config
            assert config.max_age == settings.jobs_max_age_s == 7 * 24 * 3600
            assert config.duplicate_window == settings.duplicate_window_s
    finally:
        await nc.close()


async def _stream_messages(stack: Stack, until, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        messages = (await stack.js.stream_info(stack.names.jobs_stream)).state.messages
        if until(messages):
            return messages
        if time.monotonic() > deadline:
            raise AssertionError(f"the jobs stream still holds {messages} messages")
        await asyncio.sleep(0.05)


async def test_jobs_past_the_max_age_are_dropped_and_recovery_republishes_them(make_settings):
    # Jobs live 2 s; a quiet run is re-published 3 s after its last progress, so the stream
    # stays empty for about a second after each drop. Recovery never gives up here.
    settings = await make_settings(jobs_max_age_s=2, executor_ack_wait_s=1, recovery_interval_s=0.2,
                                   recovery_lease_s=3, recovery_max_failures=1000)
    stack = await Stack(settings).start("billing", "coordinator")  # no executor: nobody takes the jobs
    try:
        config = (await stack.js.stream_info(stack.names.jobs_stream)).config
        # JetStream wants no dedupe window longer than the max age: it is cut to it.
        assert (config.max_age, config.duplicate_window) == (2.0, 2.0)
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
        n = 3
        run = await stack.submit(tenant, template, n)
        assert await _stream_messages(stack, lambda m: m == n) == n  # published
        await _stream_messages(stack, lambda m: m == 0)  # dropped by JetStream: nothing took them
        assert (await stack.run(tenant, run["id"]))["status"] == "RUNNING"
        await stack.start("executor")
        done = await stack.wait_run(tenant, run["id"], timeout=60)
        assert done["status"] == "COMPLETED" and counts_add_up(done), done
        assert (done["counts"]["total"], done["counts"]["succeeded"], done["counts"]["pending"]) == (n, n, 0)
        assert done["credits"]["consumed"] == n
        kinds = [e["kind"] for e in (await stack.call("coordinator", "timeline", tenant_id=tenant,
                                                      run_id=run["id"]))["items"]]
        assert "recovery_started" in kinds, kinds  # the dropped jobs came back through the sweep
        charges = [e["amount"] for e in await stack.ledger(tenant) if e["kind"] == "charge" and e["run_id"] == run["id"]]
        assert charges == [-n]  # charged once: recovery re-publishes free of charge
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()
