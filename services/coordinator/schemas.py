"""Requests the coordinator accepts: the contract's bodies (shared/requests.py) plus who
asks. Validated here too: the coordinator trusts no caller, the gateway included."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shared.messages import Count, FileStatus
from shared.opaque_cursor import TOKEN_PATTERN
from shared.requests import FileIn, RestoreBody, RunBody, SettingsBody, TemplateBody


class Caller(BaseModel):
    """Who asks: the gateway resolved the tenant (X-Tenant-Id for platform admins)."""

    model_config = ConfigDict(extra="ignore")
    tenant_id: str = Field(min_length=1, max_length=64)
    actor: str = "system"


class CreateTemplate(TemplateBody, Caller):
    model_config = ConfigDict(extra="ignore")


class ListTemplates(Caller):
    limit: int = Field(default=100, ge=1, le=500)
    cursor: str | None = None


class TemplateRef(Caller):
    template_id: str


_UPLOAD_ID = r"^[A-Za-z0-9_-]{8,64}$"


class StageFiles(Caller):
    """A part of a run's files sent ahead (commands/staged_files.py)."""

    upload_id: str = Field(pattern=_UPLOAD_ID)
    offset: Count  # the index of the part's first file in the run
    files: list[FileIn] = Field(min_length=1, max_length=100_000)


class StagedRef(BaseModel):
    upload_id: str = Field(pattern=_UPLOAD_ID)
    count: int = Field(ge=1, le=1_000_000)


class CreateRun(RunBody, Caller):
    model_config = ConfigDict(extra="ignore")
    # Chosen by the gateway from an Idempotency-Key, so a repeated request finds its run.
    run_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{8,64}$")
    # The files inline, or (a body too large for one message) sent ahead and named here.
    files: list[FileIn] = Field(default_factory=list, max_length=100_000)
    staged: StagedRef | None = None  # one or the other: create_run checks


class RunRef(Caller):
    run_id: str


class Keyed(BaseModel):
    """A command applied once per use of an Idempotency-Key: the gateway's name for that
    use (requests_applied.py). None: no key was given."""

    request_id: str | None = Field(default=None, min_length=1, max_length=400)


class RetryFailed(RunRef, Keyed):
    pass


class CancelRun(RunRef, Keyed):
    pass


class GetRun(RunRef):
    file_offset: Count = 0  # Count: within PostgreSQL integer, or the query fails, not the request
    file_limit: int = Field(default=1000, ge=1, le=1000)
    file_status: list[FileStatus] | None = Field(default=None, min_length=1, max_length=6)  # only these


class TimelinePage(RunRef):
    limit: int = Field(default=1000, ge=1, le=1000)
    cursor: str | None = Field(default=None, pattern=TOKEN_PATTERN)  # opaque: commands/queries.get_timeline


class FileRef(RunRef):
    file_index: Count


class RetryFile(FileRef, Keyed):
    pass


class Restore(RestoreBody, RunRef):
    model_config = ConfigDict(extra="ignore")


class ListRuns(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tenant_id: str | None = None  # None: every tenant (platform admin)
    status: str | None = None
    needs_attention: bool | None = None
    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = None


class PutSettings(SettingsBody, Caller):
    model_config = ConfigDict(extra="ignore")
