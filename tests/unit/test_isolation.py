import asyncio

from services.executor.isolation import IsolationGate


async def test_a_suspect_runs_alone_after_the_jobs_in_flight_and_before_new_ones():
    gate, order = IsolationGate(), []
    release_first = asyncio.Event()

    async def normal(name, wait=None):
        async with gate.shared():
            order.append(f"{name}+")
            if wait:
                await wait.wait()
            order.append(f"{name}-")

    async def suspect():
        async with gate.exclusive():
            order.append("S+")
            await asyncio.sleep(0)
            order.append("S-")

    first = asyncio.create_task(normal("a", release_first))
    await asyncio.sleep(0)
    s = asyncio.create_task(suspect())
    await asyncio.sleep(0)
    late = asyncio.create_task(normal("b"))
    await asyncio.sleep(0)
    assert order == ["a+"]  # the suspect waits for a; b waits for the suspect
    release_first.set()
    await asyncio.gather(first, s, late)
    assert order == ["a+", "a-", "S+", "S-", "b+", "b-"]


def test_a_job_is_a_suspect_at_its_second_unexplained_delivery_but_never_at_its_last():
    from services.executor.deliveries import suspect_after

    assert suspect_after(20) == 2 and suspect_after(3) == 2  # one crash is not enough
    assert suspect_after(2) == 1  # the second delivery is the last: it must run alone
