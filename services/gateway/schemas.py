"""What the gateway validates before forwarding: request bodies, query strings and path
parameters of api.md, and the shape of a 422's field errors.

The bodies the coordinator also validates live in ``shared/requests.py`` (one
definition, so that the two edges cannot disagree about what is valid) and are
re-exported here; the rest are the gateway's own.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.messages import ServiceError
from shared.requests import RestoreBody, RunBody, SettingsBody, TemplateBody

__all__ = [
    "TemplateBody", "RunBody", "SettingsBody", "RestoreBody", "GrantBody", "WebhookBody",
    "RunsQuery", "PageQuery", "NotificationsQuery", "field_errors", "validate", "path_params",
]

RUN_STATUSES = ("RUNNING", "COMPLETED", "COMPLETED_WITH_ERRORS", "FAILED", "CANCELLED")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GrantBody(_Body):
    purchased: int = Field(ge=1, le=100_000_000)


class WebhookBody(_Body):
    # Same bounds as the notifier's PutWebhook (it validates again).
    url: str = Field(pattern=r"^https?://", max_length=2000)
    secret: str = Field(min_length=16, max_length=200)


class _Query(BaseModel):
    # Unknown query parameters (cache busters…) are ignored, not refused.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class PageQuery(_Query):
    limit: int | None = Field(default=None, ge=1, le=500)
    cursor: str | None = Field(default=None, max_length=500)


class RunsQuery(PageQuery):
    status: str | None = None
    needs_attention: bool | None = None

    @field_validator("status")
    @classmethod
    def _known_status(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if v.upper() not in RUN_STATUSES:
            raise ValueError(f"must be one of {', '.join(RUN_STATUSES)}")
        return v.upper()


class RunFilesQuery(_Query):
    """A page of a run's files (a run body carries at most 1,000: replies cross NATS)."""

    file_offset: int | None = Field(default=None, ge=0)
    file_limit: int | None = Field(default=None, ge=1, le=1000)


class NotificationsQuery(_Query):
    unread_only: bool | None = Field(default=None, validation_alias="unread")
    limit: int | None = Field(default=None, ge=1, le=200)
    cursor: str | None = Field(default=None, max_length=500)


# Path parameters that are not plain strings.
INT_PATH_PARAMS = frozenset({"file_index"})


def field_errors(exc: ValidationError) -> dict[str, Any]:
    return {"fields": {".".join(str(p) for p in e["loc"]) or "body": e["msg"] for e in exc.errors()}}


def validate(model: type[BaseModel], data: Any, what: str) -> dict[str, Any]:
    """The validated fields (None left out), or a 422 ``validation_error`` naming them."""
    try:
        return model.model_validate(data).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise ServiceError("validation_error", f"the {what} is not valid", field_errors(exc)) from None


def path_params(match_info: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(match_info)
    for name in INT_PATH_PARAMS & out.keys():
        value = out[name]
        if not (value.isascii() and value.isdigit()) or len(value) > 9:
            raise ServiceError("validation_error", f"{name} must be a non-negative integer",
                               {"fields": {name: "must be a non-negative integer"}})
        out[name] = int(value)
    return out
