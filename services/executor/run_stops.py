"""The executor's view of stopped runs (see services/coordinator/run_stops.py): a local
copy of the KV bucket, kept fresh by a watcher, so the check per job is a dict lookup.

The copy holds what the bucket holds, no more: an entry deleted or purged there is
forgotten here, and so is one older than the bucket's TTL, which the bucket lets go
without telling the watcher (as breakers.py forgets its expired breakers). Otherwise it
would gain one entry per stopped run for as long as the executor lives.

Can a stop forgotten after the TTL (8 days) let a job of its run run? Only if that job
has waited in the jobs stream, handed to no executor, for about as long:

* Every job a stop covers (generation <= the stop's) was written before the stop, in an
  earlier transaction, and reaches the stream within a relay pass of the stop's entry,
  which is stamped when the relay publishes it. The stopped run is CANCELLED or FAILED:
  none of its jobs is written after (an expansion's pages and recovery are for RUNNING
  runs only), and a resumed run's jobs carry a higher generation, which no stop covers.
* A covered job leaves the stream the first time an executor that knows the stop is
  handed it (acked, unrun). It is handed out again within a retry's delay (an hour at
  most), a breaker's deferral (an hour and a half) or a redelivery backoff (a day at
  most); a re-published copy is a new message, checked the same way.
* So it would still be there after 8 days only if the jobs consumer handed it to no
  executor for about a week: every executor down that long, or a backlog a week deep.
  The jobs stream rules that out: its max age (REDRIVE_JOBS_MAX_AGE_S, at most 7 days,
  below the bucket's 8-day TTL) has JetStream drop a job older than that, handed out or
  not, so no covered job outlives its stop, and this process may forget a stop with the
  bucket. (Its duplicate window, a day at most, only drops repeated publishes.) A dropped
  job of a stopped run is simply gone; one of a RUNNING run leaves the run quiet with no
  job in the stream, and the recovery sweep (services/coordinator/recovery.py)
  re-publishes it (a new message, of a higher generation).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import structlog
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE

from shared.kv import BucketMirror
from shared.subjects import Names
from services.coordinator.run_stops import TTL_S, ensure_bucket

log = structlog.get_logger(__name__)


class RunStops(BucketMirror):
    # Complete before the executor takes jobs: a stop written while it was down counts.
    label = "run-stops"

    def __init__(self, js: JetStreamContext, names: Names, replicas: int = 1, *, ttl_s: float = TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(js, names, replicas)
        self._ttl_s = ttl_s
        self._clock = clock
        # run id -> (stopped up to this generation, when the bucket stored the entry), oldest
        # first: the expired are found at the front.
        self._stopped: OrderedDict[str, tuple[int, float]] = OrderedDict()

    async def _bucket(self):
        return await ensure_bucket(self._js, self._names, self._replicas)

    def _apply(self, entry) -> None:
        if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
            self._stopped.pop(entry.key, None)
            return
        try:
            generation = int(entry.value)
        except ValueError:
            log.warning("run_stops.bad_entry", key=entry.key)
            return
        written = entry.created.timestamp() if entry.created is not None else self._clock()
        held = self._stopped.pop(entry.key, None)
        self._stopped[entry.key] = (max(held[0], generation) if held else generation, written)
        self._forget_expired()

    def _forget_expired(self) -> None:
        """Drop the entries the bucket has let go (the watcher is not told of an expiry).
        Entries come in the order the bucket stored them, so the expired are at the front."""
        oldest = self._clock() - self._ttl_s
        while self._stopped:
            key, (_, written) = next(iter(self._stopped.items()))
            if written > oldest:
                return
            del self._stopped[key]

    def stopped(self, run_id: str, generation: int) -> bool:
        # Asked once per job: expired stops are dropped as new ones come (and by held()), not
        # here. One kept a little longer only skips a job that a new executor would run.
        held = self._stopped.get(run_id)
        return held is not None and held[0] >= generation

    def held(self) -> int:
        """How many stops this process holds (those the bucket has let go excluded)."""
        self._forget_expired()
        return len(self._stopped)
