"""How a service process lives: build from its composition root, start, wait for SIGTERM or
SIGINT, stop gracefully (stop pulling, finish in-flight work, drain NATS, close the pool)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from shared.logging import configure_logging
from shared.settings import Settings

log = structlog.get_logger(__name__)


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def serve(name: str, build: Callable[[Settings], Awaitable[Service]], settings: Settings) -> None:
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop_requested.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread
            pass
    service = await build(settings)
    await service.start()
    # Everything imported and built so far lives as long as the process: take it out of
    # the cyclic collector's sight. Otherwise each full collection walks those ~1M objects
    # again, which cost the executor a quarter of its CPU per job (measured, see README).
    gc.freeze()
    log.info("service.started", service=name)
    await stop_requested.wait()
    log.info("service.stopping", service=name)
    await service.stop()
    log.info("service.stopped", service=name)


def run(name: str, build: Callable[[Settings], Awaitable[Service]], settings: Settings) -> None:
    configure_logging(settings, service=name)
    try:
        import uvloop  # optional speed-up

        uvloop.install()
    except ImportError:
        pass
    profile_dir = os.environ.get("REDRIVE_PROFILE_DIR")
    if not profile_dir:
        asyncio.run(serve(name, build, settings))
        return
    # Developer aid: a cProfile of the whole process life, written when it stops.
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        asyncio.run(serve(name, build, settings))
    finally:
        profiler.disable()
        profiler.dump_stats(os.path.join(profile_dir, f"{name}-{os.getpid()}.prof"))
