"""Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And
Jitter"): the delay before retry n is uniform in [0, min(max, base * 2**(n-1))], which
spreads a thundering herd of retries evenly instead of in synchronised waves."""

from __future__ import annotations

import random


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
    knows when it will be ready), capped by ``max_ms`` so a hostile header cannot park a job
    for a day.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    ceiling = min(max_ms, base_ms * (2 ** min(attempt - 1, 30)))
    delay = (rng or random).uniform(0, ceiling) if jitter else float(ceiling)
    if retry_after_s is not None and retry_after_s > 0:
        delay = max(delay, min(retry_after_s * 1000.0, float(max_ms)))
    return int(delay)
