"""Pull jobs from the shared ``executor`` consumer and run up to ``concurrency`` at once.

Fetches are sized by free slots, so a slow job never holds messages it cannot start (they
would sit unacked until the ack wait and be redelivered elsewhere for nothing). Stopping
stops pulling, lets in-flight jobs finish (bounded by the grace period), then returns.

Suspects (jobs in flight at two executor deaths: see job_runner) run alone, and nothing is
fetched while one waits or runs: a job fetched beside it would die with it.

Cautious mode: after a start, and after a suspect, jobs are fetched one at a time, each
once the one before is judged (suspect or not: a progress read, before it runs), until a
job fetched alone is on its first delivery. JetStream hands out due redeliveries before
new messages, so that first delivery says no redelivery was waiting. After a start the
redelivered jobs come first: after a common crash none is a suspect, and they start side
by side, as fast as they are judged; after a poison job's second kill it and the jobs that
died with it twice are suspects, each fetched and run alone, so a poison job is not
fetched in one batch with the jobs it would kill.

A consumer deleted while the worker runs is declared again (``ensure``; see
shared/pull_loop.py, ConsumerKeeper).
"""

from __future__ import annotations

import asyncio

import nats.errors
import structlog
from nats.js import JetStreamContext

from shared.bus import client_of
from shared.jetstream import Puller
from shared.pull_loop import ConsumerKeeper, EnsureConsumer
from shared.subjects import Names
from services.executor.deliveries import deliveries
from services.executor.job_runner import JobRunner

log = structlog.get_logger(__name__)


class Worker:
    def __init__(self, js: JetStreamContext, names: Names, runner: JobRunner, *, concurrency: int, fetch_batch: int,
                 ensure: EnsureConsumer | None = None) -> None:
        self._js = js
        self._names = names
        self._runner = runner
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._fetch_batch = fetch_batch
        self._keeper = ConsumerKeeper(js, names.jobs_stream, names.executor_consumer, ensure, name="executor")
        self._inflight: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._suspects = 0  # in flight
        self._no_suspect = asyncio.Event()
        self._no_suspect.set()
        self.cautious = True
        self.completed = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="executor-pull")

    async def stop(self, grace_s: float = 30.0) -> None:
        self._stopping.set()
        if self._task:
            await self._task
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=grace_s)

    async def _run(self) -> None:
        puller = Puller(client_of(self._js), self._names.jobs_stream, self._names.executor_consumer)
        while not self._stopping.is_set():
            # Each wait below also ends on stop: the grace period bounds a stop, not the
            # longest job (a suspect runs alone; full slots wait for one to end).
            if self._suspects:
                await self._until_stopped_or(self._no_suspect.wait())
                continue
            free = self._concurrency - len(self._inflight)
            if free <= 0:
                await self._until_stopped_or(asyncio.wait(set(self._inflight), return_when=asyncio.FIRST_COMPLETED))
                continue
            try:
                msgs = await puller.fetch(1 if self.cautious else min(free, self._fetch_batch), timeout=1.0)
            except Exception as exc:
                log.warning("executor.fetch_failed", error=repr(exc))
                await self._keeper.after_fetch_failed(exc)
                await asyncio.sleep(0.5)
                continue
            if not msgs:
                await self._keeper.after_empty_fetch()
                continue
            alone = self.cautious
            for msg in msgs:
                # Only a job fetched alone is waited for until judged: no future on the fast path.
                judged = asyncio.get_running_loop().create_future() if alone else None
                task = asyncio.create_task(self._one(msg, alone, judged))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
                if alone:  # one message: fetch the next once this one is judged
                    await asyncio.wait((judged, task), return_when=asyncio.FIRST_COMPLETED)
        await puller.stop()

    async def _until_stopped_or(self, awaitable) -> None:
        waits = {asyncio.ensure_future(awaitable), asyncio.ensure_future(self._stopping.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:  # the waits, never the jobs they wait for
                wait.cancel()

    async def _one(self, msg, alone: bool, judged: asyncio.Future | None) -> None:
        suspect = told = False

        def verdict(is_suspect: bool) -> None:
            nonlocal suspect, told
            if told:
                return
            told = True
            if judged is not None:
                judged.set_result(is_suspect)
            if is_suspect:
                suspect = True
                self._suspects += 1
                self._no_suspect.clear()
                self.cautious = True
            elif alone and deliveries(msg) == 1:
                self.cautious = False  # no redelivery was waiting when it was fetched

        try:
            await self._runner.handle(msg, verdict)
            self.completed += 1
        except BUS_TROUBLE as exc:
            # Publishing or acking failed (NATS away): leave the message unacked; it comes
            # back after the ack wait and the coordinator dedupes whatever was published.
            log.warning("executor.job_failed", subject=msg.subject, error=repr(exc))
        except Exception:
            # A bug of ours on this job's path (handler failures never get here: steps.py
            # classifies them). Not the job's fault, and maybe a race that passes: bring it
            # back soon rather than after the ack wait. Every delivery counts, so a bug
            # that hits it every time still ends it at max deliver, as a poison job.
            log.exception("executor.job_crashed", subject=msg.subject)
            try:
                await msg.nak(delay=bug_backoff_s(deliveries(msg)))
            except BUS_TROUBLE:
                pass  # then the ack wait brings it back
        finally:
            verdict(False)  # not judged: it did not run (rejected, acked again, or failed first)
            if suspect:
                self._suspects -= 1
                if not self._suspects:
                    self._no_suspect.set()


# What a job's publish, ack or progress write raises when NATS is away or slow.
BUS_TROUBLE = (nats.errors.Error, TimeoutError, ConnectionError, OSError)


def bug_backoff_s(delivered: int) -> float:
    """1, 2, 4, 8, then 10 s between deliveries of a job that met a bug."""
    return float(min(2 ** (delivered - 1), 10))
