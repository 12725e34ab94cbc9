"""Request bodies of the contract (api.md), shared by the gateway (which validates HTTP
bodies against them) and the coordinator (which validates what it is sent): one
definition, so the two edges cannot disagree about what is valid."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from shared.messages import RetryPolicy


# Unicode's Cc category is exactly these two ranges; with the line and paragraph separators,
# and the bidirectional embeddings, overrides and isolates, which reorder what a terminal
# shows around them (a name that reads as another). Marks (U+200E, U+200F) stay allowed.
# For pydantic's Rust regex: its ``$`` is the end of the text (Python's would also match
# before a final newline).
_CONTROLS = "\\x00-\\x1F\\x7F-\\x9F\\u2028\\u2029\\u202A-\\u202E\\u2066-\\u2069"
_CONTROL = re.compile(f"[{_CONTROLS}]")
# Names people read (a template's, a step's, a file's, and its url): shown one line each in
# listings, logs and operators' terminals, where an escape sequence would be obeyed. A
# pattern, checked in pydantic's own (Rust) code: a 100,000-file run pays nothing for it.
ONE_LINE = f"^[^{_CONTROLS}]*$"
ONE_LINE_MESSAGE = "must not contain control characters"


def control_character(text: str) -> str | None:
    """Why ``text`` cannot be a name shown one line each, or None (see ONE_LINE): where its
    first control character is."""
    found = _CONTROL.search(text)
    if found is None:
        return None
    return f"{ONE_LINE_MESSAGE} (U+{ord(found.group()):04X} at position {found.start() + 1})"


def field_errors(exc: ValidationError) -> dict[str, str]:
    """``{"files.3.name": why}`` for each error of a body (a 422's ``details.fields``)."""
    return {".".join(str(p) for p in e["loc"]) or "body": _said(e) for e in exc.errors()}


def _said(error: dict) -> str:
    if error["type"] == "string_pattern_mismatch" and (error.get("ctx") or {}).get("pattern") == ONE_LINE:
        return ONE_LINE_MESSAGE
    return error["msg"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepIn(_Body):
    name: str = Field(min_length=1, max_length=100, pattern=ONE_LINE)
    handler: str = Field(min_length=1, max_length=100, pattern=ONE_LINE)
    optional: bool = False
    timeout_s: float = Field(default=300, gt=0, le=24 * 3600)
    params: dict[str, Any] = Field(default_factory=dict)
    # Seed 004's per-operation retry limit: this step's automatic retries, in place of the
    # tenant's auto_retries (its backoff and breaker settings still apply).
    auto_retries: int | None = Field(default=None, ge=0, le=10)


# What a file may carry besides its name: what a step may need of every file (a handler's
# ``file_needs``, services/coordinator/file_needs.py).
FILE_FIELDS = ("url", "content_b64", "size", "sha256")


class FileIn(_Body):
    name: str = Field(min_length=1, max_length=1024, pattern=ONE_LINE)
    url: str | None = Field(default=None, max_length=4096, pattern=ONE_LINE)
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


# A template's steps travel in every job of its runs, beside the file: bounded so that a
# job always fits a message, and a tenant's template list a reply.
MAX_STEPS_BYTES = 64 * 1024


class TemplateBody(_Body):
    name: str = Field(min_length=1, max_length=200, pattern=ONE_LINE)
    steps: list[StepIn] = Field(min_length=1, max_length=50)
    credits_per_file: int = Field(default=1, ge=0, le=1_000_000)
    failure_policy: Literal["continue", "fail_fast"] = "continue"

    @field_validator("steps")
    @classmethod
    def _step_names_differ(cls, v: list[StepIn]) -> list[StepIn]:
        # Operators, the timeline and the dashboard tell steps apart by name.
        seen: set[str] = set()
        for step in v:
            if step.name in seen:
                raise ValueError(f"two steps are named {step.name[:100]!r}: each step needs its own name")
            seen.add(step.name)
        return v

    @field_validator("steps")
    @classmethod
    def _steps_fit_a_job(cls, v: list[StepIn]) -> list[StepIn]:
        size = len(orjson.dumps([s.model_dump() for s in v]))
        if size > MAX_STEPS_BYTES:
            raise ValueError(f"the steps take {size:,} bytes of JSON, more than {MAX_STEPS_BYTES:,} "
                             "(they travel in every job: pass large data by url)")
        return v


class RunBody(_Body):
    template_id: str = Field(min_length=1, max_length=200)
    files: list[FileIn] = Field(min_length=1, max_length=100_000)
    max_retry_count: int = Field(default=3, ge=1, le=10)
    mode: Literal["per_file", "batch"] = "per_file"


def _each_optional(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s fields, each with its type and bounds but None when left out."""
    return {name: (field.annotation | None, FieldInfo.merge_field_infos(field, default=None))
            for name, field in model.model_fields.items()}


class _SettingsFields(_Body):
    """PUT /settings/retry: the settings given replace the tenant's; those left out keep
    their current values (services/coordinator/commands/settings.py merges them and checks
    the whole: backoff_max_ms at least backoff_base_ms). Ranges: RetryPolicy's."""

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, v: Any) -> Any:
        if v is None:
            raise ValueError("must not be null: leave a setting out to keep its value")
        return v

    @field_validator("backoff_max_ms", check_fields=False)
    @classmethod
    def _max_at_least_base(cls, v: int | None, info: ValidationInfo) -> int | None:
        base = info.data.get("backoff_base_ms")
        if v is not None and base is not None and v < base:
            raise ValueError(f"must be >= backoff_base_ms ({base})")
        return v

    @model_validator(mode="after")
    def _some_setting(self) -> "_SettingsFields":
        if not self.given():
            raise ValueError(f"give at least one of {', '.join(RetryPolicy.model_fields)}")
        return self

    def given(self) -> dict[str, Any]:
        return {name: value for name in RetryPolicy.model_fields if (value := getattr(self, name)) is not None}


SettingsBody = create_model("SettingsBody", __base__=_SettingsFields, **_each_optional(RetryPolicy))


class RestoreBody(_Body):
    file_index: int | None = Field(default=None, ge=0)
    checkpoint_step: int = Field(ge=-1)
