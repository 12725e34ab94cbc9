"""Composition root of the gateway: settings in, a started HTTP server out."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiohttp import web

from shared import bus
from shared.db import make_engine
from shared.round_trip import RoundTrip
from shared.rpc import RpcClient
from shared.runtime import run
from shared.settings import Settings
from shared.subjects import Names
from services.gateway import idempotency
from services.gateway.app import Deps, build_app
from services.gateway.events import EventHub
from services.gateway.identity import KeyCache
from services.gateway.key_revocations import KeyRevocations, dedicated_connection
from services.gateway.large_bodies import LargeBodies
from services.gateway.system_metrics import SystemMetrics

log = structlog.get_logger(__name__)

PURGE_INTERVAL_S = 3600.0


class GatewayService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port: int | None = None  # the bound port (settings.port may be 0)
        self._purge: asyncio.Task | None = None

    async def start(self) -> None:
        s = self.settings
        names = Names(s.prefix)
        self.nc = await bus.connect(s, "gateway")
        # The engine connects lazily: the gateway starts (and /readyz says 503) without a database.
        # Bounded like the request itself: a frozen database makes a 503, not a hang.
        self.engine = make_engine(s, pool_size=10, application_name="redrive-gateway",
                                  command_timeout_s=s.request_timeout_s)
        # The key cache serves only while its revocations are heard (key_revocations.py).
        keys = KeyCache()
        self.key_revocations = KeyRevocations(keys, dedicated_connection(self.engine))
        self.hub = EventHub(self.nc, names, max_per_key=s.sse_max_per_key, max_per_tenant=s.sse_max_per_tenant)
        await self.hub.start()
        self.deps = Deps(
            nc=self.nc, engine=self.engine, rpc=RpcClient(self.nc, names, timeout=s.request_timeout_s), hub=self.hub,
            keys=keys,
            idempotency_lease_s=2 * s.request_timeout_s + 5, max_body_bytes=s.max_request_bytes,
            large_bodies=LargeBodies(s.max_concurrent_large_bodies),
            metrics_token=s.metrics_token, round_trip=RoundTrip(self.nc),
        )
        self.deps.system = SystemMetrics(self.deps.registry, self.deps.rpc, self.nc.jetstream(), names)
        self.app = build_app(self.deps)
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, s.host, s.port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        self.key_revocations.start()
        self._purge = asyncio.create_task(self._purge_expired_keys(), name="gateway-idempotency-purge")
        log.info("gateway.listening", host=s.host, port=self.port)

    async def stop(self) -> None:
        if self._purge is not None:
            self._purge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purge
        await self.hub.stop()  # ends the SSE streams, so the runner need not wait for them
        await self.runner.cleanup()
        await self.key_revocations.stop()
        await bus.close(self.nc)
        await self.engine.dispose()

    async def _purge_expired_keys(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL_S)
            try:
                removed = await idempotency.purge_expired(self.engine)
                log.info("gateway.idempotency_purged", removed=removed)
            except Exception as exc:
                log.warning("gateway.idempotency_purge_failed", error=repr(exc))


async def build(settings: Settings) -> GatewayService:
    return GatewayService(settings)


def main(settings: Settings) -> None:
    run("gateway", build, settings)
