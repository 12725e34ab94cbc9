"""Which events become notifications, and their words (pure functions of the event)."""

from __future__ import annotations

from shared.messages import RunEvent

FILE_FAILED_KIND = "file_failed"
FILE_FAILED = "Step failed after multiple attempts"

# Run event kinds that notify; ``started`` and ``retrying`` do not.
RUN_KINDS = frozenset({
    "completed", "completed_with_errors", "failed", "cancelled", "recovery_started", "recovered", "recovery_failed",
})

_OUTCOMES = ("succeeded", "failed", "errored", "skipped", "cancelled", "pending")


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def summary(counts: dict[str, int]) -> str:
    """``"6 succeeded, 1 failed of 7 files"``: the outcomes that happened, then the total."""
    parts = [f"{counts[k]} {k}" for k in _OUTCOMES if counts.get(k)]
    total = counts.get("total")
    if total is None:
        return ", ".join(parts) or "no files"
    return f"{', '.join(parts) or 'nothing done'} of {_files(total)}"


MAX_TEXT_CHARS = 2000  # a notification is a line to read, also in every webhook body


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS - 1] + "…"


def file_failed_text(event: RunEvent) -> str:
    """From a ``run.file_failed`` event, whose message names the step and its error."""
    detail = f", {event.message}" if event.message else ""
    return _bounded(f"{FILE_FAILED} (file {event.file_index}{detail})")


def run_kind(kind: str) -> str:
    return f"run_{kind}"


def run_text(kind: str, event: RunEvent) -> str:
    return _bounded(_run_text(kind, event))


def _run_text(kind: str, event: RunEvent) -> str:
    counts = event.counts or {}
    note = event.message
    if kind == "completed":
        total, succeeded = counts.get("total"), counts.get("succeeded")
        if total is not None and succeeded == total:
            return f"Run finished: all {_files(total)} succeeded"
        return f"Run finished: {summary(counts)}"
    if kind == "completed_with_errors":
        return f"Run finished with errors: {summary(counts)}"
    if kind == "failed":
        return f"Run failed: {note} ({summary(counts)})" if note else f"Run failed: {summary(counts)}"
    if kind == "cancelled":
        return f"Run cancelled: {summary(counts)}"
    if kind == "recovery_started":
        return "Recovery started" + (f" ({note})" if note and note != "Recovery started" else "")
    if kind == "recovered":
        return f"Recovery succeeded: {summary(counts)}"
    if kind == "recovery_failed":
        return f"Recovery failed: {note or summary(counts)}"
    raise ValueError(f"run event {kind!r} does not notify")
