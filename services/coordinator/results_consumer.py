"""The ``coordinator-results`` consumer: parse a fetched batch, apply it, commit, then ack."""

from __future__ import annotations

import structlog
from nats.aio.msg import Msg
from pydantic import ValidationError

from shared.db import transaction
from shared.errors import TransientError
from shared.messages import FileEvent
from services.coordinator.context import Deps
from services.coordinator.results import apply_events

log = structlog.get_logger(__name__)


def make_results_handler(deps: Deps):
    async def handle(msgs: list[Msg]) -> None:
        events: list[FileEvent] = []
        good: list[Msg] = []
        for msg in msgs:
            try:
                events.append(FileEvent.model_validate_json(msg.data))
                good.append(msg)
            except ValidationError as exc:
                # A malformed event can never apply: drop it (term) rather than loop on it.
                log.error("results.bad_event", subject=msg.subject, error=str(exc)[:500])
                await msg.term()
        if not good:
            return
        try:
            async with transaction(deps.engine) as conn:
                rows = await apply_events(conn, deps.names, events)
        except TransientError as exc:
            log.warning("results.retry_batch", events=len(good), error=str(exc))
            for msg in good:
                await msg.nak(delay=1)
            return
        if rows:
            deps.relay.kick()
        # Commit, then ack: a crash in between redelivers events the inbox already knows.
        for msg in good:
            await msg.ack()

    return handle
