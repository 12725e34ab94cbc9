"""Composition root of the coordinator: builds every part and wires them; nothing connects
at import time."""

from __future__ import annotations

from functools import partial

from shared import bus, streams
from shared.handler_offers import OfferedHandlers
from shared.pull_loop import PullLoop
from shared.db import make_engine
from shared.rpc import MicroService, RpcClient
from shared.runtime import run
from shared.settings import Settings
from shared.subjects import Names
from services.coordinator import jobs
from services.coordinator.advisories import make_advisory_handler
from services.coordinator.context import Deps
from services.coordinator.endpoints import verbs
from services.coordinator.liveness import make_alive_handler
from services.coordinator.outbox import OutboxRelay
from services.coordinator.recovery import RecoverySweeper
from services.coordinator.results_consumer import make_results_handler
from services.coordinator.undeliverable import report_undeliverable
from services.coordinator.window import Window
from services.coordinator.run_stops import ensure_bucket as ensure_run_stops_bucket


# An executor checks a new template's step params (handler_offers.py); none answering
# within this long, the template is made unchecked, as before any executor ever ran.
CHECK_STEPS_TIMEOUT_S = 2.0


class CoordinatorService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)

    async def start(self) -> None:
        s, names = self.settings, self.names
        self.nc = await bus.connect(s, "coordinator")
        self.js = self.nc.jetstream()
        await streams.ensure_streams(self.js, s)
        # Declared at start, and again by their loops should they be deleted (shared/pull_loop.py).
        ensure_results_consumer = partial(streams.ensure_consumer, self.js, names.events_stream, names.results_consumer,
                                          names.file_events_all, ack_wait_s=s.results_ack_wait_s)
        ensure_advisories_consumer = partial(streams.ensure_consumer, self.js, names.advisories_stream,
                                             names.advisories_consumer, names.max_deliveries_advisory,
                                             ack_wait_s=s.results_ack_wait_s)
        await ensure_results_consumer()
        await ensure_advisories_consumer()
        await ensure_run_stops_bucket(self.js, names, s.stream_replicas)
        self.handlers = OfferedHandlers(self.js, names, s.stream_replicas)
        await self.handlers.start()
        self.engine = make_engine(s, pool_size=10, application_name="redrive-coordinator")
        self.credit_engine = make_engine(s, pool_size=3, application_name="redrive-coordinator-credits")
        # Each tenant's window follows the slots of the executors alive, up to the setting (0: none).
        window = Window(s.jobs_in_flight_per_tenant, self.handlers.slots) if s.jobs_in_flight_per_tenant else None
        self.relay = OutboxRelay(self.engine, self.js, partial(jobs.expand_page, names=names, window=window),
                                 partial(report_undeliverable, names=names), batch=s.outbox_batch)
        self.deps = Deps(settings=s, names=names, engine=self.engine, credit_engine=self.credit_engine,
                         billing=RpcClient(self.nc, names, timeout=s.request_timeout_s), relay=self.relay,
                         max_payload=self.nc.max_payload, js=self.js, handlers=self.handlers,
                         executors=RpcClient(self.nc, names, timeout=CHECK_STEPS_TIMEOUT_S))
        self.results = PullLoop(self.js, names.events_stream, names.results_consumer, make_results_handler(self.deps),
                                    batch=s.results_fetch_batch, gather_s=s.results_gather_ms / 1000,
                                    name="results", ensure=ensure_results_consumer)
        self.advisories = PullLoop(self.js, names.advisories_stream, names.advisories_consumer,
                                   make_advisory_handler(self.js, names, self.engine), batch=16,
                                   name="advisories", ensure=ensure_advisories_consumer)
        # One replica records each heartbeat (a queue group).
        self.alive = await self.nc.subscribe(names.runs_alive, queue=f"{names.prefix}-coordinator-alive",
                                             cb=make_alive_handler(self.engine))
        self.micro = MicroService(self.nc, names, "coordinator", verbs(self.deps),
                                  "runs, per-file results, fan-in, retries, recovery")
        self.sweeper = RecoverySweeper(self.deps)
        self.relay.start()
        self.results.start()
        self.advisories.start()
        await self.micro.start()
        self.sweeper.start()  # its first pass runs now: recovery on every start

    async def stop(self) -> None:
        await self.micro.stop()
        await self.sweeper.stop()
        await self.results.stop()
        await self.advisories.stop()
        await self.alive.unsubscribe()
        await self.relay.stop()
        await self.handlers.stop()
        await bus.close(self.nc)
        await self.engine.dispose()
        await self.credit_engine.dispose()


async def build(settings: Settings) -> CoordinatorService:
    return CoordinatorService(settings)


def main(settings: Settings) -> None:
    run("coordinator", build, settings)
