"""Poison jobs: JetStream gave up redelivering a job (max deliver reached, the executor
died on every delivery). The job stays in the work-queue stream; we read it, publish a
``failed`` file event for each of its files (so the normal results path and the notifier
see it), then delete the message.

The advisory is a core NATS message, which nobody would get while every coordinator is
down or restarting; the advisories stream keeps it (shared/bus.py), and a durable consumer
hands it to us here. Lost, it would leave its run RUNNING for good, and its tenant's
stuck runs unrecovered (a job message in the stream counts as alive: recovery.py).
"""

from __future__ import annotations

import orjson
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import tracing
from shared.bus import Outgoing, headers_for, publish_many
from shared.db import transaction
from shared.messages import ErrorInfo, FileEvent, Job

log = structlog.get_logger(__name__)

POISON_MESSAGE = "the executor died on every delivery of this job (max deliveries reached)"
# An advisory we could not deal with (NATS busy or failing over) comes back after this.
RETRY_DELAY_S = 2.0


_PENDING = text(
    "SELECT idx, checkpoint_step FROM coordinator.files WHERE run_id = :r AND round = :round "
    "AND idx = ANY(CAST(:idxs AS int[])) AND status = 'PENDING'"
)


async def _failed_steps(engine: AsyncEngine | None, job: Job) -> dict[int, int]:
    """{file index: the step that killed the executor} for the job's files still PENDING in
    its round: a batch job's files done before it died are not failed (nor told so), and
    the step is the one after the file's last checkpoint (the job names where it started)."""
    steps = {f.index: f.start_step for f in job.every_file}
    if engine is None:
        return steps
    async with transaction(engine) as conn:
        rows = (await conn.execute(_PENDING, {"r": job.run_id, "round": job.round, "idxs": sorted(steps)})).all()
    return {idx: max(steps[idx], min(checkpoint + 1, len(job.steps) - 1)) if checkpoint is not None else steps[idx]
            for idx, checkpoint in rows}


def make_advisory_handler(js: JetStreamContext, names, engine: AsyncEngine | None = None):
    """A batch handler for the advisories consumer (shared/pull_loop.py)."""

    async def fail_poison_job(advisory: dict) -> None:
        seq = int(advisory["stream_seq"])
        deliveries = int(advisory.get("deliveries", 0))
        # The subject is open to any client of the server: believe only an advisory about
        # our consumer at its max deliver (else a live job would be failed and deleted).
        max_deliver = (await js.consumer_info(names.jobs_stream, names.executor_consumer)).config.max_deliver
        if advisory.get("stream") != names.jobs_stream or advisory.get("consumer") != names.executor_consumer \
                or deliveries < max_deliver:
            log.warning("advisory.not_believed", stream_seq=seq, deliveries=deliveries, max_deliver=max_deliver)
            return
        try:
            raw = await js.get_msg(names.jobs_stream, seq)
        except NotFoundError:  # dealt with already (this advisory came again), or purged
            log.info("advisory.job_gone", stream_seq=seq)
            return
        job = Job.model_validate_json(raw.data)
        error = ErrorInfo.model_validate({"class": "PoisonJob", "message": POISON_MESSAGE, "transient": True})
        steps = await _failed_steps(engine, job)
        events = [
            FileEvent(kind="failed", job_id=job.job_id, run_id=job.run_id, tenant_id=job.tenant_id, file_index=f.index,
                      round=job.round, attempt=deliveries, step=steps[f.index],
                      step_name=job.steps[steps[f.index]].name if steps[f.index] < len(job.steps) else None,
                      error=error)
            for f in job.every_file if f.index in steps
        ]
        trace_id = (tracing.trace_id_of((raw.headers or {}).get(tracing.HEADER))
                    or tracing.run_trace_id(job.run_id))
        # Published before the job is deleted, with ids of their own: done twice (a crash in
        # between), the second copy is a duplicate JetStream or the inbox drops.
        await publish_many(js, [Outgoing(names.file_event("failed"), e.to_bytes(), msg_id,
                                         headers_for(msg_id, job.tenant_id, job.run_id, trace_id))
                                for e in events for msg_id in [f"{e.job_id}:{e.file_index}:poison"]])
        try:
            await js.delete_msg(names.jobs_stream, seq)
        except NotFoundError:  # already gone: fine
            pass
        log.warning("job.poison", job_id=job.job_id, deliveries=deliveries)

    async def handle(msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                advisory = orjson.loads(msg.data)
                if not isinstance(advisory, dict):
                    raise ValueError("an advisory is a JSON object")
                await fail_poison_job(advisory)
            except (ValueError, KeyError, TypeError) as exc:  # garbled or forged, or an unreadable job: never better
                log.warning("advisory.unreadable", error=repr(exc)[:300])
            except Exception as exc:  # NATS away or failing over: try again shortly
                log.warning("advisory.failed", error=repr(exc)[:300])
                await msg.nak(delay=RETRY_DELAY_S)
                continue
            await msg.ack()

    return handle
