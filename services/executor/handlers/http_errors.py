"""HTTP status → transient or permanent, with the dependency's Retry-After."""

from __future__ import annotations

from shared.errors import PermanentError, TransientError, is_transient_http_status


def retry_after_s(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def raise_for_status(status: int, retry_after: str | None, what: str) -> None:
    if 200 <= status < 300:
        return
    if is_transient_http_status(status):
        raise TransientError(f"{what}: HTTP {status}", retry_after_s=retry_after_s(retry_after))
    raise PermanentError(f"{what}: HTTP {status}")
