"""The ``notifier`` consumer: events in, notifications (and webhook deliveries) out.

One transaction per batch, then the acks (commit, then ack). The event's ``Nats-Msg-Id``
is the notification's dedupe key, so a redelivered event never notifies twice. Nearly
every event of a run (a succeeded file, a checkpoint…) notifies nobody: that is decided
from the subject alone, before any JSON is parsed. A file's failure is told from the
coordinator's ``run.file_failed`` (what it applied), not from the executor's file event.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence

import structlog
from nats.aio.msg import Msg
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import tracing
from shared.errors import TransientError, refuses_its_data
from shared.messages import RunEvent
from shared.subjects import Names
from services.notifier import live, repository, texts

log = structlog.get_logger(__name__)

# A message whose notification the database keeps refusing (not a transient error) is
# retried this many deliveries, in case the cause is a bug about to be fixed, then dropped;
# at once when the database refuses a value of the event itself (refuses_its_data).
POISON_AFTER_DELIVERIES = 5

Record = Callable[[AsyncEngine, Sequence[dict]], Awaitable[repository.Recorded]]


class Decoder:
    """Turns one event message into the row of its notification, or None."""

    def __init__(self, names: Names) -> None:
        self._file_failed = names.run_event(texts.FILE_FAILED_KIND)
        self._run_prefix = names.run_event("")
        self._stream = names.events_stream

    def notification(self, msg: Msg) -> dict | None:
        subject = msg.subject
        if subject == self._file_failed:  # the coordinator made a file FAILED (not the executor's event)
            event = RunEvent.from_bytes(msg.data)
            if event.file_index is None:
                raise ValueError("a file_failed event names no file")
            kind, message, at = texts.FILE_FAILED_KIND, texts.file_failed_text(event), event.at
        elif subject.startswith(self._run_prefix) and subject[len(self._run_prefix):] in texts.RUN_KINDS:
            run_kind = subject[len(self._run_prefix):]
            event = RunEvent.from_bytes(msg.data)
            kind, message, at = texts.run_kind(run_kind), texts.run_text(run_kind, event), event.at
        else:  # other file events, started/retrying runs, breakers: nothing to tell anyone
            return None
        # PostgreSQL text refuses NUL, and an error text may quote binary data: keep the words.
        message = message.replace("\x00", "")
        return {"id": uuid.uuid4().hex, "tenant_id": event.tenant_id, "at": at, "kind": kind, "run_id": event.run_id,
                "file_index": event.file_index, "message": message, "dedupe_key": self._dedupe_key(msg)}

    def _dedupe_key(self, msg: Msg) -> str:
        msg_id = (msg.headers or {}).get("Nats-Msg-Id")
        # Without an id the stream sequence still identifies the message across redeliveries.
        return msg_id or f"{self._stream}:{msg.metadata.sequence.stream}"


def _deliveries(msg: Msg) -> int:
    try:
        return msg.metadata.num_delivered
    except Exception:
        return 1


def make_handler(engine: AsyncEngine, names: Names, on_deliveries: Callable[[], None], record: Record = repository.record,
                 announce: live.Announce = live.nobody):
    """The batch function of the ``notifier`` PullLoop. A transient database error escapes:
    the batch stays unacked and comes back after the ack wait. What was stored is pushed
    live (``announce``) after the commit, before the acks."""
    decoder = Decoder(names)

    async def handle(msgs: list[Msg]) -> None:
        to_ack: list[Msg] = []
        rows: dict[str, tuple[dict, list[Msg]]] = {}  # by dedupe key: a batch may hold a message twice
        for msg in msgs:
            try:
                row = decoder.notification(msg)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                log.error("notifier.unreadable_event", subject=msg.subject, error=repr(exc)[:500])
                await msg.term()
                continue
            if row is None:
                to_ack.append(msg)
            else:
                rows.setdefault(row["dedupe_key"], (row, []))[1].append(msg)
        if rows:
            try:
                recorded = await record(engine, [row for row, _ in rows.values()])
                to_ack += [m for _, batch in rows.values() for m in batch]
            except TransientError:
                raise
            except Exception as exc:
                log.error("notifier.batch_refused", error=repr(exc)[:500], rows=len(rows))
                recorded, acked = await _one_by_one(engine, record, rows.values())
                to_ack += acked
            if recorded.queued:
                on_deliveries()
            await announce(recorded.created, {key: trace for key, (_, batch) in rows.items()
                                              if (trace := (batch[0].headers or {}).get(tracing.HEADER))})
        for msg in to_ack:
            await msg.ack()

    return handle


async def _one_by_one(engine: AsyncEngine, record: Record, rows) -> tuple[repository.Recorded, list[Msg]]:
    """Isolate the row the database refuses so that the rest of the batch is not held back."""
    created, queued, recorded = [], 0, []
    for row, msgs in rows:
        try:
            one = await record(engine, [row])
            created += one.created
            queued += one.queued
            recorded += msgs
        except TransientError:
            raise
        except Exception as exc:
            for msg in msgs:
                if refuses_its_data(exc) or _deliveries(msg) >= POISON_AFTER_DELIVERIES:
                    log.error("notifier.event_dropped", dedupe_key=row["dedupe_key"], error=repr(exc)[:500])
                    await msg.term()
                else:  # left unacked: redelivered after the ack wait
                    log.error("notifier.event_refused", dedupe_key=row["dedupe_key"], error=repr(exc)[:500])
    return repository.Recorded(created, queued), recorded
