"""What ``/metrics`` tells about the system beyond this gateway's HTTP traffic, read when
Prometheus scrapes: the circuit breakers (product.md: breaker state visible in the API,
metrics and dashboard) and the work waiting in each durable consumer.

A source that does not answer within the timeout is reported down
(``redrive_metrics_source_up{source}`` 0) and its series are dropped for that scrape, so
a stale value never passes for a live one; the scrape itself always answers.
"""

from __future__ import annotations

import asyncio

import structlog
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Gauge

from shared.rpc import RpcClient
from shared.subjects import Names

log = structlog.get_logger(__name__)

BREAKER_STATES = ("closed", "open", "half_open")
SOURCE_TIMEOUT_S = 2.0


class SystemMetrics:
    def __init__(self, registry: CollectorRegistry, rpc: RpcClient, js: JetStreamContext, names: Names,
                 timeout_s: float = SOURCE_TIMEOUT_S) -> None:
        self._rpc, self._js, self._names, self._timeout_s = rpc, js, names, timeout_s
        self.breaker_state = Gauge("redrive_breaker_state", "1 for a breaker's current state, else 0",
                                   ["dependency", "state", "tenant"], registry=registry)
        self.breaker_failures = Gauge("redrive_breaker_failures", "Consecutive failures the breaker has counted",
                                      ["dependency", "tenant"], registry=registry)
        labels = ["stream", "consumer"]
        self.pending = Gauge("redrive_consumer_pending", "Messages the consumer has not been given yet",
                             labels, registry=registry)
        self.ack_pending = Gauge("redrive_consumer_ack_pending", "Messages given out and not yet acknowledged",
                                 labels, registry=registry)
        self.redelivered = Gauge("redrive_consumer_redelivered", "Messages given out more than once, still unacked",
                                 labels, registry=registry)
        self.up = Gauge("redrive_metrics_source_up", "1 when the source answered this scrape", ["source"],
                        registry=registry)

    @property
    def _consumers(self) -> list[tuple[str, str]]:
        n = self._names
        return [(n.jobs_stream, n.executor_consumer), (n.events_stream, n.results_consumer),
                (n.events_stream, n.notifier_consumer)]

    async def refresh(self) -> None:
        await asyncio.gather(self._refresh_breakers(), self._refresh_consumers())

    async def _refresh_breakers(self) -> None:
        self.breaker_state.clear()
        self.breaker_failures.clear()
        try:
            breakers = await self._rpc.call("executor", "breakers", timeout=self._timeout_s) or []
        except Exception as exc:  # no executor running, or NATS away: say so, keep scraping
            log.info("metrics.breakers_unavailable", error=repr(exc)[:200])
            self.up.labels("breakers").set(0)
            return
        for b in breakers:
            for state in BREAKER_STATES:
                self.breaker_state.labels(b["dependency"], state, b.get("tenant_id", "")).set(1 if b["state"] == state else 0)
            self.breaker_failures.labels(b["dependency"], b.get("tenant_id", "")).set(b.get("failures") or 0)
        self.up.labels("breakers").set(1)

    async def _refresh_consumers(self) -> None:
        for gauge in (self.pending, self.ack_pending, self.redelivered):
            gauge.clear()
        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*(self._js.consumer_info(stream, consumer) for stream, consumer in self._consumers),
                               return_exceptions=True), self._timeout_s)
        except asyncio.TimeoutError:
            infos = []
        answered = 0
        for (stream, consumer), info in zip(self._consumers, infos):
            if isinstance(info, BaseException):  # not created yet (its service never started), or NATS away
                continue
            answered += 1
            self.pending.labels(stream, consumer).set(info.num_pending or 0)
            self.ack_pending.labels(stream, consumer).set(info.num_ack_pending or 0)
            self.redelivered.labels(stream, consumer).set(info.num_redelivered or 0)
        self.up.labels("jetstream").set(1 if answered else 0)
