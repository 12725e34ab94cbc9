"""The ``coordinator-results`` consumer: parse a fetched batch, apply it, commit, then ack.

A message that cannot be applied never holds back the batch it came in:
* unreadable (not a FileEvent) → terminated at once, before the batch is applied;
* readable but refused by the database (a value it cannot store, an id past its index
  limit…: permanent) → the batch is applied again one event at a time, in order, and the
  one refused alone is terminated. The events stream keeps it (limits retention), and the
  log names its stream sequence, so nothing is lost for good;
* a transient failure (database away) → the batch is nak'ed and comes back whole.
"""

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


def _seq(msg: Msg) -> int | None:
    try:
        return msg.metadata.sequence.stream
    except Exception:  # not from JetStream (tests)
        return None


def make_results_handler(deps: Deps):
    async def apply(events: list[FileEvent]) -> None:
        async with transaction(deps.engine) as conn:
            wrote = await apply_events(conn, deps.names, events)
        # After the commit: kicked before, the relay found nothing yet and waited for its poll.
        # Results also open the window of a tenant whose jobs wait for room (outbox.py).
        if wrote or deps.relay.waiting_for_room:
            deps.relay.kick()

    async def one_by_one(events: list[FileEvent], msgs: list[Msg]) -> None:
        for n, (event, msg) in enumerate(zip(events, msgs)):
            try:
                await apply([event])
            except TransientError as exc:
                log.warning("results.retry_batch", events=len(msgs) - n, error=str(exc))
                for later in msgs[n:]:
                    await later.nak(delay=1)
                return
            except Exception as exc:  # permanent: this event alone is refused
                log.error("results.event_refused", msg_id=event.msg_id[:200], run_id=event.run_id[:100],
                          file_index=event.file_index, stream_seq=_seq(msg), error=repr(exc)[:500])
                await msg.term()
                continue
            await msg.ack()

    async def handle(msgs: list[Msg]) -> None:
        events: list[FileEvent] = []
        good: list[Msg] = []
        for msg in msgs:
            try:
                events.append(FileEvent.model_validate_json(msg.data))
                good.append(msg)
            except ValidationError as exc:
                # A malformed event can never apply: drop it (term) rather than loop on it.
                log.error("results.bad_event", subject=msg.subject, stream_seq=_seq(msg), error=str(exc)[:500])
                await msg.term()
        if not good:
            return
        try:
            await apply(events)
        except TransientError as exc:
            log.warning("results.retry_batch", events=len(good), error=str(exc))
            for msg in good:
                await msg.nak(delay=1)
            return
        except Exception as exc:
            # Permanent, and the whole transaction rolled back: find the event at fault.
            log.error("results.batch_refused", events=len(good), error=repr(exc)[:500])
            await one_by_one(events, good)
            return
        # Commit, then ack: a crash in between redelivers events the inbox already knows.
        for msg in good:
            await msg.ack()

    return handle
