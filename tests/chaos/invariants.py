"""The one invariant checker every chaos scenario ends with."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import orjson

from tests.stack import Stack, counts_add_up

TERMINAL = {"SUCCEEDED", "FAILED", "ERROR", "SKIPPED", "CANCELLED"}


async def wait_all_terminal(stack: Stack, tenant: str, run_ids: list[str], timeout: float = 90) -> float:
    """Seconds until every run left RUNNING (or raise)."""
    started = time.monotonic()
    for run_id in run_ids:
        await stack.wait_run(tenant, run_id, timeout=max(1.0, timeout - (time.monotonic() - started)))
    return time.monotonic() - started


async def checkpoint_events(stack: Stack) -> list[dict]:
    sub = await stack.js.pull_subscribe(f"{stack.names.prefix}.events.file.checkpoint", stream=stack.names.events_stream)
    events = []
    while True:
        try:
            msgs = await sub.fetch(500, timeout=0.5)
        except Exception:
            break
        events += [orjson.loads(m.data) for m in msgs]
    await sub.unsubscribe()
    return events


async def check(stack: Stack, tenant: str, run_ids: list[str], *, step_log: Path | None = None) -> dict:
    """Asserts the invariants; returns the figures (files lost, double charges)."""
    lost = 0
    for run_id in run_ids:
        run = await stack.run(tenant, run_id)
        assert counts_add_up(run), run["counts"]
        not_terminal = [f for f in run["files"] if f["status"] not in TERMINAL]
        if not_terminal and not run["needs_attention"]:
            lost += len(not_terminal)
        timeline = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run_id))["items"]
        fan_ins = Counter(e["details"].get("round") for e in timeline
                          if e["kind"] in ("run_completed", "run_completed_with_errors"))
        assert all(n == 1 for n in fan_ins.values()), fan_ins
    ledger = await stack.ledger(tenant)
    charges = Counter(e["idempotency_key"] for e in ledger if e["kind"] == "charge")
    double = sum(n - 1 for n in charges.values() if n > 1)
    await stack.assert_books_balance(tenant)
    reruns: list = []
    if step_log is not None and step_log.exists():
        starts = [json.loads(line) for line in step_log.read_text().splitlines() if line.strip()]
        for event in await checkpoint_events(stack):
            at = datetime.fromisoformat(event["at"]).timestamp()
            reruns += [(event["file_index"], event["step"], at, s["step"], s["t"]) for s in starts
                       if s["run"] == event["run_id"] and s["file"] == event["file_index"]
                       and s["round"] == event["round"] and s["step"] <= event["step"] and s["t"] > at + 0.001]
    rerun_before_checkpoint = len(reruns)
    assert lost == 0, f"{lost} file(s) lost"
    assert double == 0, f"{double} double charge(s)"
    assert rerun_before_checkpoint == 0, f"{rerun_before_checkpoint} step(s) before a checkpoint ran again: {reruns[:5]}"
    return {"files_lost": lost, "double_charges": double, "steps_rerun_before_checkpoint": rerun_before_checkpoint}
