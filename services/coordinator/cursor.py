"""Keyset cursors over ``(created_at, id)``, newest first: ``"<µs since the epoch>|<id>"``.

Stable while new rows arrive, and safe in a query string as it is (an ISO timestamp's
``+00:00`` arrives as a space unless the client encodes it; cursors of that older form
are still read). A cursor that is not one of ours is the caller's error (422 naming
``cursor``), found here rather than by PostgreSQL (a vague 400) or by datetime arithmetic
(a year-1 timestamp with an offset cannot be moved to UTC)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from shared.messages import ServiceError

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def encode(created_at: datetime, row_id: str) -> str:
    return f"{(created_at - _EPOCH) // _MICROSECOND}|{row_id}"


def decode(cursor: str) -> tuple[datetime, str]:
    created, _, row_id = cursor.partition("|")
    try:
        if created.isascii() and created.isdigit() and len(created) <= 18:
            at = _EPOCH + int(created) * _MICROSECOND
        else:  # the ISO form of earlier releases
            at = datetime.fromisoformat(created)
            if at.tzinfo is None:
                raise ValueError("no time zone")
            at = at.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        at = None
    if at is None or not row_id:
        raise ServiceError("validation_error", "invalid cursor: pass next_cursor from the previous page",
                           {"fields": {"cursor": "not a cursor of this list"}})
    return at, row_id
