"""Step timeouts from the executor's one watchdog behave as asyncio.timeout."""

import asyncio
import time

import pytest

from services.executor.deadlines import Deadlines


async def test_a_step_past_its_limit_times_out_within_the_resolution():
    deadlines = Deadlines(resolution_s=0.02)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadlines.limit(0.1):
            await asyncio.sleep(5)
    assert 0.1 <= time.monotonic() - started < 0.5
    await deadlines.close()


async def test_a_step_within_its_limit_is_left_alone_and_so_is_its_task_afterwards():
    deadlines = Deadlines(resolution_s=0.01)
    async with deadlines.limit(0.2):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # past the deadline: nothing is cancelled any more
    assert asyncio.current_task().cancelling() == 0
    await deadlines.close()


async def test_only_the_overrunning_step_of_several_times_out():
    deadlines = Deadlines(resolution_s=0.01)

    async def step(limit: float, takes: float) -> str:
        try:
            async with deadlines.limit(limit):
                await asyncio.sleep(takes)
            return "done"
        except TimeoutError:
            return "timed out"

    assert await asyncio.gather(step(1, 0.05), step(0.05, 2), step(1, 0.1)) == ["done", "timed out", "done"]
    await deadlines.close()


async def test_a_cancellation_from_elsewhere_stays_a_cancellation():
    deadlines = Deadlines(resolution_s=0.01)

    async def step() -> None:
        async with deadlines.limit(10):
            await asyncio.sleep(10)

    task = asyncio.create_task(step())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await deadlines.close()
