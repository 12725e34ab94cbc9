"""A job message that does not parse as a Job: why, in words, and the ERROR events of the
files it names (what the executor publishes before it terminates the message)."""

from __future__ import annotations

import orjson
from pydantic import ValidationError

from shared.messages import ErrorInfo, FileEvent, job_id_for


def error_events(data: bytes, exc: ValidationError) -> tuple[str, list[FileEvent]]:
    """(the cause, an ``errored`` event for every file the message names). None when it
    names no file of a run we could tell (not JSON, no run, an index out of range…)."""
    cause = invalid_job_cause(exc)
    try:
        raw = orjson.loads(data)
        error = ErrorInfo.model_validate({"class": "InvalidJob", "message": cause, "transient": False})
        round_ = raw.get("round", 0)
        # Under the file's own job id, whatever the message claimed: the coordinator takes
        # events only under the job id of their run, file and round.
        return cause, [FileEvent(kind="errored", job_id=job_id_for(str(raw["run_id"]), index, round_),
                                 run_id=str(raw["run_id"]), tenant_id=str(raw["tenant_id"]), file_index=index,
                                 round=round_, attempt=1, step=raw.get("start_step", 0), error=error)
                       for index in named_files(raw)]
    except Exception:  # nobody to tell: the job is only logged
        return cause, []


def invalid_job_cause(exc: ValidationError) -> str:
    """``"steps: Field required; mode: Input should be 'per_file' or 'batch'"``: each bad
    field and why, without echoing the (possibly large) input back."""
    parts = [f"{'.'.join(str(p) for p in err['loc']) or 'job'}: {err['msg']}" for err in exc.errors()]
    return f"the job cannot be read: {'; '.join(parts)}"[:500]


def named_files(raw: dict) -> list[int]:
    """The files an unreadable job is about: never a guess (a job without a readable
    ``file_index``, ``file`` or ``files`` names none, and errors none)."""
    if isinstance(raw.get("file_index"), int) and not isinstance(raw["file_index"], bool):
        return [raw["file_index"]]
    file = raw.get("file")
    if isinstance(file, dict) and isinstance(file.get("index"), int) and not isinstance(file["index"], bool):
        return [file["index"]]
    files = raw.get("files")
    if not isinstance(files, list):
        return []
    return [f["index"] for f in files if isinstance(f, dict) and isinstance(f.get("index"), int)
            and not isinstance(f["index"], bool)]
