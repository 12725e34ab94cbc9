"""Requests of the notifier's verbs. Unknown fields are ignored (the gateway may add some)."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit
from uuid import UUID

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

MAX_URL_LENGTH = 2000


class TenantCmd(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tenant_id: str = Field(min_length=1, max_length=200)


class ListNotifications(TenantCmd):
    # None: every notification; True: the unread ones only; False: the read ones only
    # (GET /notifications?unread=, as ?needs_attention= of runs). The gateway sends it as
    # ``unread_only``.
    unread: bool | None = Field(default=None, validation_alias=AliasChoices("unread", "unread_only"))
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = Field(default=None, max_length=500)

    @field_validator("cursor")
    @classmethod
    def _cursor_is_ours(cls, value: str | None) -> str | None:
        if value is not None:
            decode_cursor(value)
        return value


class MarkRead(TenantCmd):
    id: str = Field(min_length=1, max_length=100)


class ListDeliveries(TenantCmd):
    status: Literal["pending", "delivered", "failed"] | None = None
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = Field(default=None, max_length=200)

    @field_validator("cursor")
    @classmethod
    def _cursor_is_ours(cls, value: str | None) -> str | None:
        if value is not None:
            decode_delivery_cursor(value)
        return value


class DeliveryRef(TenantCmd):
    # A delivery's public id (a UUID). Anything else names no delivery: a 404 like another
    # tenant's, not a 422 (an integer id of before included).
    delivery_id: str = Field(min_length=1, max_length=200)

    def public_id(self) -> UUID | None:
        try:
            return UUID(self.delivery_id)
        except ValueError:
            return None


class PutWebhook(TenantCmd):
    url: str = Field(max_length=MAX_URL_LENGTH)
    secret: str = Field(min_length=16, max_length=200)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip()
        if any(ch.isspace() or ord(ch) < 32 for ch in value):
            raise ValueError("must not contain spaces or control characters")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        _ = parts.port  # raises ValueError on a port that is not a number in range
        return value

    @field_validator("secret")
    @classmethod
    def _a_secret(cls, value: str) -> str:
        if sum(not ch.isspace() for ch in value) < 16:  # blanks sign nothing anyone could not guess
            raise ValueError("must hold at least 16 characters that are not spaces")
        return value


# A page cursor is opaque to callers: the position (at, id) of the last item of the page.

def encode_cursor(at: datetime, notification_id: str) -> str:
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{notification_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, sep, notification_id = raw.partition("|")
        parsed = datetime.fromisoformat(at)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("is not a cursor this service returned") from None
    if not sep or not notification_id or parsed.tzinfo is None:
        raise ValueError("is not a cursor this service returned")
    return parsed, notification_id


# A page of deliveries ends at (created_at, public_id) of its last one, written the same way:
# the bigserial id is never in it (it would tell how many deliveries every tenant got).

def decode_delivery_cursor(cursor: str) -> tuple[datetime, UUID]:
    at, public_id = decode_cursor(cursor)
    try:
        return at, UUID(public_id)
    except ValueError:
        raise ValueError("is not a cursor this service returned") from None
