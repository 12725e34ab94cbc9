"""What the gateway validates before forwarding: request bodies, query strings and path
parameters of api.md, and the shape of a 422's field errors.

The bodies the coordinator also validates live in ``shared/requests.py`` (one
definition, so that the two edges cannot disagree about what is valid) and are
re-exported here; the rest are the gateway's own.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from multidict import MultiMapping
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.messages import FileStatus, ServiceError
from shared.requests import RestoreBody, RunBody, SettingsBody, TemplateBody, field_errors

__all__ = [
    "TemplateBody", "RunBody", "SettingsBody", "RestoreBody", "GrantBody", "WebhookBody",
    "RunsQuery", "PageQuery", "NotificationsQuery", "field_errors", "unstorable", "validate", "path_params",
]

RUN_STATUSES = ("RUNNING", "COMPLETED", "COMPLETED_WITH_ERRORS", "FAILED", "CANCELLED")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GrantBody(_Body):
    purchased: int = Field(ge=1, le=100_000_000)


class WebhookBody(_Body):
    # Same bounds as the notifier's PutWebhook (it validates again).
    url: str = Field(pattern=r"(?i)^https?://", max_length=2000)  # schemes are case-insensitive (RFC 3986)
    secret: str = Field(min_length=16, max_length=200)


class _Query(BaseModel):
    # Unknown query parameters (cache busters…) are ignored, not refused.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        # api.md writes its queries as templates (``?status=&limit=&cursor=``): a client that
        # fills in only some of them sends the rest empty, which means "not given".
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v != ""}
        return data


def page_size(largest: int) -> Any:
    """A ``limit``: at least 1; above ``largest`` it counts as ``largest`` (api.md sets no
    bound, so a client asking for more gets a full page and a cursor, not a refusal)."""
    return Annotated[int, Field(ge=1, description=f"at most {largest} items come back; a larger value counts as {largest}"),
                     AfterValidator(lambda v: min(v, largest))]


class PageQuery(_Query):
    limit: page_size(500) | None = None
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

    file_offset: int | None = Field(default=None, ge=0, le=2**31 - 1)  # a PostgreSQL integer: beyond, the query fails
    file_limit: page_size(1000) | None = None
    # Only files in these statuses, comma-separated: ?file_status=FAILED,ERROR
    file_status: list[FileStatus] | None = Field(default=None, min_length=1, max_length=6)

    @field_validator("file_status", mode="before")
    @classmethod
    def _comma_separated(cls, v: Any) -> Any:
        return [part.strip().upper() for part in v.split(",") if part.strip()] if isinstance(v, str) else v


class NotificationsQuery(_Query):
    # Sent on as unread_only: true, the unread ones only; false, the read ones only; unset, all.
    unread_only: bool | None = Field(default=None, validation_alias="unread",
                                     description="true: unread ones only; false: read ones only; unset: all")
    limit: page_size(200) | None = None
    cursor: str | None = Field(default=None, max_length=500)


class TimelineQuery(_Query):
    limit: page_size(1000) | None = None
    cursor: str | None = Field(default=None, max_length=30)


class DeliveriesQuery(_Query):
    status: Literal["pending", "delivered", "failed"] | None = None
    limit: page_size(200) | None = None
    cursor: str | None = Field(default=None, max_length=200)  # (created_at, public id) of the last one, base64


# Path parameters that are not plain strings, with their largest value (the column's type).
# Not delivery_id: a delivery's public id is a UUID string (the notifier's 404 for any other).
INT_PATH_PARAMS = {"file_index": 2**31 - 1}


# Beyond 64 bits a number cannot be sent on by orjson, and once jsonb has stored one (any
# float that large reads back as an int) every later read of that row fails: a template
# whose params held 1e30 broke its tenant's template list.
MAX_MAGNITUDE = 2**63
# orjson writes at most 254 levels of nesting, so deeper JSON could be parsed here but not
# sent on to a service; nothing of ours needs more than a few.
MAX_DEPTH = 64


def unstorable(value: Any, path: str = "") -> dict[str, str]:
    """Field errors for what PostgreSQL or the bus cannot carry, anywhere in a parsed JSON
    value: NUL characters (text and jsonb refuse them), numbers beyond 64 bits, nesting
    deeper than MAX_DEPTH. Checked here so they are a 422 naming the field, not a 500 from
    whichever service stores them."""
    errors: dict[str, str] = {}
    _walk(value, path, errors)
    return errors


def _walk(value: Any, path: str, errors: dict[str, str], depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        errors[path or "body"] = f"must not be nested more than {MAX_DEPTH} levels deep"
        return
    if isinstance(value, str):
        if "\x00" in value:
            errors[path or "body"] = "must not contain NUL characters"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if abs(value) >= MAX_MAGNITUDE:
            errors[path or "body"] = "must lie between -2^63 and 2^63 (64-bit)"
    elif isinstance(value, dict):
        for key, item in value.items():
            name = str(key).replace("\x00", "\\0")
            where = f"{path}.{name}" if path else name
            if "\x00" in str(key):
                errors[where] = "keys must not contain NUL characters"
            _walk(item, where, errors, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _walk(item, f"{path}.{i}" if path else str(i), errors, depth + 1)


def validate(model: type[BaseModel], data: Any, what: str, *, strict: bool = False) -> dict[str, Any]:
    """The validated fields (None left out), or a 422 ``validation_error`` naming them.

    ``strict`` for JSON bodies: JSON has types, so ``"5"`` or ``true`` where a count is
    expected is a client's bug to report, not to guess at (lax mode granted 1 credit for
    ``{"purchased": true}``). Query strings are text, so they stay lax."""
    if errors := unstorable(data):
        raise ServiceError("validation_error", f"the {what} is not valid", {"fields": errors})
    try:
        return model.model_validate(data, strict=strict).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise ServiceError("validation_error", f"the {what} is not valid", {"fields": field_errors(exc)}) from None


def single_valued(query: MultiMapping[str]) -> dict[str, str]:
    """The query string as one value per name; a name given twice (``?limit=5&limit=500``)
    is a 422 naming it, rather than one of the two taken in silence."""
    repeated = sorted({name for name in query if len(query.getall(name)) > 1})
    if repeated:
        raise ServiceError("validation_error", f"the query string gives {', '.join(repeated)} more than once",
                           {"fields": {name: "given more than once" for name in repeated}})
    return dict(query)


MAX_PATH_ID = 200


def path_params(match_info: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(match_info)
    for name, value in out.items():
        # No id we hand out has control characters; a NUL reached PostgreSQL and was a 500.
        if not value.isprintable():
            raise ServiceError("validation_error", f"{name} must not contain control characters",
                               {"fields": {name: "must not contain control characters"}})
        # Our ids are short; a 100 KB one was echoed back in full by the 404.
        if len(value) > MAX_PATH_ID:
            raise ServiceError("validation_error", f"{name} is longer than any id ({MAX_PATH_ID} characters)",
                               {"fields": {name: f"at most {MAX_PATH_ID} characters"}})
    for name in INT_PATH_PARAMS.keys() & out.keys():
        value = out[name]
        if not (value.isascii() and value.isdigit()) or len(value) > 19 or int(value) > INT_PATH_PARAMS[name]:
            reason = f"must be an integer from 0 to {INT_PATH_PARAMS[name]}"
            raise ServiceError("validation_error", f"{name} {reason}", {"fields": {name: reason}})
        out[name] = int(value)
    return out
