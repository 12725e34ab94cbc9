"""A batch job's delivery: every file of its round, one after another, retries and breaker
deferrals waited out in-process (with the same backoff and heartbeats), files a delivery
before it reported skipped.

Each delivery claims the batch (one write per batch job); a delivery before it that still
runs (its process froze past the ack wait, then thawed) sees the claim before its next
file, at most a second late, and stops: the files it has not reached are the later one's.
One that starts after a later delivery claimed it runs nothing. A copy of the job (re-
published by a Recover or a restore, another message) takes the batch over the same way.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from nats.aio.msg import Msg

from shared.messages import Job
from services.executor.deferrals import DeferralNotices
from services.executor.deliveries import batch_taken, delivery_name, newer_copy
from services.executor.file_runner import FileRunner
from services.executor.outcome import Outcome
from services.executor.progress import Progress, ProgressStore
from services.executor.seen import Message, SeenDeliveries

log = structlog.get_logger(__name__)

# How often a batch job's delivery looks whether a later delivery has taken the batch over.
BATCH_CLAIM_CHECK_S = 1.0


class BatchRunner:
    def __init__(self, files: FileRunner, progress: ProgressStore, deferrals: DeferralNotices,
                 seen: SeenDeliveries) -> None:
        self._files = files
        self._progress = progress
        self._deferrals = deferrals
        self._seen = seen

    async def run(self, job: Job, msg: Msg, delivered: int, message: Message | None, heartbeat) -> None:
        """Run the batch's files from where the deliveries before this one left them, and
        ack: unless another delivery has taken the batch (see the module's docstring)."""
        me = delivery_name(message, delivered)
        try:
            claimed = await self._progress.claim_batch(job.job_id, me, batch_taken)
        except Exception as exc:  # the progress bucket away: run unclaimed, as before claims
            log.warning("job.batch_unclaimed", run_id=job.run_id, error=repr(exc)[:300])
            claimed = True
        if not claimed:
            await self._taken(job, msg, message, delivered, me, await self._claimant(job.job_id))
            return
        # A copy (re-published by a recovery or a restore, beside this job's first message)
        # reads what the deliveries before it did, as a redelivery does.
        copy = bool(msg.headers) and msg.headers.get("Nats-Msg-Id", job.job_id) != job.job_id
        checked = time.monotonic()
        for file in job.every_file:
            if time.monotonic() - checked >= BATCH_CLAIM_CHECK_S:
                checked = time.monotonic()
                claimant = await self._claimant(job.job_id)
                if batch_taken(claimant, me):
                    await self._taken(job, msg, message, delivered, me, claimant, file.index)
                    return
            look = delivered > 1 or copy or len(job.steps) - file.start_step > 1  # see JobRunner._run_one
            progress = await self._progress.get(job.job_id, file.index) if look else Progress()
            if progress.done:
                continue
            while True:
                # Its run may have been stopped meanwhile (a batch waits out its retries and
                # deferrals here, in-process): then nothing more runs.
                outcome = (Outcome("stopped", file.start_step) if self._files.stopped(job) else
                           await self._files.run(job, file, progress, progress.attempt, heartbeat,
                                                 delivery_name(message, delivered)))
                attempt = progress.attempt  # after the checkpoints: the attempt of the outcome's step
                if outcome.kind == "overtaken":  # another delivery of this message has the job
                    return
                if outcome.kind == "superseded" and await self._claimant(job.job_id) == me:
                    # This is the newer copy, and the older delivery got further in this file:
                    # it finishes the file, then steps aside (it sees our claim before its
                    # next one); the files after it are ours. (Both stepping aside left them.)
                    outcome = None
                    break
                if outcome.kind in ("stopped", "superseded"):
                    self._seen.saw(message, delivered, finished=True)
                    await msg.ack()
                    return
                if outcome.kind == "defer":
                    await self._deferrals.tell(job, file.index, outcome, attempt)
                    await asyncio.sleep(outcome.delay_ms / 1000)
                    continue
                await self._files.publish(job, file.index, outcome, attempt)
                if outcome.kind != "retry":
                    break
                progress.failures += 1
                await self._progress.put(job.job_id, file.index, progress)
                await asyncio.sleep(outcome.delay_ms / 1000)
            if outcome is None:  # the older delivery's to finish: not done by us
                continue
            progress.done = True
            if delivered > 1 or len(job.every_file) > 1:
                await self._progress.put(job.job_id, file.index, progress)
        self._seen.saw(message, delivered, finished=True)
        await msg.ack()

    async def _taken(self, job: Job, msg: Msg, message: Message | None, delivered: int, me: str,
                     claimant: str | None, file_index: int | None = None) -> None:
        """Another delivery runs this batch now. A later delivery of this message acks it; a
        newer copy of the job carries it from here, so this message is acked now (left, it
        would come back until max deliver and fail the batch's files as poison)."""
        log.info("job.stale_delivery", run_id=job.run_id, file_index=file_index, delivered=delivered,
                 copy=newer_copy(claimant, me))
        if newer_copy(claimant, me):
            self._seen.saw(message, delivered, finished=True)
            await msg.ack()

    async def _claimant(self, job_id: str) -> str | None:
        try:
            return await self._progress.batch_claimed_by(job_id)
        except Exception:  # the progress bucket away: go on, and look again in a second
            return None
