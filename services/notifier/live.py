"""New notifications, pushed live: each goes once, on core NATS, to the gateways, which
hand it to the tenant's open event streams (SSE ``event: notification``).

Best effort by design: a stream that was not open, or a gateway that was away, misses it,
and the stored list (``GET /notifications``) has it. What is pushed is only what was
stored just now, so a redelivered event pushes nothing a second time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import structlog
from nats.aio.client import Client as NatsClient

from shared import tracing
from shared.subjects import Names
from services.notifier.repository import live_body

log = structlog.get_logger(__name__)

# (the notifications stored, the traceparent of the event behind each, by dedupe key)
Announce = Callable[[Sequence[Mapping[str, Any]], Mapping[str, str]], Awaitable[None]]


def announcer(nc: NatsClient, names: Names) -> Announce:
    async def announce(created: Sequence[Mapping[str, Any]], traces: Mapping[str, str]) -> None:
        for n in created:
            headers = {"Redrive-Tenant": n["tenant_id"], **({"Redrive-Run": n["run_id"]} if n["run_id"] else {})}
            # In its run's trace, as the event it tells of.
            if (trace_id := tracing.trace_id_of(traces.get(n["dedupe_key"]))) is not None:
                headers[tracing.HEADER] = tracing.traceparent(trace_id)
            try:
                await nc.publish(names.notifications_live, live_body(n), headers=headers)
            except Exception as exc:  # NATS away: it is stored, and listed
                log.warning("notifier.live_push_failed", error=repr(exc)[:300])
                return

    return announce


async def nobody(created: Sequence[Mapping[str, Any]], traces: Mapping[str, str]) -> None:
    """Where nothing is pushed (tests that call the handler alone)."""
