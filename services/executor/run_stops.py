"""The executor's view of stopped runs (see services/coordinator/run_stops.py): a local
copy of the KV bucket, kept fresh by a watcher, so the check per job is a dict lookup."""

from __future__ import annotations

import structlog
from nats.js import JetStreamContext

from shared.kv import BucketMirror
from shared.subjects import Names
from services.coordinator.run_stops import ensure_bucket

log = structlog.get_logger(__name__)


class RunStops(BucketMirror):
    # Complete before the executor takes jobs: a stop written while it was down counts.
    label = "run-stops"

    def __init__(self, js: JetStreamContext, names: Names, replicas: int = 1) -> None:
        super().__init__(js, names, replicas)
        self._stopped: dict[str, int] = {}

    async def _bucket(self):
        return await ensure_bucket(self._js, self._names, self._replicas)

    def _apply(self, entry) -> None:
        if entry.value:
            try:
                self._stopped[entry.key] = max(self._stopped.get(entry.key, -1), int(entry.value))
            except ValueError:
                log.warning("run_stops.bad_entry", key=entry.key)

    def stopped(self, run_id: str, generation: int) -> bool:
        return self._stopped.get(run_id, -1) >= generation
