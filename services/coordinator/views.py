"""How a run looks to the outside (api.md "Run body")."""

from __future__ import annotations

from typing import Any, Mapping

from shared.tracing import run_trace_id

COUNT_FIELDS = ("total", "pending", "succeeded", "failed", "errored", "skipped", "cancelled")


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


def run_view(run: Mapping[str, Any], files: list[Mapping[str, Any]] | None = None,
             optional_steps: frozenset[int] = frozenset()) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": run["id"],
        "tenant_id": run["tenant_id"],
        "template_id": run["template_id"],
        "status": run["status"],
        "mode": run["mode"],
        "round": run["round"],
        "max_retry_count": run["max_retry_count"],
        "counts": {name: run[name] for name in COUNT_FIELDS},
        "credits": {
            "consumed": run["credits_consumed"],
            "from_monthly": run["credits_from_monthly"],
            "from_purchased": run["credits_from_purchased"],
            "refunded": run["credits_refunded"],
        },
        "needs_attention": run["needs_attention"],
        # In a recovery, not yet finished: re-published, or (noticed) its jobs coming back from a dead executor.
        "recovering": run["recovering"] or run.get("recovery_noticed", False),
        "attention_reason": run["attention_reason"],
        "created_at": _iso(run["created_at"]),
        "updated_at": _iso(run["updated_at"]),
        "finished_at": _iso(run["finished_at"]),
        # The W3C trace id every message of the run carries (shared/tracing.py).
        "trace_id": run_trace_id(run["id"], run.get("trace_id")),
    }
    if files is not None:
        body["files"] = [file_view(f, optional_steps) for f in files]
    return body


def optional_steps(steps: list[Mapping[str, Any]]) -> frozenset[int]:
    """The indexes of a template's optional steps."""
    return frozenset(i for i, step in enumerate(steps) if step.get("optional"))


def skippable(f: Mapping[str, Any], optional: frozenset[int]) -> bool:
    """A FAILED or ERROR file whose failed step is optional: what Skip accepts."""
    return f["status"] in ("FAILED", "ERROR") and f.get("failed_step") in optional


def file_view(f: Mapping[str, Any], optional_steps: frozenset[int] = frozenset()) -> dict[str, Any]:
    return {
        "index": f["idx"],
        "name": f["name"],
        "status": f["status"],
        "retry_attempt": f["retry_attempt"],
        "attempts": f["attempts"],
        "checkpoint_step": f["checkpoint_step"],
        "last_error": f["last_error"],
        "output": f["output"],
        "skippable": skippable(f, optional_steps),
    }


def template_view(t: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": t["id"],
        "tenant_id": t["tenant_id"],
        "name": t["name"],
        "steps": t["steps"],
        "credits_per_file": t["credits_per_file"],
        "failure_policy": t["failure_policy"],
        "created_at": _iso(t["created_at"]),
        "archived": t["archived_at"] is not None,
    }
