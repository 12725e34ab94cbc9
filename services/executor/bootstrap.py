"""Composition root of the executor."""

from __future__ import annotations

from functools import partial

from shared import bus, streams
from shared.handler_offers import HandlerOffer
from shared.rpc import MicroService
from shared.runtime import run
from shared.settings import Settings
from shared.subjects import Names
from services.executor.artifacts import ArtifactSweeper
from services.executor.breakers import BreakerBoard
from services.executor.deadlines import Deadlines
from services.executor.handlers.registry import builtin_registry
from services.executor.job_runner import JobRunner
from services.executor.keepalive import KeepAlive
from services.executor.progress import ProgressStore
from services.executor.run_stops import RunStops
from services.executor.steps import StepRunner
from services.executor.worker import Worker


class ExecutorService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)

    async def start(self) -> None:
        s, names = self.settings, self.names
        registry = builtin_registry(allow_private_urls=s.executor_allow_private_urls,
                                    allow_crash=s.executor_allow_crash,
                                    max_download_bytes=s.executor_max_download_bytes)
        if s.handlers:
            registry.load_modules(s.handlers)
        self.nc = await bus.connect(s, "executor")
        self.js = self.nc.jetstream()
        await streams.ensure_streams(self.js, s)
        # Declared at start, and again by the worker should it be deleted (shared/pull_loop.py).
        ensure_jobs_consumer = partial(streams.ensure_consumer, self.js, names.jobs_stream, names.executor_consumer,
                                       names.jobs_all, ack_wait_s=s.executor_ack_wait_s,
                                       max_deliver=s.executor_max_deliver, backoff_s=s.executor_redelivery_backoff_s)
        await ensure_jobs_consumer()
        self.breakers = BreakerBoard(self.js, names, s.stream_replicas)
        await self.breakers.start()
        self.progress = ProgressStore(self.js, names, s.stream_replicas)
        await self.progress.start()
        self.deadlines = Deadlines()
        artifacts = s.data_dir / "artifacts"
        steps = StepRunner(registry, self.breakers, artifacts, self.deadlines, max_payload=self.nc.max_payload)
        self.artifacts = ArtifactSweeper(artifacts, retention_hours=s.executor_artifact_retention_hours)
        self.keepalive = KeepAlive(s.executor_ack_wait_s,
                                   publish_alive=lambda body: self.nc.publish(names.runs_alive, body))
        self.stops = RunStops(self.js, names, s.stream_replicas)
        await self.stops.start()
        self.offer = HandlerOffer(self.js, names, registry.names(), s.stream_replicas, slots=s.executor_concurrency)
        await self.offer.start()
        runner = JobRunner(self.js, names, steps, self.progress, self.keepalive, max_deliver=s.executor_max_deliver,
                           stops=self.stops)
        self.worker = Worker(self.js, names, runner, concurrency=s.executor_concurrency,
                             fetch_batch=s.executor_fetch_batch, ensure=ensure_jobs_consumer)
        self.micro = MicroService(self.nc, names, "executor",
                                  {"breakers": self._breakers, "check_steps": self._check_steps(registry)},
                                  "runs step handlers")
        await self.micro.start()
        if s.executor_keepalive:
            self.keepalive.start()
        self.artifacts.start()
        self.worker.start()

    @staticmethod
    def _check_steps(registry):
        async def check(payload: dict) -> dict:
            steps = payload.get("steps")
            steps = steps if isinstance(steps, list) else []
            return {"problems": registry.check_steps(steps), "file_needs": registry.file_needs(steps)}
        return check

    async def _breakers(self, payload: dict) -> list[dict]:
        tenant_id = payload.get("tenant_id")
        return self.breakers.snapshot(tenant_id if isinstance(tenant_id, str) else None)

    async def stop(self) -> None:
        await self.micro.stop()
        await self.worker.stop()
        await self.deadlines.close()
        await self.keepalive.stop()
        await self.artifacts.stop()
        await self.stops.stop()
        await self.offer.stop()
        await self.breakers.stop()
        await bus.close(self.nc)


async def build(settings: Settings) -> ExecutorService:
    return ExecutorService(settings)


def main(settings: Settings) -> None:
    run("executor", build, settings)
