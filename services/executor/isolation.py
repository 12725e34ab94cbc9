"""Run suspect jobs alone.

A job redelivered for no reason we know of (not a retry we asked for, not a breaker
deferral) died with its executor. Once is the common crash, and the job runs as any other;
a job that died with two executors (job_runner's SUSPECT_AFTER) may be what killed them. It
runs alone, after the jobs in flight finish and before new ones start, so that if it is
poison it kills only itself and the innocent jobs fetched next to it do not spend their
deliveries with it (the consumer's max deliver would otherwise fail them too).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator


class IsolationGate:
    def __init__(self) -> None:
        self._running = 0
        self._exclusive = False
        self._waiting_exclusive = 0
        self._changed = asyncio.Condition()

    def shared(self) -> "_Shared":
        """``async with gate.shared() as waited``: waited is True if it had to wait (what the
        job read before may be stale). A plain class, not a generator: it runs per job."""
        return _Shared(self)

    async def _enter_shared(self) -> bool:
        waited = bool(self._exclusive or self._waiting_exclusive)
        if waited:  # slow path only while a suspect waits or runs
            async with self._changed:
                await self._changed.wait_for(lambda: not self._exclusive and not self._waiting_exclusive)
        self._running += 1
        return waited

    async def _leave_shared(self) -> None:
        self._running -= 1
        if self._waiting_exclusive:
            async with self._changed:
                self._changed.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting_exclusive += 1
            try:
                await self._changed.wait_for(lambda: not self._exclusive and self._running == 0)
            finally:
                self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            async with self._changed:
                self._exclusive = False
                self._changed.notify_all()


class _Shared:
    __slots__ = ("_gate",)

    def __init__(self, gate: IsolationGate) -> None:
        self._gate = gate

    async def __aenter__(self) -> bool:
        return await self._gate._enter_shared()

    async def __aexit__(self, *exc_info) -> None:
        await self._gate._leave_shared()
