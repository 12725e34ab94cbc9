"""Run one file's steps from its start step; decide retry / fail / error / defer.

The retry decision is made here, once: transient failures are retried while the step's
attempt number is within its ``auto_retries`` (the step's own, else the tenant's; with
exponential backoff and full jitter, or the dependency's Retry-After), and become FAILED
after that; permanent failures are ERROR at once. The budget is per step: attempts are
counted from the step's first, so a step after a checkpoint starts at attempt 1. A
dependency whose breaker is open is not called at all: the job is deferred, which does not
count as an attempt.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import structlog

from shared.backoff import backoff_delay_ms
from shared.errors import Classified, InvalidOutput, PermanentError, StepTimeout, classify
from shared.messages import FileSpec, Job, StepSpec
from services.executor.breakers import BreakerBoard
from services.executor.deadlines import Deadlines
from services.executor.handlers.base import FileRef, StepContext
from services.executor.handlers.registry import HandlerRegistry
from services.executor.outcome import Outcome, StepStopped

log = structlog.get_logger(__name__)

# Called after each intermediate step completes, before the next one starts; what it returns
# ("stopped", "overtaken" or "superseded", see Outcome) ends the file there, None lets it go on.
OnCheckpoint = Callable[[int, dict[str, Any]], Awaitable[str | None]]

# Room for an event's own fields and headers around a step's output: the output travels in
# a file event (and in the next round's job), and the broker refuses bigger messages.
EVENT_ROOM = 4096


def retry_decision(error: Classified, attempt: int, job: Job, step: int) -> Outcome:
    """Retry, FAILED or ERROR for a failed ``attempt`` (1-based, of ``step``). Pure and cheap (bench/)."""
    if not error.transient:
        return Outcome("errored", step, error=error)
    limit = job.steps[step].auto_retries
    if attempt > (job.retry.auto_retries if limit is None else limit):
        return Outcome("failed", step, error=error)
    delay = backoff_delay_ms(attempt, base_ms=job.retry.backoff_base_ms, max_ms=job.retry.backoff_max_ms,
                             jitter=job.retry.jitter, retry_after_s=error.retry_after_s)
    return Outcome("retry", step, error=error, delay_ms=delay)


class StepRunner:
    def __init__(self, registry: HandlerRegistry, breakers: BreakerBoard | None, artifacts: Path,
                 deadlines: Deadlines | None = None, *, max_payload: int = 1 << 20) -> None:
        self._registry = registry
        self._max_output_bytes = max_payload - EVENT_ROOM
        self._deadlines = deadlines or Deadlines()
        self._breakers = breakers
        self._artifacts = artifacts
        self._run_dirs: dict[tuple[str, str], Path] = {}

    async def run_file(
        self,
        job: Job,
        file: FileSpec,
        *,
        attempt: int,
        start_step: int,
        previous_output: dict[str, Any] | None,
        heartbeat: Callable[[], Awaitable[None]],
        on_checkpoint: OnCheckpoint,
    ) -> Outcome:
        """Run the steps from ``start_step``, whose attempt this is, to the end or the first
        that does not succeed. ``attempt`` is that of ``start_step`` alone: each step has its
        own retry budget, so a step reached after a checkpoint runs its attempt 1."""
        output = previous_output
        ref = FileRef(name=file.name, url=file.url, content_b64=file.content_b64, size=file.size, sha256=file.sha256)
        for index in range(start_step, len(job.steps)):
            step: StepSpec = job.steps[index]
            try:
                handler = self._registry.get(step.handler)
            except PermanentError as exc:
                return Outcome("errored", index, error=classify(exc))
            try:
                dependency = handler.dependency_of(step.params, ref) if handler.dependency_of else None
            except Exception as exc:
                # Input it cannot read (or a bug of its own): no breaker for this attempt, and
                # the handler, which checks its input, says what is wrong as the step's error.
                log.warning("step.dependency_unknown", handler=step.handler, error=repr(exc)[:300])
                dependency = None
            probing, opened_at = False, None
            if dependency and self._breakers is not None:
                admission = self._breakers.admit(job.tenant_id, dependency)
                if admission.verdict == "defer" or (
                    admission.verdict == "probe" and not await self._breakers.claim_probe(job.tenant_id, dependency)
                ):
                    # Jitter: the deferred jobs must not all wake at the probe instant, or the
                    # same one wins every probe and spends its retries alone. At most a reset
                    # period: while a probe is out (half-open, its lease is a minute) the
                    # breaker may close any moment, and a job must not sleep through that.
                    jitter_s = random.uniform(0, 0.5 * job.retry.breaker_reset_s)
                    wait_s = min(max(admission.delay_s, 0.5), job.retry.breaker_reset_s)
                    return Outcome("defer", index, delay_ms=int((wait_s + jitter_s) * 1000),
                                   dependency=dependency, opened_at=admission.opened_at)
                probing, opened_at = admission.verdict == "probe", admission.opened_at
            ctx = StepContext(
                job_id=job.job_id, run_id=job.run_id, tenant_id=job.tenant_id, file_index=file.index, round=job.round,
                attempt=attempt, step_index=index, step_name=step.name, params=step.params, file=ref,
                previous_output=output, artifact_root=self._run_dir(job), heartbeat=heartbeat,
            )
            lease = self._breakers.hold_probe(job.tenant_id, dependency) if probing else None
            try:
                async with self._deadlines.limit(step.timeout_s):
                    result = await handler.run(ctx)
            except TimeoutError:
                error = classify(StepTimeout(f"step {step.name!r} ran past its timeout of {step.timeout_s:g}s"))
                return await self._failed(job, dependency, error, attempt, index)
            except asyncio.CancelledError:
                raise
            except StepStopped:  # its run was stopped: told at a heartbeat (job_runner)
                if probing:  # no verdict on the dependency: the next job may probe at once
                    lease.cancel()  # first: a renewal after the release would hold the probe again
                    await self._breakers.release_probe(job.tenant_id, dependency, opened_at)
                return Outcome("stopped", index)
            except Exception as exc:  # classified below: nothing escapes unclassified
                return await self._failed(job, dependency, classify(exc), attempt, index)
            finally:
                if lease is not None:
                    lease.cancel()
            if dependency and self._breakers is not None:
                await self._breakers.record_success(job.tenant_id, dependency)
            output = result if isinstance(result, dict) else {"result": result}
            problem = self._output_problem(step, output)
            if problem is not None:  # it would fail to publish on every delivery: ERROR now
                return Outcome("errored", index, error=classify(InvalidOutput(problem)))
            if index < len(job.steps) - 1:
                halt = await on_checkpoint(index, output)
                if halt:
                    return Outcome(halt, index)
                attempt = 1  # the next step's budget is its own (job_runner's Progress counts it from here too)
        return Outcome("succeeded", len(job.steps) - 1, output=output or {})

    def _output_problem(self, step: StepSpec, output: dict[str, Any]) -> str | None:
        try:
            size = len(orjson.dumps(output))
        except TypeError as exc:
            return f"step {step.name!r} returned output that is not JSON: {exc}"
        if size > self._max_output_bytes:
            return (f"step {step.name!r} returned {size} bytes of output; at most {self._max_output_bytes} "
                    "fit in a message (write big results to an artifact and return its path)")
        return None

    async def _failed(self, job: Job, dependency: str | None, error: Classified, attempt: int, step: int) -> Outcome:
        if dependency and self._breakers is not None:
            if error.transient:
                await self._breakers.record_failure(job.tenant_id, dependency, job.retry.breaker_failure_threshold,
                                                    job.retry.breaker_reset_s)
            else:  # it answered (a 4xx, bad input): the dependency is up, whatever became of the file
                await self._breakers.record_success(job.tenant_id, dependency)
        return retry_decision(error, attempt, job, step)

    def _run_dir(self, job: Job) -> Path:
        # Not created here: most steps never write an artifact (handlers mkdir on demand).
        # Cached per run: building Paths costs microseconds on every job.
        run_dir = self._run_dirs.get((job.tenant_id, job.run_id))
        if run_dir is None:
            if len(self._run_dirs) > 1000:
                self._run_dirs.clear()
            run_dir = self._run_dirs[(job.tenant_id, job.run_id)] = self._artifacts / job.tenant_id / job.run_id
        return run_dir
