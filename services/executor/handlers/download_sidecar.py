"""What a download keeps beside its partial bytes (``download.json``), and what it tells about
a later answer: the validators the part was fetched under, the url, and the file's size.

A resume sends the validator back (``If-Range``); a server that ignores it and sends a range
of another version is caught by comparing validators of one kind; a 416 that does not say
the file's size is judged by the size kept here.
"""

from __future__ import annotations

import json
from pathlib import Path


def validator(headers) -> str | None:
    """What to send as If-Range. It needs a strong validator (RFC 9110 §13.1.5): a weak ETag
    would make every resume come back as a full 200, so fall back to Last-Modified."""
    etag = headers.get("ETag")
    return etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")


def first(headers, url: str, size: int | None) -> dict:
    """The sidecar of a part fetched from its first byte by an answer with ``headers``."""
    return {"validator": validator(headers), "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"),
            "url": url, "size": size}


def read(meta: Path) -> dict:
    try:
        found = json.loads(meta.read_text())
    except (OSError, ValueError):  # missing or torn: as if none (resumed without If-Range)
        return {}
    return found if isinstance(found, dict) else {}


def saved_size(saved: dict) -> int | None:
    """The whole size the first answer announced, or the body's when it ended cleanly."""
    size = saved.get("size")
    return size if isinstance(size, int) else None


def another_version(saved: dict, headers) -> bool:
    """Whether a 206's validators name another version than the part's: an ETag against an
    ETag (the weak form compared as the strong: a CDN may weaken it), or a Last-Modified
    against a Last-Modified. Either missing on one side proves nothing."""
    def tag(value: str | None) -> str | None:
        return value.removeprefix("W/") if value else None

    was = saved.get("validator")  # a sidecar written before both were kept: the one sent
    quoted = isinstance(was, str) and was.removeprefix("W/").startswith('"')
    etag, was_etag = tag(headers.get("ETag")), tag(saved.get("etag") or (was if quoted else None))
    if etag and was_etag:
        return etag != was_etag
    modified, was_modified = headers.get("Last-Modified"), saved.get("last_modified") or (None if quoted else was)
    return bool(modified and was_modified and modified != was_modified)
