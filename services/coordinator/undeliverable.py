"""Jobs the broker can never take (bigger than its max payload): their files become ERROR
with the cause, applied like an executor's result, instead of staying in the outbox where
every pass would fail on them and hold back the jobs and events of every run behind.

Runs are refused up front when their jobs would not fit (create_run); this is for jobs
that grow later: a retry or recovery round carries the last checkpoint's output."""

from __future__ import annotations

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.bus import Outgoing
from shared.messages import ErrorInfo, FileEvent, Job
from shared.subjects import Names
from services.coordinator.results import apply_events

log = structlog.get_logger(__name__)


def too_large_message(size: int, max_payload: int) -> str:
    return (f"the job is {size} bytes and a message may carry at most {max_payload}; "
            "send large files by url, or fewer files per batch run")


async def report_undeliverable(conn: AsyncConnection, messages: list[Outgoing], max_payload: int, *,
                               names: Names) -> None:
    jobs_prefix = names.jobs_all.removesuffix(">")
    events: list[FileEvent] = []
    for message in messages:
        log.error("outbox.undeliverable", subject=message.subject, msg_id=message.msg_id, size=len(message.data),
                  max_payload=max_payload)
        if not message.subject.startswith(jobs_prefix):
            continue  # only jobs grow with their input; nothing else to tell anyone
        job = Job.model_validate_json(message.data)  # one of ours: per_file or batch
        error = ErrorInfo.model_validate({"class": "JobTooLarge", "transient": False,
                                          "message": too_large_message(len(message.data), max_payload)})
        for file in job.every_file:
            step = file.start_step
            # attempt 0: no executor ever tried it.
            events.append(FileEvent(kind="errored", job_id=job.job_id, run_id=job.run_id, tenant_id=job.tenant_id,
                                    file_index=file.index, round=job.round, attempt=0, step=step,
                                    step_name=job.steps[step].name if step < len(job.steps) else None, error=error))
    await apply_events(conn, names, events)
