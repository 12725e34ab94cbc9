"""Live events (GET /api/v1/events) go to the clients of exactly one tenant: the one the
event's body names. Events published raw on the bus without a usable tenant, with a body
that is not a JSON object, or whose Redrive-Tenant header disagrees with the body reach
nobody, and the streams stay alive for the events that follow."""

from __future__ import annotations

import asyncio
import json

from structlog.testing import capture_logs

from tests.integration.test_gateway import _sse, gw  # noqa: F401  (gw: the gateway fixture)

FINAL = "run.completed"  # each client reads until its tenant's final event of this kind


async def _listen(gw, *who: str):
    """SSE clients (key names in gw["keys"]), connected; each reads until a FINAL event."""
    outs = [[] for _ in who]
    ready = [asyncio.Event() for _ in who]
    tasks = [asyncio.create_task(_sse(gw["http"], gw["keys"][key], out, connected, FINAL))
             for key, out, connected in zip(who, outs, ready)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 10)
    return outs, tasks


async def _publish(nc, messages) -> None:
    for subject, data, headers in messages:
        await nc.publish(subject, data if isinstance(data, bytes) else json.dumps(data).encode(), headers=headers)
    await nc.flush()


async def test_each_event_reaches_only_the_tenant_its_body_names_and_bad_ones_reach_nobody(gw):
    nc, names, acme, other = gw["nc"], gw["names"], gw["acme"], gw["other"]
    (mine, theirs), tasks = await _listen(gw, "member", "other")
    header = "Redrive-Tenant"
    secret_output = {"text": "acme's invoice: total 1234.56"}
    await _publish(nc, [
        # (1) well formed: header and body agree.
        (names.run_event("started"), {"tenant_id": acme, "run_id": "ok-acme"}, {header: acme}),
        # (2) no tenant anywhere (a breaker without its tenant).
        (names.breaker_event("open"), {"dependency": "ocr", "state": "open"}, None),
        # (3) tenant_id null.
        (names.run_event("failed"), {"tenant_id": None, "run_id": "null-tenant"}, None),
        # (4) a JSON array, even one holding a tenant's event.
        (names.run_event("failed"), [{"tenant_id": acme, "run_id": "array"}], None),
        # (5) not JSON at all, with or without a header.
        (names.file_event("failed"), b"not json at all", None),
        (names.file_event("failed"), b"not json at all", {header: acme}),
        # (6) header B, body A with A's file output: nobody, not B, not A.
        (names.file_event("succeeded"), {"tenant_id": acme, "run_id": "mismatch", "file_index": 0,
                                         "output": secret_output}, {header: other}),
        # A tenant only in the header, and tenant ids that are no non-empty string.
        (names.file_event("retrying"), {"run_id": "header-only", "attempt": 2}, {header: acme}),
        (names.run_event("failed"), {"tenant_id": "", "run_id": "empty-tenant"}, None),
        (names.run_event("failed"), {"tenant_id": [acme], "run_id": "list-tenant"}, None),
        (names.run_event("failed"), {"tenant_id": 7, "run_id": "number-tenant"}, None),
        # Final, well formed, one per tenant (acme's on several lines, without a header).
        (names.run_event("completed"), json.dumps({"tenant_id": acme, "run_id": "final-acme"}, indent=2).encode(),
         None),
        (names.run_event("completed"), {"tenant_id": other, "run_id": "final-other"}, {header: other}),
    ])
    await asyncio.wait_for(asyncio.gather(*tasks), 10)

    assert mine == [("run.started", {"tenant_id": acme, "run_id": "ok-acme"}),
                    ("run.completed", {"tenant_id": acme, "run_id": "final-acme"})]
    assert theirs == [("run.completed", {"tenant_id": other, "run_id": "final-other"})]


async def test_a_dropped_event_is_a_warning_with_the_subject_and_short_tenants_never_the_body(gw):
    nc, names, acme = gw["nc"], gw["names"], gw["acme"]
    (mine,), tasks = await _listen(gw, "member")
    secret = "SECRET-OUTPUT-OF-ACME"
    long_header = "B" * 500
    with capture_logs() as logs:
        await _publish(nc, [
            (names.file_event("succeeded"), {"tenant_id": acme, "output": secret}, {"Redrive-Tenant": long_header}),
            (names.file_event("failed"), f"{secret} is not json".encode(), None),
            (names.run_event("failed"), {"tenant_id": None, "output": secret}, None),
            (names.run_event("failed"), [secret], None),
            (names.run_event("completed"), {"tenant_id": acme, "run_id": "final"}, None),
        ])
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

    assert mine == [("run.completed", {"tenant_id": acme, "run_id": "final"})]
    dropped = [entry for entry in logs if entry["log_level"] == "warning" and entry["event"] == "events.dropped"]
    assert [entry["subject"] for entry in dropped] == [
        names.file_event("succeeded"), names.file_event("failed"), names.run_event("failed"),
        names.run_event("failed")]
    mismatch = dropped[0]
    assert mismatch["tenant"] == acme[:100] and mismatch["header_tenant"] == "B" * 100
    assert all(secret not in repr(entry) for entry in logs)
