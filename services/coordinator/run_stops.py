"""Stopping a run's queued jobs (fail_fast, cancel) without touching the job stream.

The coordinator writes "run R is stopped up to generation g" into a KV bucket, through the
outbox (a KV put is a publish to ``$KV.<bucket>.<key>``), in the transaction that stops the
run. Executors watch the bucket and skip (ack) jobs of generation <= g; a resumed run's new
jobs carry a higher generation and run.
"""

from __future__ import annotations

from typing import Any, Mapping

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType

from shared.kv import ensure_kv
from shared.subjects import Names
from services.coordinator import outbox

# Longer than the jobs stream's max age (REDRIVE_JOBS_MAX_AGE_S, at most 7 days), so no job
# outlives the stop that covers it (services/executor/run_stops.py). Kept so by
# tests/unit/test_jobs_max_age.py: lower this only with that setting's upper bound.
TTL_S = 8 * 24 * 3600


async def ensure_bucket(js: JetStreamContext, names: Names, replicas: int = 1):
    return await ensure_kv(js, KeyValueConfig(bucket=names.run_stops_bucket, history=1, ttl=TTL_S,
                                              storage=StorageType.FILE, replicas=replicas))


def stop_row(names: Names, run: Mapping[str, Any]) -> dict:
    generation = run["generation"]
    return outbox.row(names.run_stop_subject(run["id"]), f"{run['id']}:stop:{generation}", str(generation).encode())
