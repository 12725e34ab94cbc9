"""Requests the coordinator accepts (validated at its edge; the gateway validates too)."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.messages import RetryPolicy


class Caller(BaseModel):
    """Who asks: the gateway resolved the tenant (X-Tenant-Id for platform admins)."""

    model_config = ConfigDict(extra="ignore")
    tenant_id: str = Field(min_length=1, max_length=64)
    actor: str = "system"


class StepIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    handler: str = Field(min_length=1, max_length=100)
    optional: bool = False
    timeout_s: float = Field(default=300, gt=0, le=24 * 3600)
    params: dict[str, Any] = Field(default_factory=dict)


class CreateTemplate(Caller):
    name: str = Field(min_length=1, max_length=200)
    steps: list[StepIn] = Field(min_length=1, max_length=50)
    credits_per_file: int = Field(default=1, ge=0, le=1_000_000)
    failure_policy: Literal["continue", "fail_fast"] = "continue"


class TemplateRef(Caller):
    template_id: str


class FileIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=1024)
    url: str | None = Field(default=None, max_length=4096)
    content_b64: str | None = None
    size: int | None = Field(default=None, ge=0)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")

    @field_validator("content_b64")
    @classmethod
    def _is_base64(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("content_b64 is not valid base64")
        return v


class CreateRun(Caller):
    run_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{8,64}$")
    template_id: str
    files: list[FileIn] = Field(min_length=1)
    max_retry_count: int = Field(default=3, ge=1, le=10)
    mode: Literal["per_file", "batch"] = "per_file"


class RunRef(Caller):
    run_id: str


class FileRef(RunRef):
    file_index: int = Field(ge=0)


class Restore(RunRef):
    file_index: int | None = Field(default=None, ge=0)
    checkpoint_step: int = Field(ge=-1)


class ListRuns(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tenant_id: str | None = None  # None: every tenant (platform admin)
    status: str | None = None
    needs_attention: bool | None = None
    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = None


class PutSettings(Caller, RetryPolicy):
    @model_validator(mode="after")
    def _max_at_least_base(self) -> "PutSettings":
        if self.backoff_max_ms < self.backoff_base_ms:
            raise ValueError("backoff_max_ms must be >= backoff_base_ms")
        return self
