"""Actions on one file of a run take turns in the process, holding nothing while they wait;
only a few wait per run, and a wait has an end."""

from __future__ import annotations

import asyncio

import pytest

from services.coordinator.run_turns import RunTurns
from shared.messages import ServiceError


async def test_turns_at_one_run_come_one_at_a_time_in_order():
    turns, order, inside = RunTurns(), [], 0

    async def act(run: str, name: str) -> None:
        nonlocal inside
        async with turns.turn(run, 5):
            inside += 1
            assert inside == 1
            order.append(name)
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.gather(*(act("a", f"a{i}") for i in range(4)))
    assert order == ["a0", "a1", "a2", "a3"] and turns.waiting("a") == 0


async def test_only_so_many_wait_for_one_run_and_a_wait_ends():
    turns = RunTurns(max_waiting=2)
    held = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with turns.turn("a", 5):
            held.set()
            await release.wait()

    task = asyncio.create_task(holder())
    await held.wait()
    waiters = [asyncio.create_task(_enter(turns, "a", 5)) for _ in range(2)]
    await asyncio.sleep(0)
    assert turns.waiting("a") == 3
    with pytest.raises(ServiceError) as refused:
        await _enter(turns, "a", 5)  # a third waiter: refused at once
    assert refused.value.code == "run_running"
    async with turns.turn("b", 0.01):  # another run: no wait
        pass
    release.set()
    await asyncio.gather(task, *waiters)
    assert turns.waiting("a") == 0

    release.clear()
    held.clear()
    task = asyncio.create_task(holder())
    await held.wait()
    with pytest.raises(ServiceError):
        await _enter(turns, "a", 0.05)  # waited its time: a 409, and it no longer waits
    assert turns.waiting("a") == 1
    release.set()
    await task


async def _enter(turns: RunTurns, run: str, wait_s: float) -> None:
    async with turns.turn(run, wait_s):
        pass


async def test_an_attempt_of_a_request_that_holds_a_turn_is_told_to_send_it_again_others_wait():
    """Queued behind its own earlier attempt (whose client was told 503 and resent it), a
    request waited out its turn and was answered 409, which the gateway kept for its key."""
    turns, held, release = RunTurns(), asyncio.Event(), asyncio.Event()

    async def first_attempt() -> None:
        async with turns.turn("a", 5, request_id="k1"):
            held.set()
            await release.wait()

    task = asyncio.create_task(first_attempt())
    await held.wait()
    with pytest.raises(ServiceError) as again:
        async with turns.turn("a", 5, request_id="k1"):
            pass
    assert again.value.code == "service_unavailable"
    with pytest.raises(ServiceError) as other:
        async with turns.turn("a", 0.05, request_id="k2"):
            pass
    assert other.value.code == "run_running"
    release.set()
    await task
    async with turns.turn("a", 5, request_id="k1"):  # its first attempt done: its turn
        pass
    assert turns.waiting("a") == 0
