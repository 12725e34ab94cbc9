"""Poison jobs: JetStream gave up redelivering a job (max deliver reached, the executor
died on every delivery). The job stays in the work-queue stream; we read it, publish a
``failed`` file event for each of its files (so the normal results path and the notifier
see it), then delete the message."""

from __future__ import annotations

import orjson
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared import tracing
from shared.bus import Outgoing, headers_for, publish_many
from shared.messages import ErrorInfo, FileEvent, Job

log = structlog.get_logger(__name__)

POISON_MESSAGE = "the executor died on every delivery of this job (max deliveries reached)"


def make_advisory_handler(js: JetStreamContext, names):
    async def handle(msg: Msg) -> None:
        try:
            advisory = orjson.loads(msg.data)
            seq = int(advisory["stream_seq"])
            deliveries = int(advisory.get("deliveries", 0))
            # The subject is open to any client of the server: believe only an advisory about
            # our consumer at its max deliver (else a live job would be failed and deleted).
            max_deliver = (await js.consumer_info(names.jobs_stream, names.executor_consumer)).config.max_deliver
            if advisory.get("stream") != names.jobs_stream or advisory.get("consumer") != names.executor_consumer \
                    or deliveries < max_deliver:
                log.warning("advisory.not_believed", stream_seq=seq, deliveries=deliveries, max_deliver=max_deliver)
                return
            raw = await js.get_msg(names.jobs_stream, seq)
            job = Job.model_validate_json(raw.data)
        except Exception as exc:
            log.warning("advisory.unreadable", error=repr(exc))
            return
        error = ErrorInfo.model_validate({"class": "PoisonJob", "message": POISON_MESSAGE, "transient": True})
        events = [
            FileEvent(kind="failed", job_id=job.job_id, run_id=job.run_id, tenant_id=job.tenant_id, file_index=f.index,
                      round=job.round, attempt=deliveries, step=f.start_step, error=error)
            for f in job.every_file
        ]
        trace_id = (tracing.trace_id_of((raw.headers or {}).get(tracing.HEADER))
                    or tracing.run_trace_id(job.run_id))
        await publish_many(js, [Outgoing(names.file_event("failed"), e.to_bytes(), msg_id,
                                         headers_for(msg_id, job.tenant_id, job.run_id, trace_id))
                                for e in events for msg_id in [f"{e.job_id}:{e.file_index}:poison"]])
        try:
            await js.delete_msg(names.jobs_stream, seq)
        except Exception as exc:  # already gone: fine
            log.info("advisory.delete_failed", seq=seq, error=repr(exc))
        log.warning("job.poison", job_id=job.job_id, deliveries=deliveries)

    return handle
