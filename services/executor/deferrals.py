"""Telling the coordinator that a run waits for an open circuit breaker (its run is flagged
``breaker_open`` for operators until it progresses), once per run and open period.

Every deferral would be a message per file per probe interval: this process remembers what
it told, and the event's id (run, dependency, open period) dedupes other executors'."""

from __future__ import annotations

from datetime import datetime, timezone

import structlog
from nats.js import JetStreamContext

from shared.bus import Outgoing, publish_many
from shared.messages import ErrorInfo, FileEvent, Job
from shared.subjects import Names
from services.executor.file_events import headers
from services.executor.outcome import Outcome

log = structlog.get_logger(__name__)

# Forgetting costs at most one repeated notice per run.
REMEMBERED = 10_000


class DeferralNotices:
    def __init__(self, js: JetStreamContext, names: Names) -> None:
        self._js = js
        self._names = names
        self._told: set[tuple[str, str, float | None]] = set()

    async def tell(self, job: Job, file_index: int, outcome: Outcome, attempt: int) -> None:
        """Publish a ``deferred`` event for ``outcome`` (a defer) unless this process told
        it for the run and the breaker's open period already."""
        if outcome.dependency is None:
            return
        told = (job.run_id, outcome.dependency, outcome.opened_at)
        if told in self._told:
            return
        if len(self._told) >= REMEMBERED:
            self._told.clear()
        # Before the publish, not after: jobs of the run deferred at the same moment would
        # each pass the check while the first one's publish is on its way.
        self._told.add(told)
        event = FileEvent(
            kind="deferred", job_id=job.job_id, run_id=job.run_id, tenant_id=job.tenant_id, file_index=file_index,
            round=job.round, attempt=attempt, step=outcome.step, step_name=job.steps[outcome.step].name,
            next_delay_ms=outcome.delay_ms, dependency=outcome.dependency[:500],
            breaker_opened_at=datetime.fromtimestamp(outcome.opened_at, timezone.utc) if outcome.opened_at else None,
            error=ErrorInfo.model_validate({"class": "DependencyUnavailable", "transient": True, "message":
                                            f"{outcome.dependency!r} is unavailable: its circuit breaker is open"}))
        try:
            await publish_many(self._js, [Outgoing(self._names.file_event("deferred"), event.to_bytes(), event.msg_id,
                                                   headers(job.tenant_id, job.run_id))])
        except Exception as exc:  # only a notice: the deferral itself goes on; the next one tells again
            log.warning("job.deferral_not_told", run_id=job.run_id, error=repr(exc))
            self._told.discard(told)
