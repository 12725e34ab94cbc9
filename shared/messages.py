"""Message schemas: every body on the wire is one of these, JSON, with a ``v`` field.

Unknown fields are tolerated (``extra="ignore"``) so that a newer producer can add fields
without breaking an older consumer; removing or retyping a field needs a new ``v``. A ``v``
this release does not know is refused like any unreadable message (a job's files ERROR
with the cause, an event dropped and logged), never read as if it were ours: a release
that brings a new ``v`` deploys its consumers, reading both, before its producers.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.errors import MAX_MESSAGE_CHARS


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# An index, round, attempt or step: stored in PostgreSQL ``integer`` columns by whoever
# consumes the message. Refused here, where it is a clear validation error that terminates
# the one message, rather than there, where it would fail the whole batch's transaction.
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
FileStatus = Literal["PENDING", "SUCCEEDED", "FAILED", "ERROR", "SKIPPED", "CANCELLED"]
# Ids on the wire. Ours are short (a run id is at most 64 characters, a job id under 100);
# a longer one is a broken or forged message, refused where it is read: a 1 MB job id made
# the executor's event (id in body and header) too large for the server, which then closed
# the executor's connection for good.
Id = Annotated[str, Field(min_length=1, max_length=200)]
TenantId = Annotated[str, Field(min_length=1, max_length=64)]
# An amount of credits: PostgreSQL ``bigint`` wherever it is stored (a run of 3,000 files at
# 1,000,000 credits each costs more than an ``integer`` holds).
Credits = Annotated[int, Field(ge=0, le=2**63 - 1)]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)
    v: Literal[1] = 1  # checked in pydantic's own code: nothing per message in ours

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def from_bytes(cls, data: bytes):
        return cls.model_validate_json(data)


# ---- the job ---------------------------------------------------------------------------

class StepSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    handler: str
    optional: bool = False
    timeout_s: float = 300
    params: dict[str, Any] = Field(default_factory=dict)
    auto_retries: int | None = None  # this step's own limit, in place of the tenant's


class FileSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    index: Count
    name: str
    url: str | None = None
    content_b64: str | None = None
    size: int | None = None
    sha256: str | None = None
    start_step: Count = 0
    previous_output: dict[str, Any] | None = None


class RetryPolicy(BaseModel):
    """Per-tenant automatic retry and breaker settings, copied into every job."""

    model_config = ConfigDict(extra="ignore")
    auto_retries: int = Field(default=3, ge=0, le=10)
    backoff_base_ms: int = Field(default=500, ge=10, le=60_000)
    backoff_max_ms: int = Field(default=30_000, ge=10, le=3_600_000)
    jitter: bool = True
    breaker_failure_threshold: int = Field(default=5, ge=1, le=100)
    breaker_reset_s: int = Field(default=30, ge=1, le=3600)


class Job(Message):
    job_id: Id
    run_id: Id
    tenant_id: TenantId
    template_id: Id
    mode: Literal["per_file", "batch"] = "per_file"
    round: Count
    file_index: Count | None = None  # per_file mode
    start_step: Count = 0
    # messaging.md: a per_file job carries its ``file``; a batch job carries ``files``, every
    # file of its round. (A per_file job with a one-element ``files``, as published before
    # 0.2, is still read.) ``every_file`` is the list either way.
    file: FileSpec | None = None
    files: list[FileSpec] = Field(default_factory=list)
    steps: list[StepSpec] = Field(min_length=1)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    idempotency_key: Id
    # The run's generation when the job was published: a run stopped at generation g
    # (fail_fast, cancel) skips its jobs of generation <= g; resuming raises it.
    generation: int = 0

    @model_validator(mode="after")
    def _runnable(self) -> "Job":
        # What the executor relies on without checking again: a job that breaks these would
        # crash it mid-job (and come back until max deliver) instead of being refused.
        if self.file is not None and (self.files or self.mode == "batch"):
            raise ValueError("a batch job carries files, a per_file job one file, never both")
        carried = self.every_file
        if not carried:
            raise ValueError("the job carries no file (neither file nor files)")
        if self.mode == "per_file" and len(carried) != 1:
            raise ValueError(f"a per_file job carries exactly one file, not {len(carried)}")
        if self.mode == "per_file" and self.file_index not in (None, carried[0].index):
            raise ValueError(f"the job names file {self.file_index} but carries file {carried[0].index}")
        for f in carried:
            if f.start_step > len(self.steps):  # == len: restored after its last step, nothing left to run
                raise ValueError(f"file {f.index} starts at step {f.start_step} of {len(self.steps)}")
        # Its events are deduped by ids built from the job id: one that names another run,
        # file or round would take the place of that job's real results.
        expected = job_id_for(self.run_id, carried[0].index if self.mode == "per_file" else None, self.round)
        if self.job_id != expected:
            raise ValueError(f"job_id is not this job's ({expected[:200]}): it names another run, file or round")
        return self

    @property
    def every_file(self) -> list[FileSpec]:
        """The files this job runs: its ``file`` (per_file) or its ``files`` (batch)."""
        return [self.file] if self.file is not None else self.files


def job_id_for(run_id: str, file_index: int | None, round_: int) -> str:
    if file_index is None:
        return f"{run_id}:batch:r{round_}"
    return f"{run_id}:file:{file_index}:r{round_}"


# ---- file events (executor -> coordinator, notifier) -------------------------------------

# "deferred" (an addition to messaging.md): the file waits for a dependency whose breaker
# is open; sent once per run and open period, not per deferral (see job_runner).
FileEventKind = Literal["succeeded", "failed", "errored", "retrying", "checkpoint", "deferred"]


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    error_class: str = Field(alias="class")
    message: str
    transient: bool

    @field_validator("error_class", "message")
    @classmethod
    def _bounded(cls, v: str, info) -> str:
        # Whoever sent it (executors cut theirs already: shared/errors.py), a file's error is
        # stored, listed and notified: cut rather than refuse, the result still counts.
        limit = 200 if info.field_name == "error_class" else MAX_MESSAGE_CHARS
        return v if len(v) <= limit else v[:limit - 1] + "…"

    def as_dict(self) -> dict[str, Any]:
        return {"class": self.error_class, "message": self.message, "transient": self.transient}


class FileEvent(Message):
    kind: FileEventKind
    job_id: Id
    run_id: Id
    tenant_id: TenantId
    file_index: Count
    round: Count
    attempt: Count
    step: Count  # index of the step the event is about
    step_name: str | None = None
    error: ErrorInfo | None = None
    next_delay_ms: int | None = Field(default=None, ge=0, le=86_400_000)  # a day at most: backoffs cap at an hour
    output: dict[str, Any] | None = None
    # deferred: the dependency the file waits for, and when its breaker opened.
    dependency: str | None = Field(default=None, max_length=500)
    breaker_opened_at: datetime | None = None
    at: datetime = Field(default_factory=utcnow)

    @property
    def msg_id(self) -> str:
        if self.kind == "deferred":  # one per run and open period, whichever executor tells it
            opened = int(self.breaker_opened_at.timestamp() * 1000) if self.breaker_opened_at else 0
            return f"{self.run_id}:deferred:{self.dependency}:{opened}"
        # A batch job reports on many files: its ids also name the file.
        job = self.job_id if ":file:" in self.job_id else f"{self.job_id}:{self.file_index}"
        return f"{job}:{self.kind}:{self.step}:{self.attempt}"

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True, by_alias=True))


# ---- run and breaker events (coordinator/executor -> notifier, gateway SSE) -------------

class RunEvent(Message):
    kind: str
    run_id: Id
    tenant_id: TenantId
    round: Count
    status: str
    counts: dict[str, int] = Field(default_factory=dict)
    message: str | None = None
    file_index: Count | None = None
    at: datetime = Field(default_factory=utcnow)

    @property
    def msg_id(self) -> str:
        suffix = f":{self.file_index}" if self.file_index is not None else ""
        return f"{self.run_id}:run:{self.kind}:r{self.round}{suffix}"


class BreakerEvent(Message):
    tenant_id: str  # breakers are per tenant and dependency (services/executor/breakers.py)
    dependency: str
    state: Literal["closed", "open", "half_open"]
    failures: int = 0
    opened_at: datetime | None = None
    next_probe_at: datetime | None = None
    at: datetime = Field(default_factory=utcnow)


# ---- request / reply envelope ------------------------------------------------------------

class ServiceError(Exception):
    """A refusal a service sends back to its caller: a code, a sentence, details."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


def ok_reply(data: Any) -> bytes:
    return orjson.dumps({"ok": True, "data": data}, default=_json_default)


def error_reply(error: ServiceError) -> bytes:
    return orjson.dumps({"ok": False, "error": error.as_dict()}, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_json_default)
