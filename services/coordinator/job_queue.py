"""What the jobs stream holds, for the recovery sweep: a job message still in it (queued,
in flight, or waiting for a redelivery; the stream is a work queue, so only acked and
terminated jobs leave it) is alive, and re-publishing it would run a second copy.

Job subjects are per tenant (messaging.md), so this is known per tenant, not per run: a
run whose job was lost waits for its tenant's other jobs to drain before the sweep
re-publishes it. That costs time, never a duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared.subjects import Names


async def tenants_with_jobs(js: JetStreamContext, names: Names, tenant_ids: Iterable[str]) -> set[str]:
    """The tenants among ``tenant_ids`` with at least one job message in the stream."""
    found = set()
    for tenant_id in set(tenant_ids):
        subject = names.job(tenant_id)
        info = await js.stream_info(names.jobs_stream, subjects_filter=subject)
        if (info.state.subjects or {}).get(subject):
            found.add(tenant_id)
    return found


async def undelivered(js: JetStreamContext, names: Names) -> int:
    """Jobs no executor has been given yet: a backlog means runs wait in line, not that
    they are stuck. With no executor consumer (no executor ever started, or it was deleted
    and no executor runs to declare it again: worker.py), every job in the stream is
    undelivered: the consumer, when declared, starts from the stream's first message."""
    try:
        return (await js.consumer_info(names.jobs_stream, names.executor_consumer)).num_pending or 0
    except NotFoundError:
        return (await js.stream_info(names.jobs_stream)).state.messages or 0
