"""The transactional outbox: messages are written in the same transaction as the state
change that causes them, and a relay publishes them after commit.

No message is lost if the process dies between commit and publish (the rows stay and any
coordinator's relay publishes them), and none is duplicated downstream: JetStream drops a
second publish with the same ``Nats-Msg-Id`` inside the duplicate window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from nats.js import JetStreamContext
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.bus import Outgoing, client_of, fits, publish_many
from shared.copy import COPY_THRESHOLD, copy_rows
from shared.db import transaction
from shared.faults import crash_point

if TYPE_CHECKING:
    from services.coordinator.jobs import Page

log = structlog.get_logger(__name__)

# An expansion row's next page: (conn, its spec, page size) -> jobs.Page (messages, the
# spec to go on with or None when done, waiting for room). jobs.expand_page with the
# tenants' window, wired in the composition root.
Expander = Callable[[AsyncConnection, dict[str, Any], int], Awaitable["Page"]]
# Messages the broker will never take (over its max payload), handed over in the relay's
# transaction before their rows are deleted: (conn, messages, max payload).
# undeliverable.report_undeliverable, wired in the composition root.
Undeliverable = Callable[[AsyncConnection, list[Outgoing], int], Awaitable[None]]

_INSERT = text(
    "INSERT INTO coordinator.outbox (subject, msg_id, payload, headers, expand) "
    "VALUES (:subject, :msg_id, :payload, CAST(:headers AS jsonb), CAST(:expand AS jsonb))"
)

# Rows are deleted in the transaction that publishes them; SKIP LOCKED lets several
# coordinator replicas relay different rows at once. Plain rows first: expansions can
# wait in the outbox for a long time (their tenants' windows), and however many of them
# there are, they must not keep a run's events out of the pass.
_TAKE = text(
    "SELECT id, subject, msg_id, payload, headers, expand FROM coordinator.outbox "
    "ORDER BY expand IS NOT NULL, id LIMIT :limit FOR UPDATE SKIP LOCKED"
)
# An expansion's first page is small, so a new round's first jobs reach the executors at
# once instead of after a whole page is built and sent (time to first result: bench phases).
FIRST_PAGE = 256
_DONE = text("DELETE FROM coordinator.outbox WHERE id = ANY(CAST(:ids AS bigint[]))")
_ADVANCE = text("UPDATE coordinator.outbox SET expand = CAST(:expand AS jsonb) WHERE id = :id")


def page_size(spec: dict[str, Any], batch: int) -> int:
    """How many jobs an expansion's next page builds: FIRST_PAGE to begin with, then ``batch``."""
    return batch if spec.get("after_idx", -1) >= 0 else min(batch, FIRST_PAGE)


def row(subject: str, msg_id: str, payload: bytes, headers: dict[str, str] | None = None) -> dict:
    return {"subject": subject, "msg_id": msg_id, "payload": payload, "headers": orjson.dumps(headers or {}).decode(),
            "expand": None}


async def add(conn: AsyncConnection, rows: list[dict]) -> None:
    if len(rows) >= COPY_THRESHOLD:
        await copy_rows(conn, "coordinator", "outbox", ("subject", "msg_id", "payload", "headers", "expand"),
                        ((r["subject"], r["msg_id"], r["payload"], r["headers"], r["expand"]) for r in rows))
    elif rows:
        await conn.execute(_INSERT, rows)


class OutboxRelay:
    """Publishes outbox rows: at once when this process wrote some (``kick``), and on a
    short poll for rows other processes (or a crashed one) left behind."""

    def __init__(self, engine: AsyncEngine, js: JetStreamContext, expand: Expander, undeliverable: Undeliverable, *,
                 batch: int = 2000, poll_s: float = 0.5) -> None:
        self._engine = engine
        self._js = js
        self._expand = expand
        self._undeliverable = undeliverable
        self._batch = batch
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
        self.published = 0
        self.waiting_for_room = False

    def kick(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task:
            await self._task

    async def relay_once(self) -> bool:
        """Publish the oldest rows, and a page of each expansion row among them that has
        room (its tenant's window); True if more may wait."""
        async with transaction(self._engine) as conn:
            rows = (await conn.execute(_TAKE, {"limit": self._batch})).mappings().all()
            if not rows:
                self.waiting_for_room = False
                return False
            crash_point("before_publish")  # committed upstream, not yet published
            messages = [Outgoing(r["subject"], bytes(r["payload"]), r["msg_id"], r["headers"] or None)
                        for r in rows if r["expand"] is None]
            done = [r["id"] for r in rows if r["expand"] is None]
            more = len(rows) >= self._batch
            waiting = advanced = False
            # Every run being expanded gets a page in turn, up to a pass's worth of jobs: a
            # run waiting for room in its tenant's window holds up neither the rows behind
            # it nor other tenants' runs. (No row depends on a run's later jobs going out
            # first: its own events come after its files' results, its later rounds after
            # this one.)
            for r in rows:
                if r["expand"] is None:
                    continue
                if len(messages) >= self._batch:
                    more = True
                    break
                spec = r["expand"]
                page = await self._expand(conn, spec, page_size(spec, self._batch))
                if page.waiting:
                    waiting = True
                    continue
                messages += page.messages
                if page.next_spec is None:
                    done.append(r["id"])
                else:
                    await conn.execute(_ADVANCE, {"id": r["id"], "expand": orjson.dumps(page.next_spec).decode()})
                    more = advanced = True
            max_payload = client_of(self._js).max_payload
            if not all(fits(m, max_payload) for m in messages):
                # Sent, they would fail this pass and every next one: deal with them now.
                await self._undeliverable(conn, [m for m in messages if not fits(m, max_payload)], max_payload)
                messages = [m for m in messages if fits(m, max_payload)]
                more = True  # what it wrote (events about the files) goes out next pass
            await publish_many(self._js, messages)
            await conn.execute(_DONE, {"ids": done})
        self.published += len(messages)
        if not (done or advanced):
            more = False  # every row taken waits for room: passes until then would spin
        # A tenant's window opens as its results are recorded: the results consumer kicks the
        # relay while this is set (other coordinators' results reach it by the poll).
        self.waiting_for_room = waiting
        return more

    async def _run(self) -> None:
        while not self._stopping:
            # Cleared before the passes, not after: a row committed (and kicked) while a pass
            # runs must not wait for the poll (a run's completed event waited up to 0.5 s).
            self._wake.clear()
            try:
                while await self.relay_once() and not self._stopping:
                    pass
            except Exception as exc:  # NATS or Postgres away: the rows wait for the next pass
                log.warning("outbox.relay_failed", error=repr(exc))
                await asyncio.sleep(0.5)
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            except asyncio.TimeoutError:
                pass
        try:  # flush what is left before the process goes
            await self.relay_once()
        except Exception:
            pass
