"""HTTP status → transient or permanent, with the dependency's Retry-After."""

from __future__ import annotations

import math

from shared.errors import PermanentError, TransientError, is_transient_http_status


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a numeric ``Retry-After``; None when absent or not a usable number."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
    # "nan", "inf" and negatives parse as floats but would poison the retry scheduler.
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def raise_for_status(status: int, retry_after: str | None, what: str) -> None:
    """Return for 2xx; TransientError for 408/425/429/5xx; PermanentError for anything else."""
    if 200 <= status < 300:
        return
    if is_transient_http_status(status):
        raise TransientError(f"{what}: HTTP {status}", retry_after_s=retry_after_s(retry_after))
    raise PermanentError(f"{what}: HTTP {status}")
