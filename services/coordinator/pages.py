"""Pages of a reply: each crosses NATS in one message (1 MB by default), so a page ends
early rather than outgrow PAGE_BYTES of JSON, whatever its count limit says. Long file
names, large outputs and large template params reach 1 MB well before any count does."""

from __future__ import annotations

from collections.abc import Iterable

import orjson

PAGE_BYTES = 512 * 1024


def within_page(items: Iterable[dict]) -> tuple[list[dict], bool]:
    """The first ``items`` whose JSON fits PAGE_BYTES (always at least one), and whether
    some were left out."""
    budget = PAGE_BYTES  # read on each call: tests shrink it
    kept: list[dict] = []
    size = 0
    for item in items:
        n = len(orjson.dumps(item))
        if kept and size + n > budget:
            return kept, True
        kept.append(item)
        size += n
    return kept, False
