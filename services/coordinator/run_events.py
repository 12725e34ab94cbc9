"""Run events go out through the outbox, in the transaction that changed the run, in the run's trace."""

from __future__ import annotations

from typing import Any, Mapping

from shared.bus import headers_for
from shared.tracing import run_trace_id
from shared.messages import FileEvent, RunEvent
from shared.subjects import Names
from services.coordinator import outbox
from services.coordinator.views import COUNT_FIELDS


def run_event_row(names: Names, run: Mapping[str, Any], kind: str, message: str | None = None, *, unique: str = "") -> dict:
    event = RunEvent(
        kind=kind, run_id=run["id"], tenant_id=run["tenant_id"], round=run["round"], status=run["status"],
        counts={name: run[name] for name in COUNT_FIELDS}, message=message,
    )
    msg_id = event.msg_id + (f":{unique}" if unique else "")
    return outbox.row(names.run_event(kind), msg_id, event.to_bytes(), headers_for(msg_id, run["tenant_id"], run["id"], run_trace_id(run["id"], run.get("trace_id"))))


# A notification is a line to read (notifier/texts.py bounds it again, for every kind).
FILE_FAILED_MESSAGE_CHARS = 2000


def file_failed_row(names: Names, run: Mapping[str, Any], event: FileEvent) -> dict:
    """``run.file_failed``: the coordinator made a file FAILED (its retries spent) on this
    event. Told from here, not from the executor's event, which also comes for a file
    cancelled or skipped meanwhile, or of an older round, and is then ignored."""
    step = f"step {event.step_name!r}" if event.step_name else f"step {event.step}"
    error = f": {event.error.message}" if event.error and event.error.message else ""
    notice = RunEvent(kind="file_failed", run_id=run["id"], tenant_id=run["tenant_id"], round=event.round,
                      status=run["status"], message=f"{step}{error}"[:FILE_FAILED_MESSAGE_CHARS],
                      file_index=event.file_index, at=event.at)
    return outbox.row(names.run_event("file_failed"), notice.msg_id, notice.to_bytes(),
                      headers_for(notice.msg_id, run["tenant_id"], run["id"], run_trace_id(run["id"], run.get("trace_id"))))
