"""One file's steps, from where its progress left off, each checkpoint recorded before it is
told; and the file events that say what became of it. Used by both job paths: a per_file
job's (job_runner.py) and a batch job's (batch_runner.py)."""

from __future__ import annotations

import structlog
from nats.js import JetStreamContext

from shared.bus import Outgoing, publish_many
from shared.messages import FileSpec, Job
from shared.subjects import Names
from services.executor.deliveries import same_message
from services.executor.file_events import file_event_body, headers as event_headers
from services.executor.outcome import Outcome
from services.executor.progress import Progress, ProgressStore
from services.executor.run_stops import RunStops
from services.executor.steps import StepRunner

log = structlog.get_logger(__name__)


class FileRunner:
    def __init__(self, js: JetStreamContext, names: Names, steps: StepRunner, progress: ProgressStore,
                 stops: RunStops | None = None) -> None:
        self._js = js
        self._names = names
        self._steps = steps
        self._progress = progress
        self._stops = stops

    def stopped(self, job: Job) -> bool:
        """Its run was stopped (fail_fast, cancel) at or after the job's generation."""
        return self._stops is not None and self._stops.stopped(job.run_id, job.generation)

    async def run(self, job: Job, file: FileSpec, progress: Progress, attempt: int, heartbeat,
                  writer: str) -> Outcome:
        """Run ``file``'s steps after its last checkpoint in ``progress`` (``writer`` names
        this delivery in the progress store). Also "overtaken" or "superseded" when another
        delivery checkpointed as far first, "stopped" when the run stopped meanwhile."""
        start, previous = file.start_step, file.previous_output
        if progress.step is not None and progress.step + 1 > start:
            start, previous = progress.step + 1, progress.output

        async def on_checkpoint(step: int, output: dict) -> str | None:
            # Remember locally first (a redelivery resumes here), then tell the coordinator.
            # The step's attempt is told with it; the next step starts a fresh retry budget
            # (as StepRunner does for a step it goes on to in this same delivery).
            done_attempt = progress.attempt
            progress.step, progress.output, progress.failures_before_step = step, output, progress.failures
            # Checked at every checkpoint, not only at the job's start: a Continue or Recover
            # of a run stopped meanwhile would otherwise run this file's next steps twice. A
            # stopped delivery still records its step (a Recover resumes after it), but
            # nameless: it must not make the copy a Recover started look overtaken.
            stopped = self.stopped(job)
            progress.writer = None if stopped else writer
            winner = await self._progress.put(job.job_id, file.index, progress, unless_overtaken=not stopped)
            if winner is not None:
                # Another delivery got this far first (this executor froze, or its ack wait
                # passed unnoticed, and the job went elsewhere): going on would run its steps
                # twice. Another delivery of this message will ack it; a copy's makes ours moot.
                kind = "overtaken" if same_message(winner, writer) else "superseded"
                log.info(f"job.{kind}", run_id=job.run_id, file_index=file.index, step=step)
                return kind
            await self.publish(job, file.index, Outcome("succeeded", step, output=output), done_attempt,
                               kind="checkpoint")
            if stopped:
                log.info("job.stopped_midway", run_id=job.run_id, file_index=file.index, step=step)
                return "stopped"
            return None

        return await self._steps.run_file(job, file, attempt=attempt, start_step=start, previous_output=previous,
                                          heartbeat=heartbeat, on_checkpoint=on_checkpoint)

    async def publish(self, job: Job, file_index: int, outcome: Outcome, attempt: int, kind: str | None = None) -> None:
        """The file event for ``outcome`` (``kind``: the event's, if not the outcome's own)."""
        kind = kind or {"retry": "retrying"}.get(outcome.kind, outcome.kind)
        if kind == "retrying":
            log.info("job.retrying", run_id=job.run_id, file_index=file_index, attempt=attempt,
                     delay_ms=outcome.delay_ms, error=outcome.error.message if outcome.error else None)
        msg_id, body = file_event_body(job, file_index, outcome, attempt, kind)
        headers = event_headers(job.tenant_id, job.run_id)
        await publish_many(self._js, [Outgoing(self._names.file_event(kind), body, msg_id, headers)])
