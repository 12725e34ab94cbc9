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


async def test_results_kick_the_relay_only_once_their_transaction_has_committed(monkeypatch):
    """Kicked before the commit, the relay's pass found nothing yet and the run's completed
    event waited for the next poll (0.5 s, seen in the bench as a slow round)."""
    import contextlib
    from types import SimpleNamespace

    from services.coordinator import results_consumer

    log: list[str] = []

    @contextlib.asynccontextmanager
    async def transaction(engine):
        yield "conn"
        log.append("commit")

    async def apply_events(conn, names, events):
        return [{"row": "completed event"}]

    class Msg:
        data = b'{"v": 1, "kind": "succeeded", "job_id": "r:file:0:r0", "run_id": "r", "tenant_id": "t",' \
               b' "file_index": 0, "round": 0, "attempt": 1, "step": 0}'
        subject = "p.events.file.succeeded"

        async def ack(self):
            log.append("ack")

    monkeypatch.setattr(results_consumer, "transaction", transaction)
    monkeypatch.setattr(results_consumer, "apply_events", apply_events)
    relay = SimpleNamespace(kick=lambda: log.append("kick"))
    handle = results_consumer.make_results_handler(SimpleNamespace(engine=None, names=None, relay=relay))
    await handle([Msg()])
    assert log == ["commit", "kick", "ack"]
