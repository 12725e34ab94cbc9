"""Which events become notifications, and their words."""

from __future__ import annotations

FILE_FAILED = "Step failed after multiple attempts"

RUN_TEXTS = {
    "completed": "Run finished: all files succeeded",
    "completed_with_errors": "Run finished with errors",
    "failed": "Run failed",
    "cancelled": "Run cancelled",
    "recovery_started": "Recovery started",
    "recovered": "Recovery succeeded",
    "recovery_failed": "Recovery failed",
}


def file_failed_text(event: dict) -> str:
    err = (event.get("error") or {}).get("message", "")
    return f"{FILE_FAILED} (file {event['file_index']}, step {event.get('step_name') or event.get('step')}: {err})"


def run_text(kind: str, event: dict) -> str | None:
    base = RUN_TEXTS.get(kind)
    if base is None:
        return None
    c = event.get("counts") or {}
    if kind in ("completed", "completed_with_errors", "failed"):
        return (f"{base} ({c.get('succeeded', 0)} succeeded, {c.get('failed', 0)} failed, "
                f"{c.get('errored', 0)} errors, {c.get('pending', 0)} pending of {c.get('total', 0)})")
    return base + (f": {event['message']}" if event.get("message") and kind == "recovery_failed" else "")
