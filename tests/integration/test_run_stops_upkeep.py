"""The executor's copy of the run-stops bucket holds what the bucket holds, against a real
NATS: a stop deleted or purged there is forgotten, and so is one older than the bucket's
TTL, of which the watcher hears nothing (the soak test: one entry per stopped run, kept
for as long as the executor lived)."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.coordinator.run_stops import TTL_S, ensure_bucket
from services.executor.run_stops import RunStops
from shared import bus
from shared.subjects import Names


@pytest.fixture
async def nats_bus(make_settings):
    settings = await make_settings(migrate=False)
    nc = await bus.connect(settings, "test-run-stops")
    yield nc.jetstream(), Names(settings.prefix)
    await nc.close()


async def stop(js, names: Names, run_id: str, generation: int) -> float:
    """Stop ``run_id`` up to ``generation`` as the coordinator's outbox does (a publish on the
    key's subject); when the bucket stored it."""
    ack = await js.publish(names.run_stop_subject(run_id), str(generation).encode())
    return (await js.get_msg(f"KV_{names.run_stops_bucket}", seq=ack.seq)).time.timestamp()


async def until(condition, what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


async def test_a_stop_deleted_or_purged_in_the_bucket_is_forgotten(nats_bus):
    js, names = nats_bus
    kv = await ensure_bucket(js, names)
    stops = RunStops(js, names)
    await stops.start()
    try:
        for run_id in ("deleted", "purged", "kept"):
            await stop(js, names, run_id, 2)
        await until(lambda: stops.held() == 3, "the stops never arrived")
        assert stops.stopped("deleted", 2) and stops.stopped("purged", 1)

        await kv.delete("deleted")
        await kv.purge("purged")
        await until(lambda: stops.held() == 1, "a deleted or purged stop was kept")
        assert not stops.stopped("deleted", 2) and not stops.stopped("purged", 1)
        assert stops.stopped("kept", 2)
        # An executor starting now reads the delete markers as the watcher did.
        late = RunStops(js, names)
        await late.start()
        try:
            assert late.held() == 1 and late.stopped("kept", 2) and not late.stopped("deleted", 2)
        finally:
            await late.stop()
        # Stopped again after a delete: counts again.
        await stop(js, names, "deleted", 3)
        await until(lambda: stops.stopped("deleted", 3), "a stop after a delete was not seen")
    finally:
        await stops.stop()


async def test_a_stop_older_than_the_buckets_ttl_is_forgotten(nats_bus):
    js, names = nats_bus
    now = time.time()
    stops = RunStops(js, names, clock=lambda: now)
    await stops.start()
    try:
        old = await stop(js, names, "old", 1)
        young = await stop(js, names, "young", 1)
        await stop(js, names, "rewritten", 1)
        rewritten = await stop(js, names, "rewritten", 2)  # stopped again: its age starts again
        assert old < young < rewritten
        await until(lambda: stops.stopped("rewritten", 2), "the stops never arrived")
        assert stops.held() == 3

        now = old + TTL_S - 1
        assert stops.stopped("old", 1) and stops.held() == 3  # not yet: the bucket still has it

        now = (old + young) / 2 + TTL_S
        assert stops.held() == 2 and not stops.stopped("old", 1)  # the bucket has let it go, and so do we
        assert stops.stopped("young", 1) and stops.stopped("rewritten", 2)

        now = (young + rewritten) / 2 + TTL_S  # between the two: they may be under a millisecond apart
        assert stops.held() == 1 and stops.stopped("rewritten", 2)
        now = rewritten + TTL_S + 0.001
        assert stops.held() == 0 and not stops.stopped("rewritten", 1)
    finally:
        await stops.stop()

