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


def settle_gc() -> None:
    """Called once a process has built what it keeps for its life (imports, pools, caches).

    Freeze those objects out of the cyclic collector's sight: each full collection walked
    the ~1M of them again, a quarter of the executor's CPU per job. And collect young
    objects in larger steps: a service allocates a few hundred short-lived objects per
    message, and the default threshold (700) ran a collection every few messages
    (executor GC: ~30 → ~3 µs a job, measured with gc.callbacks).
    """
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


async def serve(name: str, build: Callable[[Settings], Awaitable[Service]], settings: Settings) -> None:
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop_requested.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread
            pass
    service = await build(settings)
    # A start can wait a long time (NATS or PostgreSQL not there yet): a stop request must
    # not wait for it.
    starting = asyncio.ensure_future(service.start())
    stopping = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        log.info("service.stopped_while_starting", service=name)
        return
    stopping.cancel()
    starting.result()  # a failed start fails the process
    settle_gc()
    log.info("service.started", service=name)
    if not await _stop_requested_or_connection_lost(stop_requested, service):
        # nats-py gave the connection up (the server closed it on a protocol error): the
        # process would stay up doing nothing. Exit, so that its supervisor starts it again.
        log.error("service.nats_connection_lost", service=name)
        try:
            await asyncio.wait_for(service.stop(), LOST_STOP_TIMEOUT_S)
        except Exception as exc:
            log.warning("service.stop_failed", service=name, error=repr(exc))
        raise SystemExit(1)
    log.info("service.stopping", service=name)
    await service.stop()
    log.info("service.stopped", service=name)


LOST_STOP_TIMEOUT_S = 10.0
LOST_CHECK_S = 1.0


async def _stop_requested_or_connection_lost(stop_requested: asyncio.Event, service: Service) -> bool:
    """True once a stop is requested; False if the service's NATS client closed for good
    meanwhile (it reconnects forever by itself: closed means it will not)."""
    while not stop_requested.is_set():
        nc = getattr(service, "nc", None)
        if nc is not None and nc.is_closed:
            return False
        try:
            await asyncio.wait_for(stop_requested.wait(), LOST_CHECK_S)
        except asyncio.TimeoutError:
            pass
    return True


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
