"""Run events go out through the outbox, in the transaction that changed the run, in the run's trace."""

from __future__ import annotations

from typing import Any, Mapping

from shared.bus import headers_for
from shared.tracing import run_trace_id
from shared.messages import RunEvent
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
