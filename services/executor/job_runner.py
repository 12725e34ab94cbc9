"""One delivered job message → its steps run → events published → ack, nak or term.

Acknowledgement follows the outcome, stated once here (publish the event first, then
ack: a crash in between redelivers a job whose result the coordinator already has, and it
ignores the repeat):
  succeeded → ack        failed (retries spent) → ack        errored (permanent) → term
  retry → nak(delay)     defer (breaker open) → nak(delay), not counted as an attempt
"""

from __future__ import annotations

import asyncio
import time

import orjson
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import ValidationError

from shared.bus import Outgoing, publish_many
from shared.errors import Classified
from shared.messages import ErrorInfo, FileEvent, FileSpec, Job
from shared.subjects import Names
from services.executor.outcome import Outcome
from services.executor.progress import Progress, ProgressStore
from services.executor.steps import StepRunner

log = structlog.get_logger(__name__)


def _error(c: Classified | None) -> ErrorInfo | None:
    return None if c is None else ErrorInfo.model_validate(c.as_dict())


class JobRunner:
    def __init__(self, js: JetStreamContext, names: Names, steps: StepRunner, progress: ProgressStore, ack_wait_s: float) -> None:
        self._js = js
        self._names = names
        self._steps = steps
        self._progress = progress
        self._heartbeat_every = max(0.5, ack_wait_s / 3)

    async def handle(self, msg: Msg) -> None:
        try:
            job = Job.model_validate_json(msg.data)
        except ValidationError as exc:
            await self._reject_unreadable(msg, exc)
            return
        delivered = msg.metadata.num_delivered if msg.reply else 1
        last_beat = 0.0

        async def heartbeat() -> None:  # for handlers: in-progress ack, at most once a second
            nonlocal last_beat
            now = time.monotonic()
            if now - last_beat >= 1.0:
                last_beat = now
                await msg.in_progress()

        beats = asyncio.create_task(self._keep_alive(msg))
        try:
            if job.mode == "batch":
                await self._run_batch(job, msg, delivered, heartbeat)
            else:
                await self._run_one(job, job.files[0], msg, delivered, heartbeat)
        finally:
            beats.cancel()

    async def _keep_alive(self, msg: Msg) -> None:
        # A step longer than the ack wait must not be redelivered while it is alive.
        while True:
            await asyncio.sleep(self._heartbeat_every)
            try:
                await msg.in_progress()
            except Exception:
                return

    async def _run_one(self, job: Job, file: FileSpec, msg: Msg, delivered: int, heartbeat) -> None:
        # First delivery: everything is in the message. Later ones: ask the progress store.
        progress = await self._progress.get(job.job_id, file.index) if delivered > 1 else Progress()
        attempt = progress.failures + 1
        outcome = await self._run_file(job, file, progress, attempt, heartbeat)
        if outcome.kind == "defer":
            progress.deferrals += 1
            await self._progress.put(job.job_id, file.index, progress)
            await msg.nak(delay=outcome.delay_ms / 1000)
            return
        if outcome.kind == "retry":
            progress.failures += 1
            await self._progress.put(job.job_id, file.index, progress)
        await self._publish(job, file.index, outcome, attempt)
        if outcome.kind == "retry":
            await msg.nak(delay=outcome.delay_ms / 1000)
        elif outcome.kind == "errored":
            await msg.term()
        else:
            await msg.ack()

    async def _run_batch(self, job: Job, msg: Msg, delivered: int, heartbeat) -> None:
        """A batch job carries every file: retries happen in-process (with the same backoff
        and heartbeats); a redelivered batch skips files it already reported."""
        for file in job.files:
            progress = await self._progress.get(job.job_id, file.index) if delivered > 1 else Progress()
            if progress.done:
                continue
            while True:
                attempt = progress.failures + 1
                outcome = await self._run_file(job, file, progress, attempt, heartbeat)
                if outcome.kind == "defer":
                    await asyncio.sleep(outcome.delay_ms / 1000)
                    continue
                await self._publish(job, file.index, outcome, attempt)
                if outcome.kind != "retry":
                    break
                progress.failures += 1
                await self._progress.put(job.job_id, file.index, progress)
                await asyncio.sleep(outcome.delay_ms / 1000)
            progress.done = True
            if delivered > 1 or len(job.files) > 1:
                await self._progress.put(job.job_id, file.index, progress)
        await msg.ack()

    async def _run_file(self, job: Job, file: FileSpec, progress: Progress, attempt: int, heartbeat) -> Outcome:
        start, previous = file.start_step, file.previous_output
        if progress.step is not None and progress.step + 1 > start:
            start, previous = progress.step + 1, progress.output

        async def on_checkpoint(step: int, output: dict) -> None:
            # Remember locally first (a redelivery resumes here), then tell the coordinator.
            progress.step, progress.output = step, output
            await self._progress.put(job.job_id, file.index, progress)
            await self._publish(job, file.index, Outcome("succeeded", step, output=output), attempt, kind="checkpoint")

        return await self._steps.run_file(job, file, attempt=attempt, start_step=start, previous_output=previous,
                                          heartbeat=heartbeat, on_checkpoint=on_checkpoint)

    async def _publish(self, job: Job, file_index: int, outcome: Outcome, attempt: int, kind: str | None = None) -> None:
        kind = kind or {"retry": "retrying"}.get(outcome.kind, outcome.kind)
        event = FileEvent(
            kind=kind, job_id=job.job_id, run_id=job.run_id, tenant_id=job.tenant_id, file_index=file_index,
            round=job.round, attempt=attempt, step=outcome.step, step_name=job.steps[outcome.step].name,
            error=_error(outcome.error), next_delay_ms=outcome.delay_ms if kind == "retrying" else None,
            output=outcome.output,
        )
        if kind == "retrying":
            log.info("job.retrying", run_id=job.run_id, file_index=file_index, attempt=attempt,
                     delay_ms=outcome.delay_ms, error=outcome.error.message if outcome.error else None)
        headers = {"Redrive-Tenant": job.tenant_id, "Redrive-Run": job.run_id}
        await publish_many(self._js, [Outgoing(self._names.file_event(kind), event.to_bytes(), event.msg_id, headers)])

    async def _reject_unreadable(self, msg: Msg, exc: ValidationError) -> None:
        """A job we cannot parse never runs; if it names its run and file, that file becomes
        ERROR with the cause, otherwise it is logged. Either way it is not redelivered."""
        try:
            raw = orjson.loads(msg.data)
            event = FileEvent(kind="errored", job_id=str(raw["job_id"]), run_id=str(raw["run_id"]),
                              tenant_id=str(raw["tenant_id"]), file_index=int(raw.get("file_index") or 0),
                              round=int(raw.get("round", 0)), attempt=1, step=int(raw.get("start_step", 0)),
                              error=ErrorInfo.model_validate({"class": "InvalidJob", "message": str(exc)[:500], "transient": False}))
            await publish_many(self._js, [Outgoing(self._names.file_event("errored"), event.to_bytes(), event.msg_id)])
        except Exception:
            log.error("job.unreadable", subject=msg.subject, error=str(exc)[:500])
        await msg.term()
