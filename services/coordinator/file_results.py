"""What a batch of file events does to its files and runs, worked out in memory before
results.py stores it in one transaction. The rules (results.py's docstring) are applied
here: which events may apply at all, the first terminal result of a round wins,
checkpoints only move forward, a deferral changes no file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from shared.messages import FileEvent, job_id_for
from services.coordinator import timeline

log = structlog.get_logger(__name__)

TERMINAL_BY_KIND = {"succeeded": "SUCCEEDED", "failed": "FAILED", "errored": "ERROR"}


@dataclass(slots=True)
class FileState:  # fields in _LOAD_FILES's column order
    run_id: str
    idx: int
    name: str
    status: str
    round: int
    attempts: int
    cp: int | None
    cpo: str | None = None
    # Every step output this batch brings ({step: output}): one file's checkpoints and its
    # final result often arrive in the same batch, and each step's output is kept.
    outs: dict[str, Any] = field(default_factory=dict)
    output: str | None = None
    err: str | None = None
    fs: int | None = None
    changed: bool = False


@dataclass
class RunDelta:
    done: int = 0
    s: int = 0
    f: int = 0
    e: int = 0
    quiet_ms: int = 0  # the longest backoff a retry of this batch announced
    # A file succeeded or checkpointed a step: what ends a run's breaker_open flag. A retry or
    # a failure is not that: one that failed just before the breaker opened, recorded after
    # the run was flagged, cleared the flag for good (the deferral is told once per open
    # period), and the run's waiting jobs then held its tenant's window: no other run of it
    # started.
    advanced: bool = False
    succeeded_files: list[int] = field(default_factory=list)
    failed_files: list[int] = field(default_factory=list)


def json_text(value: Any) -> str | None:
    if value is None:
        return None
    dumped = orjson.dumps(value).decode()
    if "\\u0000" in dumped:
        # jsonb refuses NUL, and an error text or output may carry one (a handler quoting
        # binary data): drop the NULs rather than the file's result.
        dumped = orjson.dumps(_without_nul(value)).decode()
    return dumped


def _error_of(event: FileEvent) -> dict | None:
    """The event's error for the file row and the timeline, NUL-free (see _json)."""
    if event.error is None:
        return None
    return {k: v.replace("\x00", "") if isinstance(v, str) else v for k, v in event.error.as_dict().items()}


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def may_apply(event: FileEvent, runs: dict[str, dict], files: dict[tuple[str, int], FileState]) -> bool:
    """Whether ``event`` is about a file of a run we have, in that file's current round,
    from that run's tenant, under the job id of that run, file and round."""
    run = runs.get(event.run_id)
    f = files.get((event.run_id, event.file_index))
    if run is None or f is None:
        log.warning("results.unknown_file", run_id=event.run_id[:100], file_index=event.file_index)
        return False
    if event.tenant_id != run["tenant_id"]:
        log.error("results.tenant_mismatch", msg_id=event.msg_id[:300], run_id=event.run_id, claimed=event.tenant_id)
        return False
    if (event.job_id != job_id_for(event.run_id, event.file_index, event.round)  # per_file (most)
            and event.job_id != job_id_for(event.run_id, None, event.round)):  # batch
        log.error("results.foreign_job_id", msg_id=event.msg_id[:300], run_id=event.run_id, job_id=event.job_id)
        return False
    return f.round == event.round  # another round's event is late: ignored


@dataclass
class Folded:
    deltas: dict[str, RunDelta]  # run → what its counters gain (and that it progressed)
    waiting: dict[str, int]  # run → the longest deferral of a file still waiting for its breaker
    log_entries: list[dict]  # the timeline's entries, in order
    # The events that made a file FAILED: the notifier tells users of these (not of the
    # executor's event, which may be of a file cancelled meanwhile, or of an older round).
    failed: list[FileEvent] = field(default_factory=list)


def fold(events: list[FileEvent], runs: dict[str, dict], files: dict[tuple[str, int], FileState]) -> Folded:
    """Apply ``events`` (new in the inbox, each may_apply) to ``files`` in memory: each file
    changed is marked ``changed``; what the runs gain is returned."""
    deltas: dict[str, RunDelta] = {}
    waiting: dict[str, int] = {}  # run → the longest deferral announced
    deferred_files: dict[str, list[FileState]] = {}  # run → the files those deferrals were of
    # An entry's ``at`` is when it was recorded here; what the executor saw carries its own
    # time too (``occurred_at``), which is what a reader wants when the results fell behind.
    log_entries: list[dict] = []
    failed: list[FileEvent] = []
    for event in events:
        f = files[(event.run_id, event.file_index)]
        if f.status != "PENDING":
            continue
        tenant_id = runs[event.run_id]["tenant_id"]
        if event.kind == "deferred":  # not progress: the run waits for an open breaker
            waiting[event.run_id] = max(waiting.get(event.run_id, 0), event.next_delay_ms or 0)
            deferred_files.setdefault(event.run_id, []).append(f)
            log_entries.append(timeline.entry(
                event.run_id, tenant_id, "file_deferred", "system:executor", event.file_index, step=event.step,
                dependency=event.dependency, next_delay_ms=event.next_delay_ms, occurred_at=event.at))
            continue
        f.attempts = max(f.attempts, event.attempt)
        f.changed = True
        delta = deltas.setdefault(event.run_id, RunDelta())  # also marks the run as progressing
        if event.kind == "checkpoint":
            delta.advanced = True
            if f.cp is None or event.step > f.cp:
                f.cp, f.cpo = event.step, json_text(event.output or {})
                f.outs[str(event.step)] = event.output or {}
            continue
        if event.kind == "retrying":
            delta.quiet_ms = max(delta.quiet_ms, event.next_delay_ms or 0)
            f.err = json_text(_error_of(event))
            log_entries.append(timeline.entry(
                event.run_id, tenant_id, "file_retrying", "system:executor", event.file_index,
                attempt=event.attempt, step=event.step, next_delay_ms=event.next_delay_ms,
                error=_error_of(event), occurred_at=event.at))
            continue
        f.status = TERMINAL_BY_KIND[event.kind]
        delta.done += 1
        delta.advanced = delta.advanced or event.kind == "succeeded"
        if event.kind == "succeeded":
            delta.s += 1
            delta.succeeded_files.append(f.idx)
            f.cp, f.cpo, f.output = event.step, json_text(event.output or {}), json_text(event.output or {})
            f.outs[str(event.step)] = event.output or {}
        else:
            # The step that failed comes after any the file checkpointed: a poison job's event
            # names the step its job started at (the coordinator fails it, knowing no more),
            # and the step that killed the executor is the one after the last checkpoint.
            step = (max(event.step, f.cp + 1) if f.cp is not None and event.error is not None
                    and event.error.error_class == "PoisonJob" else event.step)
            f.err, f.fs = json_text(_error_of(event)), step
            if event.kind == "failed":
                delta.f += 1
                delta.failed_files.append(f.idx)
                failed.append(event)
            else:
                delta.e += 1
            log_entries.append(timeline.entry(
                event.run_id, tenant_id, f"file_{event.kind}", "system:executor", event.file_index,
                attempt=event.attempt, step=step, error=_error_of(event), occurred_at=event.at))

    # Successes go to the timeline one entry per run and batch, not per file: every state
    # change is logged, without a row per file on the hot path.
    for run_id, delta in deltas.items():
        if delta.succeeded_files:
            log_entries.append(timeline.entry(run_id, runs[run_id]["tenant_id"], "files_succeeded", "system:executor",
                                              count=len(delta.succeeded_files), files=sorted(delta.succeeded_files)))
    # A deferral whose file finished in this same batch waits for nothing: flagged, the run
    # would publish no more of its jobs, and with none out nothing would clear the flag.
    waiting = {r: q for r, q in waiting.items() if any(f.status == "PENDING" for f in deferred_files[r])}
    return Folded(deltas, waiting, log_entries, failed)
