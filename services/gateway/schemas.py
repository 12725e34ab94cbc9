"""HTTP request bodies (api.md), validated at the edge: 422 with field errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.coordinator.schemas import FileIn, StepIn
from shared.messages import RetryPolicy


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TemplateBody(_Body):
    name: str = Field(min_length=1, max_length=200)
    steps: list[StepIn] = Field(min_length=1, max_length=50)
    credits_per_file: int = Field(default=1, ge=0, le=1_000_000)
    failure_policy: Literal["continue", "fail_fast"] = "continue"


class RunBody(_Body):
    template_id: str = Field(min_length=1)
    files: list[FileIn] = Field(min_length=1, max_length=100_000)
    max_retry_count: int = Field(default=3, ge=1, le=10)
    mode: Literal["per_file", "batch"] = "per_file"


class SettingsBody(RetryPolicy):
    model_config = ConfigDict(extra="forbid")

    @field_validator("backoff_max_ms")
    @classmethod
    def _max_at_least_base(cls, v: int, info) -> int:
        base = info.data.get("backoff_base_ms")
        if base is not None and v < base:
            raise ValueError("must be >= backoff_base_ms")
        return v


class GrantBody(_Body):
    purchased: int = Field(ge=1, le=100_000_000)


class WebhookBody(_Body):
    url: str = Field(pattern=r"^https?://", max_length=2000)
    secret: str = Field(min_length=16, max_length=200)


class RestoreBody(_Body):
    file_index: int | None = Field(default=None, ge=0)
    checkpoint_step: int = Field(ge=-1)


def field_errors(exc) -> dict[str, Any]:
    return {"fields": {".".join(str(p) for p in e["loc"]) or "body": e["msg"] for e in exc.errors()}}
