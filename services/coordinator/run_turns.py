"""Turns at one run for the actions on one file (retry, skip): they queue here, in this
process, before they take a database connection, and only a few may wait per run.

Each is meant (two FAILED files retried together: both), so they wait for each other
rather than be refused; but a waiting request that held a pooled connection would let 20
clicks on one run starve the results consumer, the relay and every other tenant of the
pool. Here a waiter holds nothing; across coordinator replicas the run's claim in the
database still orders them (store.load_run's ``wait_s``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

from services.coordinator.store import busy

# Waiting for one run at once, per process: more are refused at once (409). A waiter holds
# nothing but a task, and each turn takes milliseconds: 20 clicks at once all take (8 sent
# 11 of them back for a burst done in 0.4 s); the wait's own bound keeps a flood short.
MAX_WAITING = 64


class RunTurns:
    def __init__(self, max_waiting: int = MAX_WAITING) -> None:
        self._max_waiting = max_waiting
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._holders: dict[Hashable, int] = {}  # waiting or in turn, per run: its lock goes with the last
        self._requests: dict[Hashable, set[str]] = {}  # the keyed requests among them

    @asynccontextmanager
    async def turn(self, run_id: Hashable, wait_s: float, *, request_id: str | None = None) -> AsyncIterator[None]:
        """This request's turn at ``run_id`` (any key naming the run: (tenant, run id)),
        waited for at most ``wait_s`` (then 409). A 503 at once while an earlier attempt of
        the same request (``request_id``) holds or waits for a turn here: see store.load_run."""
        if request_id is not None and request_id in self._requests.get(run_id, ()):
            raise busy(same_request=True)
        lock = self._locks.get(run_id)
        if lock is not None and self._holders[run_id] > self._max_waiting:  # one in turn, the rest waiting
            raise busy()
        if lock is None:
            lock = self._locks[run_id] = asyncio.Lock()
        self._holders[run_id] = self._holders.get(run_id, 0) + 1
        if request_id is not None:
            self._requests.setdefault(run_id, set()).add(request_id)
        try:
            try:
                async with asyncio.timeout(wait_s):
                    await lock.acquire()
            except TimeoutError:
                raise busy() from None
            try:
                yield
            finally:
                lock.release()
        finally:
            self._holders[run_id] -= 1
            if request_id is not None:
                self._requests[run_id].discard(request_id)
                if not self._requests[run_id]:
                    del self._requests[run_id]
            if not self._holders[run_id]:
                del self._holders[run_id], self._locks[run_id]

    def waiting(self, run_id: Hashable) -> int:
        """Requests holding or waiting for a turn at ``run_id`` (for tests and metrics)."""
        return self._holders.get(run_id, 0)
