"""One delivered job message → its steps run → events published → ack, nak or term.

Acknowledgement follows the outcome, stated once here (publish the event first, then
ack: a crash in between redelivers a job whose result the coordinator already has, and it
ignores the repeat):
  succeeded → ack        failed (retries spent) → ack        errored (permanent) → term
  retry → nak(delay)     defer (breaker open) → nak(delay), not counted as an attempt
  stopped (its run stopped while it ran) → ack, at the next checkpoint
  overtaken (another delivery checkpointed as far first) → nothing: the job is that one's
  superseded (a copy of the job, another message, did) → ack
Near the consumer's max deliver, retry and defer re-publish the job instead of nak-ing it
(``_come_back_later``), so only deliveries we cannot explain (crashes) reach that limit.

Suspects (redelivered for no reason we know, too often): deliveries.py. A file's steps and
its events: file_runner.py. A batch job's delivery: batch_runner.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import ValidationError

from shared import tracing
from shared.bus import Outgoing, publish_many
from shared.messages import FileSpec, Job
from shared.subjects import Names
from services.executor.batch_runner import BatchRunner
from services.executor.deferrals import DeferralNotices
from services.executor.deliveries import delivery_name, later_delivery, same_message, suspect_after
from services.executor.file_events import headers as event_headers
from services.executor.file_runner import FileRunner
from services.executor.isolation import IsolationGate
from services.executor.keepalive import KeepAlive
from services.executor.outcome import Outcome, StepStopped
from services.executor.progress import Progress, ProgressStore
from services.executor.run_stops import RunStops
from services.executor.seen import Message, SeenDeliveries, delivery_and_message
from services.executor import unreadable
from services.executor.steps import StepRunner

log = structlog.get_logger(__name__)

REFRESHED_HEADER = "Redrive-Refreshed"
# A re-published copy due within this long is held here until due, not deferred again.
EARLY_SLEEP_S = 0.05


def _no_verdict(suspect: bool) -> None:
    pass


class JobRunner:
    def __init__(self, js: JetStreamContext, names: Names, steps: StepRunner, progress: ProgressStore,
                 keepalive: KeepAlive, gate: IsolationGate | None = None, max_deliver: int = 20,
                 stops: RunStops | None = None) -> None:
        self._js = js
        self._names = names
        self._progress = progress
        self._keepalive = keepalive
        self._gate = gate or IsolationGate()
        self._max_deliver = max_deliver
        self._suspect_after = suspect_after(max_deliver)
        self._deferrals = DeferralNotices(js, names)
        self._seen = SeenDeliveries()
        self.files = FileRunner(js, names, steps, progress, stops)
        self._batches = BatchRunner(self.files, progress, self._deferrals, self._seen)

    async def handle(self, msg: Msg, verdict: Callable[[bool], None] | None = None) -> bool:
        """Run the job; True if it was a suspect (see the module's docstring). ``verdict`` is
        told whether it is one as soon as that is known, before the job runs (not at all if
        the job does not run: rejected, or acked again)."""
        verdict = verdict or _no_verdict
        # This task works for the job's run: its logs and the events it publishes carry
        # the run's trace (from the job's traceparent; shared/tracing.py).
        trace_id = tracing.trace_id_of(msg.headers.get(tracing.HEADER)) if msg.headers else None
        try:
            job = Job.model_validate_json(msg.data)
        except ValidationError as exc:
            tracing.bind(trace_id)
            await self._reject_unreadable(msg, exc)
            return False
        tracing.bind(trace_id or tracing.run_trace_id(job.run_id))
        if msg.subject != self._names.job(job.tenant_id):
            # Job subjects are per tenant: a job of tenant A's run on tenant B's subject is
            # broken or forged. Running it would count on A's run; refusing it touches nothing.
            log.error("job.wrong_subject", subject=msg.subject[:200], tenant_id=job.tenant_id, run_id=job.run_id)
            await msg.term()
            return False
        if self._stopped(job):
            await msg.ack()  # the run was stopped (fail_fast, cancel) after this job was queued
            return False
        delivered, message = delivery_and_message(msg)
        seen_before, finished_before = self._seen.previous(message, delivered)
        if finished_before:
            await self._ack_again(msg, job, message, delivered)
            return False
        last_beat = 0.0

        async def heartbeat() -> None:  # for handlers: in-progress ack, at most once a second
            nonlocal last_beat
            if self._stopped(job):  # cancelled or stopped meanwhile: a long step ends here
                raise StepStopped()
            now = time.monotonic()
            if now - last_beat >= 1.0:
                last_beat = now
                await msg.in_progress()

        self._keepalive.add(msg, job.run_id)
        try:
            if job.mode == "batch":
                # Its retries happen in-process: every redelivery of a batch job is unexplained.
                suspect = delivered - 1 >= self._suspect_after and not seen_before
                verdict(suspect)
                async with (self._gate.exclusive() if suspect else self._gate.shared()):
                    await self._batches.run(job, msg, delivered, message, heartbeat)
                return suspect
            return await self._run_one(job, job.every_file[0], msg, delivered, message, seen_before, heartbeat,
                                       verdict)
        finally:
            self._keepalive.remove(msg)
            self._seen.saw(message, delivered)  # we are alive: whatever became of it, it did not kill us

    async def _ack_again(self, msg: Msg, job: Job, message: Message | None, delivered: int) -> None:
        """The delivery before this one finished here: its result was stored (PubAck) before
        its ack, which never reached the server (a NATS node failed over, a connection
        dropped) or came too late. Running it again would only repeat its work."""
        log.info("job.ack_lost", run_id=job.run_id, job_id=job.job_id[:200], delivered=delivered)
        self._seen.saw(message, delivered, finished=True)
        await msg.ack()

    async def _run_one(self, job: Job, file: FileSpec, msg: Msg, delivered: int, message: Message | None,
                       seen_before: bool, heartbeat, verdict: Callable[[bool], None]) -> bool:
        # A single-step job on its first delivery needs nothing but the message. Anything
        # else asks the progress store: a redelivery, a re-published copy, and any job
        # with steps after its first, because a broker restart can hand a job out again
        # as if for the first time, and checkpointed steps must never run again.
        refreshed = bool(msg.headers and msg.headers.get(REFRESHED_HEADER))
        # A copy (a Recover's or a restore's, beside the message a dead executor held): the
        # original comes back after the ack wait and must find that the copy finished.
        copy = bool(msg.headers) and msg.headers.get("Nats-Msg-Id", job.job_id) != job.job_id
        multi_step = len(job.steps) - file.start_step > 1
        look = delivered > 1 or refreshed or copy or multi_step
        progress = await self._progress.get(job.job_id, file.index) if look else Progress()
        if look:
            me = delivery_name(message, delivered)
            if progress.finished_by and same_message(progress.finished_by, me):
                # A delivery of this message finished the job (its result is stored): its ack
                # was lost, or this delivery waited in a frozen process meanwhile.
                await self._ack_again(msg, job, message, delivered)
                return False
            if progress.finished_by and not copy:
                # A copy of this job finished it (a Recover's, while this original was held
                # by a dead executor). Run, it ran the file's last step again after the file
                # had SUCCEEDED. A copy is never skipped so: it may be the sweep's answer to
                # a result that was lost after the job finished, and skipped, the file would
                # stay PENDING for good.
                log.info("job.finished_by_another_message", run_id=job.run_id, file_index=file.index,
                         delivered=delivered)
                self._seen.saw(message, delivered, finished=True)
                await msg.ack()
                return False
            if later_delivery(progress.writer, me):
                # The server gave the message out again while this delivery waited (a frozen
                # or stalled process), and that delivery got further: the job is its now.
                log.info("job.stale_delivery", run_id=job.run_id, file_index=file.index, delivered=delivered)
                return False
        attempt = progress.attempt
        # In flight at SUSPECT_AFTER deaths: redelivered that often for no reason we know,
        # and not after a delivery this process lived through.
        suspect = delivered - 1 - progress.explained >= self._suspect_after and not seen_before
        verdict(suspect)
        wait_s = (progress.not_before or 0) - time.time()
        if wait_s > 0:  # a re-published copy, early: wait out the backoff it was given
            if wait_s <= EARLY_SLEEP_S:  # nearly due: cheaper to wait here than to go round again
                await asyncio.sleep(wait_s)
                wait_s = 0.0
        if wait_s > 0:
            outcome = Outcome("defer", file.start_step, delay_ms=max(1, int(wait_s * 1000)))
        else:
            async with (self._gate.exclusive() if suspect else self._gate.shared()) as waited:
                if (suspect or waited) and self._seen.previous(message, delivered)[1]:
                    # Redelivered while its previous delivery still ran here (an ack wait
                    # passed without a keepalive), which has finished meanwhile.
                    await self._ack_again(msg, job, message, delivered)
                    return False
                if (suspect or waited) and look:
                    # We waited for other jobs (maybe for this job's other delivery): read
                    # the progress again, or we would redo steps it checkpointed meanwhile.
                    progress = await self._progress.get(job.job_id, file.index)
                    attempt = progress.attempt
                outcome = await self.files.run(job, file, progress, attempt, heartbeat,
                                               delivery_name(message, delivered))
                attempt = progress.attempt  # after its checkpoints, if any: that of the outcome's step
        if outcome.kind == "overtaken":  # the job is another delivery's now, and so is its ack
            return suspect
        if outcome.kind in ("stopped", "superseded"):  # as a stopped run's job that had not started
            self._seen.saw(message, delivered, finished=True)
            await msg.ack()
            return suspect
        if outcome.kind in ("defer", "retry"):
            if outcome.kind == "defer":
                progress.deferrals += 1
                await self._deferrals.tell(job, file.index, outcome, attempt)
            else:
                progress.failures += 1
                await self.files.publish(job, file.index, outcome, attempt)
            await self._come_back_later(job, file, msg, delivered, progress, outcome.delay_ms / 1000)
            return suspect
        await self.files.publish(job, file.index, outcome, attempt)
        self._seen.saw(message, delivered, finished=True)
        if look:  # its progress was read anyway: say it finished, for any other delivery of it
            progress.finished_by = delivery_name(message, delivered)
            try:
                await self._progress.put(job.job_id, file.index, progress)
            except Exception as exc:  # only a safeguard: the coordinator drops a repeated result
                log.warning("job.finish_unrecorded", run_id=job.run_id, file_index=file.index, error=repr(exc))
        if outcome.kind == "errored":
            await msg.term()
        else:
            await msg.ack()
        return suspect

    async def _come_back_later(self, job: Job, file: FileSpec, msg: Msg, delivered: int, progress: Progress,
                               delay_s: float) -> None:
        """nak with a delay; but a message near the consumer's max deliver is re-published
        instead (and the original acked), because retries and breaker deferrals are ours
        and must not make a healthy job look like one that kills its executor."""
        if delivered < self._max_deliver - 1:
            await self._progress.put(job.job_id, file.index, progress)
            await msg.nak(delay=delay_s)
            return
        progress.offset = progress.failures + progress.deferrals
        progress.not_before = time.time() + delay_s
        await self._progress.put(job.job_id, file.index, progress)
        headers = {REFRESHED_HEADER: "1", **event_headers(job.tenant_id, job.run_id)}
        await publish_many(self._js, [Outgoing(msg.subject, msg.data, f"{job.job_id}:refresh:{progress.offset}", headers)])
        await msg.ack()

    def _stopped(self, job: Job) -> bool:
        return self.files.stopped(job)

    async def _reject_unreadable(self, msg: Msg, exc: ValidationError) -> None:
        """A job we cannot parse never runs: the files it names become ERROR with the cause
        (unreadable.py), and it is terminated: no redelivery can make it readable."""
        cause, events = unreadable.error_events(msg.data, exc)
        if events:
            headers = event_headers(events[0].tenant_id, events[0].run_id)
            await publish_many(self._js, [Outgoing(self._names.file_event("errored"), e.to_bytes(), e.msg_id, headers)
                                          for e in events])
        log.error("job.unreadable", subject=msg.subject, files=len(events), error=cause)
        await msg.term()
