"""Turning files that need work into job messages (as outbox rows).

Jobs are built as plain dicts and serialised once with orjson: a 10,000-file run makes
10,000 of them inside the creating transaction. tests/unit/test_wire.py checks that what
is built here parses as :class:`shared.messages.Job`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import orjson

from shared.bus import headers_for
from shared.messages import RetryPolicy, StepSpec, job_id_for
from shared.subjects import Names
from services.coordinator import outbox

_FILE_FIELDS = ("url", "content_b64", "size", "sha256")


def file_spec(f: Mapping[str, Any]) -> dict[str, Any]:
    spec = {"index": f["idx"], "name": f["name"]}
    for field in _FILE_FIELDS:
        if f.get(field) is not None:
            spec[field] = f[field]
    checkpoint = f.get("checkpoint_step")
    # Resume after the last completed step, with its output: never redo a step.
    spec["start_step"] = 0 if checkpoint is None else checkpoint + 1
    if f.get("checkpoint_output") is not None:
        spec["previous_output"] = f["checkpoint_output"]
    return spec


def job_rows(
    names: Names,
    run: Mapping[str, Any],
    template: Mapping[str, Any],
    files: Iterable[Mapping[str, Any]],
    policy: RetryPolicy,
    *,
    msg_suffix: str = "",
) -> list[dict]:
    """Outbox rows for the given files of ``run`` in its current round.

    ``msg_suffix`` is empty for a round's first publication (so a repeated publish is
    deduped by JetStream); recovery adds one because the original message may be long gone
    (acked or terminated) while the dedupe window still remembers its id.
    """
    specs = [file_spec(f) for f in files]
    if not specs:
        return []
    common = {
        "v": 1, "run_id": run["id"], "tenant_id": run["tenant_id"], "template_id": run["template_id"],
        "mode": run["mode"], "round": run["round"], "generation": run.get("generation", 0),
        "steps": [StepSpec.model_validate(s).model_dump() for s in template["steps"]],
        "retry": policy.model_dump(),
    }
    if run["mode"] == "batch":
        job_id = job_id_for(run["id"], None, run["round"])
        jobs = [(job_id, {**common, "job_id": job_id, "start_step": 0, "files": specs, "idempotency_key": job_id})]
    else:
        jobs = []
        for spec in specs:
            job_id = job_id_for(run["id"], spec["index"], run["round"])
            jobs.append((job_id, {**common, "job_id": job_id, "file_index": spec["index"], "start_step": spec["start_step"],
                                  "files": [spec], "idempotency_key": job_id}))
    subject = names.job(run["tenant_id"])
    return [
        outbox.row(subject, job_id + msg_suffix, orjson.dumps(body), headers_for(job_id, run["tenant_id"], run["id"]))
        for job_id, body in jobs
    ]
