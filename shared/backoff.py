"""Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And
Jitter"): the delay before retry n is uniform in [0, min(max, base * 2**(n-1))], which
spreads a thundering herd of retries evenly instead of in synchronised waves."""

from __future__ import annotations

import math
import random
import time
from datetime import timezone
from email.utils import parsedate_to_datetime

# The longest a dependency's Retry-After may make us wait: the longest backoff a tenant may
# set (RetryPolicy.backoff_max_ms). Long enough for any real rate limit; a hostile or broken
# header cannot park a job for a day.
RETRY_AFTER_CEILING_S = 3600.0


def backoff_delay_ms(
    attempt: int,
    *,
    base_ms: int,
    max_ms: int,
    jitter: bool = True,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> int:
    """Delay before the retry that follows failed attempt number ``attempt`` (1-based).

    A dependency's ``Retry-After`` wins over our own schedule when it asks for longer (it
    knows when it will be ready; retrying sooner only spends an attempt on another 429), even
    past ``max_ms``, up to :data:`RETRY_AFTER_CEILING_S`.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    ceiling = min(max_ms, base_ms * (2 ** min(attempt - 1, 30)))
    delay = (rng or random).uniform(0, ceiling) if jitter else float(ceiling)
    if retry_after_s is not None and retry_after_s > 0:
        delay = max(delay, min(retry_after_s, RETRY_AFTER_CEILING_S) * 1000.0)
    return int(delay)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds (RFC 9110 10.2.3: delay-seconds or an HTTP-date;
    a date in the past is 0). None when absent or unusable: then our own backoff decides.
    "nan", "inf" and negatives parse as floats but would poison the retry scheduler."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
            if when.tzinfo is None:  # asctime form, or "-0000": an HTTP-date is GMT whatever it says
                when = when.replace(tzinfo=timezone.utc)
            seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
