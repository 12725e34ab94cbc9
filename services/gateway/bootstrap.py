"""Composition root of the gateway."""

from __future__ import annotations

from aiohttp import web

from shared import bus
from shared.db import make_engine
from shared.rpc import RpcClient
from shared.runtime import run
from shared.settings import Settings
from shared.subjects import Names
from services.gateway.app import Deps, build_app
from services.gateway.events import EventHub
from services.gateway.identity import KeyStore


class GatewayService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port: int | None = None

    async def start(self) -> None:
        s = self.settings
        names = Names(s.prefix)
        self.nc = await bus.connect(s, "gateway")
        self.engine = make_engine(s, pool_size=10, application_name="redrive-gateway")
        self.hub = EventHub(self.nc, names)
        await self.hub.start()
        deps = Deps(self.nc, self.engine, RpcClient(self.nc, names, timeout=s.request_timeout_s), KeyStore(self.engine), self.hub)
        self.app = build_app(deps)
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, s.host, s.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await self.hub.stop()
        await self.runner.cleanup()
        await bus.close(self.nc)
        await self.engine.dispose()


async def build(settings: Settings) -> GatewayService:
    return GatewayService(settings)


def main(settings: Settings) -> None:
    run("gateway", build, settings)
