"""Turning files that need work into job messages (as outbox rows)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from shared.bus import headers_for
from shared.messages import FileSpec, Job, RetryPolicy, StepSpec, job_id_for
from shared.subjects import Names
from services.coordinator import outbox


def file_spec(f: Mapping[str, Any]) -> FileSpec:
    checkpoint = f.get("checkpoint_step")
    return FileSpec(
        index=f["idx"],
        name=f["name"],
        url=f.get("url"),
        content_b64=f.get("content_b64"),
        size=f.get("size"),
        sha256=f.get("sha256"),
        # Resume after the last completed step, with its output: never redo a step.
        start_step=0 if checkpoint is None else checkpoint + 1,
        previous_output=f.get("checkpoint_output"),
    )


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
    steps = [StepSpec.model_validate(s) for s in template["steps"]]
    specs = [file_spec(f) for f in files]
    if not specs:
        return []
    common = dict(
        run_id=run["id"], tenant_id=run["tenant_id"], template_id=run["template_id"], mode=run["mode"],
        round=run["round"], steps=steps, retry=policy,
    )
    subject = names.job(run["tenant_id"])
    if run["mode"] == "batch":
        job_id = job_id_for(run["id"], None, run["round"])
        jobs = [Job(job_id=job_id, files=specs, start_step=0, idempotency_key=job_id, **common)]
    else:
        jobs = []
        for spec in specs:
            job_id = job_id_for(run["id"], spec.index, run["round"])
            jobs.append(
                Job(job_id=job_id, file_index=spec.index, start_step=spec.start_step, files=[spec],
                    idempotency_key=job_id, **common)
            )
    return [
        outbox.row(subject, job.job_id + msg_suffix, job.to_bytes(), headers_for(job.job_id, run["tenant_id"], run["id"]))
        for job in jobs
    ]
