"""HTTP status → transient or permanent, with the dependency's Retry-After."""

from __future__ import annotations

from shared.backoff import parse_retry_after
from shared.errors import PermanentError, TransientError, is_transient_http_status


def raise_for_status(status: int, retry_after: str | None, what: str) -> None:
    """Return for 2xx; TransientError for 408/425/429/5xx; PermanentError for anything else."""
    if 200 <= status < 300:
        return
    if is_transient_http_status(status):
        raise TransientError(f"{what}: HTTP {status}", retry_after_s=parse_retry_after(retry_after))
    raise PermanentError(f"{what}: HTTP {status}")
