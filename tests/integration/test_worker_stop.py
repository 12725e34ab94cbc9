"""An executor's stop is bounded by its grace period, whatever it was waiting for: a suspect
running alone, or every slot taken by a long job (both held the pull loop, and the stop,
until a job ended). Real NATS; the job runner is a stand-in whose jobs never end."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared import bus, streams
from shared.subjects import Names
from services.executor.worker import Worker


class _Endless:
    def __init__(self, suspect: bool) -> None:
        self.suspect = suspect
        self.started = asyncio.Event()

    async def handle(self, msg, verdict) -> None:
        verdict(self.suspect)
        self.started.set()
        await asyncio.sleep(3600)


@pytest.mark.parametrize("suspect", [True, False], ids=["a suspect alone", "every slot taken"])
async def test_a_stop_ends_within_its_grace_period(make_settings, suspect):
    settings = await make_settings(migrate=False)
    names = Names(settings.prefix)
    nc = await bus.connect(settings, "test-worker")
    try:
        js = nc.jetstream()
        await streams.ensure_streams(js, settings)
        await streams.ensure_consumer(js, names.jobs_stream, names.executor_consumer, names.jobs_all, ack_wait_s=30,
                                  max_deliver=5, backoff_s=settings.executor_redelivery_backoff_s)
        await js.publish(names.job("t1"), b"{}")
        runner = _Endless(suspect)
        worker = Worker(js, names, runner, concurrency=1, fetch_batch=10)
        worker.start()
        await asyncio.wait_for(runner.started.wait(), 10)
        await asyncio.sleep(0.1)  # the pull loop is waiting now (for the suspect, or for a slot)
        began = time.monotonic()
        await worker.stop(grace_s=0.3)
        assert time.monotonic() - began < 2
        for job in list(worker._inflight):  # what the process's exit would end
            job.cancel()
    finally:
        await nc.close()
