"""The outbox relay's loop (services/coordinator/outbox.py), without a database: when it
runs a pass. What a pass publishes is tested over real servers (test_outbox_expansion)."""

from __future__ import annotations

import asyncio

from services.coordinator.outbox import OutboxRelay


async def test_a_row_kicked_while_a_pass_runs_is_relayed_at_once_not_at_the_next_poll():
    loop = asyncio.get_running_loop()
    passes: list[float] = []
    again = asyncio.Event()

    class Relay(OutboxRelay):
        async def relay_once(self) -> bool:
            passes.append(loop.time())
            if len(passes) == 1:
                self.kick()  # a run finished (its completed event committed) during this pass
            else:
                again.set()
            return False

    relay = Relay(None, None, None, None, poll_s=30)  # type: ignore[arg-type]
    relay.start()
    try:
        await asyncio.wait_for(again.wait(), 5)  # the old loop cleared the kick: 30 s
    finally:
        await relay.stop()
    assert passes[1] - passes[0] < 1
