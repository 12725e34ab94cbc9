"""Step timeouts from one watchdog instead of a timer per step.

``asyncio.timeout`` arms and cancels an event-loop timer for every step: ~4 µs, a
twentieth of what a quick job costs. Steps in flight are few (at most the executor's
concurrency), so one task that looks at them every ``resolution_s`` is cheaper, and a
step runs at most that much past its timeout before it is cancelled.

``async with deadlines.limit(seconds)`` behaves as ``asyncio.timeout(seconds)``: on
expiry the task is cancelled and the block raises :class:`TimeoutError`; a cancellation
from anywhere else stays a cancellation.
"""

from __future__ import annotations

import asyncio


class Deadlines:
    def __init__(self, resolution_s: float = 0.05) -> None:
        self._resolution_s = resolution_s
        self._limits: set[_Limit] = set()
        self._busy = asyncio.Event()
        self._watchdog: asyncio.Task | None = None

    def limit(self, seconds: float) -> "_Limit":
        return _Limit(self, seconds)

    def _add(self, limit: "_Limit") -> None:
        self._limits.add(limit)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="step-deadlines")
        self._busy.set()

    def _remove(self, limit: "_Limit") -> None:
        self._limits.discard(limit)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._limits:
                self._busy.clear()
                await self._busy.wait()
            await asyncio.sleep(self._resolution_s)
            now = loop.time()
            for limit in [x for x in self._limits if x.deadline <= now]:
                self._remove(limit)
                limit.expire()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            try:
                await self._watchdog
            except asyncio.CancelledError:
                pass
            self._watchdog = None


class _Limit:
    __slots__ = ("_owner", "_seconds", "deadline", "_task", "_cancelling", "_expired")

    def __init__(self, owner: Deadlines, seconds: float) -> None:
        self._owner = owner
        self._seconds = seconds
        self._expired = False

    async def __aenter__(self) -> "_Limit":
        self._task = asyncio.current_task()
        self._cancelling = self._task.cancelling()
        self.deadline = asyncio.get_running_loop().time() + self._seconds
        self._owner._add(self)
        return self

    def expire(self) -> None:
        self._expired = True
        self._task.cancel()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self._owner._remove(self)
        # As asyncio.timeout: take our cancellation back; it was ours alone if no other
        # cancellation is pending, and then the block timed out.
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
