"""Resumable download (seed 003): fetch ``url`` into the step's artifact directory (one per
run, file and step: two download steps of a template keep two files) and resume from the
exact byte reached after a failure or a killed executor.

The bytes on disk are the offset: each chunk is written and flushed before the next is
read. A resumed request sends ``Range: bytes=<offset>-`` with ``If-Range`` (the validator
of the first response, kept in a sidecar), so a changed resource comes back whole (200) and
restarts from 0; so does a server that ignores Range.

The url must be a public destination unless the operator allows private ones
(``REDRIVE_EXECUTOR_ALLOW_PRIVATE_URLS``; see outbound.py): judged before the request, at
connect time, and at each redirect, which is followed (files are often served from a CDN a
redirect points to) only after its target is judged like the first URL.

No download writes more than ``max_bytes`` (``REDRIVE_EXECUTOR_MAX_DOWNLOAD_BYTES``), nor
more than the file's expected size when the run gives one: refused up front when the
expected size or the announced length is larger, and cut off the moment the body runs past
either, so an endless response cannot fill the executor's disk.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import aiohttp

from shared.destinations import Destinations, redact_url
from shared.errors import PermanentError, RedriveError, TransientError
from services.executor.handlers import download_sidecar as sidecar, outbound
from services.executor.handlers.base import FileRef, StepContext
from services.executor.handlers.checksum import hash_file
from services.executor.handlers.http_errors import raise_for_status

CHUNK = 64 * 1024
HEARTBEAT_EVERY_S = 1.0
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
PART, META = "download.part", "download.json"
_RANGE_START = re.compile(r"bytes\s+(\d+)-")
_RANGE_TOTAL = re.compile(r"/(\d+)\s*$")
# Private destinations refused: what a handler called without the operator's choice gets.
PUBLIC_ONLY = Destinations()
# The default of REDRIVE_EXECUTOR_MAX_DOWNLOAD_BYTES, for a handler called without the operator's choice.
DEFAULT_MAX_BYTES = 10 * 2**30
LIMIT_SETTING = "REDRIVE_EXECUTOR_MAX_DOWNLOAD_BYTES"


class _Overrun(Exception):
    """The response holds more bytes than may be written, found before they were: a size
    over the download limit (``over_limit``) or over the file's expected size (a size
    mismatch). ``resumed_from`` is the offset the request started at."""

    def __init__(self, problem: str, resumed_from: int, *, over_limit: bool) -> None:
        super().__init__(problem)
        self.problem, self.resumed_from, self.over_limit = problem, resumed_from, over_limit


def dependency_of(params: dict, file: FileRef) -> str | None:
    """The URL's host: one circuit breaker per origin server."""
    return outbound.host_of(params.get("url") or file.url)


def file_needs(params: dict) -> tuple[str, ...]:
    """Without ``params.url``, each file names what to fetch."""
    return () if params.get("url") else ("url",)


def check_params(params: dict, *, destinations: Destinations = PUBLIC_ONLY) -> None:
    """For a template being made: its own url, when it names one, checked as a run's is."""
    if params.get("url") is not None:
        outbound.checked_url(params["url"], destinations, needs="download: params.url must be an http(s) url",
                             refused="download: params.url")


def _url(ctx: StepContext, destinations: Destinations) -> str:
    return outbound.checked_url(ctx.params.get("url") or ctx.file.url, destinations,
                                needs="download needs an http(s) url (file.url or params.url)", refused="download: url")


def _expected(ctx: StepContext) -> tuple[int | None, str | None]:
    size = ctx.file.size if ctx.file.size is not None else ctx.params.get("size")
    sha = ctx.file.sha256 or ctx.params.get("sha256")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise PermanentError(f"download: expected size must be a whole number >= 0, got {size!r}")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
        raise PermanentError(f"download: expected sha256 must be 64 hex digits, got {sha!r}")
    return size, sha.lower() if sha else None


def safe_name(name: str) -> str:
    """A file name that stays inside the artifact directory and clear of our own files."""
    base = re.split(r"[\\/]", name)[-1]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")[:200]  # no "..", no hidden files
    return safe if safe and safe not in (PART, META) else f"file_{safe or 'download'}"


def _over_limit(max_bytes: int) -> str:
    return f"over the download limit of {max_bytes} bytes ({LIMIT_SETTING})"


def _announced_size(resp: aiohttp.ClientResponse, offset: int) -> int | None:
    """The resource's whole size as the response states it: a 206's Content-Range total, or
    else the offset plus its Content-Length; None when it does not say (chunked, ``/*``)."""
    total = _RANGE_TOTAL.search(resp.headers.get("Content-Range", "")) if resp.status == 206 else None
    if total:
        return int(total.group(1))
    return offset + resp.content_length if resp.content_length is not None else None


def _check_room(size: int, said: str, offset: int, want_size: int | None, max_bytes: int) -> None:
    """Refuse a resource of ``size`` bytes (``said`` says how we know) before writing them:
    past the limit it would fill the disk; past the expected size it can only end in a size
    mismatch. The limit is named first: whatever the file should be, that is the refusal."""
    if size > max_bytes:
        raise _Overrun(f"{said}, {_over_limit(max_bytes)}", offset, over_limit=True)
    if want_size is not None and size > want_size:
        raise _Overrun(f"size mismatch: {said}, expected {want_size}", offset, over_limit=False)


def _mismatch(size: int, sha: str, want_size: int | None, want_sha: str | None) -> str | None:
    if want_size is not None and size != want_size:
        return f"size mismatch: got {size} bytes, expected {want_size}"
    if want_sha is not None and sha != want_sha:
        return f"sha256 mismatch: got {sha}, expected {want_sha}"
    return None


def _rejected(shown: str, problem: str, resumed_from: int) -> RedriveError:
    """The error a download whose bytes are not the file's is."""
    if resumed_from:
        # Maybe the splice was wrong (the resource changed without a validator): retry from 0.
        return TransientError(f"download {shown}: {problem} after resuming at byte {resumed_from}")
    return PermanentError(f"download {shown}: {problem}")


def _discard(part: Path, meta: Path) -> None:
    part.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)


async def _fetch(session, ctx: StepContext, url: str, part: Path, meta: Path, want_size: int | None,
                 destinations: Destinations, max_bytes: int) -> int | None:
    """Bring ``part`` up to the whole resource; return the offset this request resumed from,
    or None when the part was discarded and the caller should start again from 0. Raises
    _Overrun, having written nothing past the bound, when the resource is too big."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: ranges address the encoded bytes, and aiohttp would transparently decode gzip.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if sent := sidecar.read(meta).get("validator"):
            headers["If-Range"] = sent
    async with outbound.get(session, url, destinations, what="download", headers=headers) as resp:
        if resp.status == 416 and offset:
            total = _RANGE_TOTAL.search(resp.headers.get("Content-Range", ""))
            total_size = int(total.group(1)) if total else (
                want_size if want_size is not None else sidecar.saved_size(sidecar.read(meta)))
            if total_size == offset:
                return offset  # the part already holds every byte (size/sha are verified next)
            # Larger than the resource (it changed under us), or no one says how large it is:
            # a part cut short must not pass for the whole file.
            part.unlink(missing_ok=True)
            return None
        raise_for_status(resp.status, resp.headers.get("Retry-After"), f"download {redact_url(url)}")
        if resp.status == 206:
            start = _RANGE_START.match(resp.headers.get("Content-Range", ""))
            if start is None or int(start.group(1)) != offset:
                if not offset:
                    raise TransientError(f"download {redact_url(url)}: 206 without a usable Content-Range")
                part.unlink(missing_ok=True)  # we cannot splice a range we did not ask for
                return None
            if sidecar.another_version(sidecar.read(meta), resp.headers):
                # The server ignored If-Range: these bytes are of another version than the part's.
                part.unlink(missing_ok=True)
                return None
        else:
            offset = 0  # a 200 to a Range request: server ignored Range, or If-Range failed
        if (announced := _announced_size(resp, offset)) is not None:  # refused before the body is read
            _check_room(announced, f"the server announces {announced} bytes", offset, want_size, max_bytes)
        # Truncate before writing the sidecar, so a crash in between never pairs a new
        # validator with stale bytes.
        with part.open("r+b" if offset else "wb") as fh:
            fh.seek(offset)
            fh.truncate()
            kept = sidecar.read(meta) if offset else sidecar.first(resp.headers, url, _announced_size(resp, 0))
            if not offset:
                meta.write_text(json.dumps(kept))
            last_beat = time.monotonic()
            end = offset
            async for chunk in resp.content.iter_chunked(CHUNK):
                end += len(chunk)
                # Before the write: the disk never holds more, however long the server goes on.
                _check_room(end, f"got at least {end} bytes", offset, want_size, max_bytes)
                fh.write(chunk)
                fh.flush()  # the bytes the OS holds are the resume offset if we die now
                if ctx.heartbeat is not None and time.monotonic() - last_beat >= HEARTBEAT_EVERY_S:
                    last_beat = time.monotonic()
                    await ctx.heartbeat()
        total = _announced_size(resp, offset) if resp.status == 206 else sidecar.saved_size(kept)
        if total is not None and end < total:
            # A 206 that stops short of the end (a CDN capping ranges): the next attempt goes on
            # from here; the part must not pass for the whole file.
            raise TransientError(f"download {redact_url(url)}: got {end} of {total} bytes")
        if sidecar.saved_size(kept) is None:  # the body ended cleanly: now the size is known
            meta.write_text(json.dumps({**kept, "size": end}))
    return offset


async def run(ctx: StepContext, *, destinations: Destinations = PUBLIC_ONLY,
              max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Download (resuming if possible), verify, and output ``{"path", "size", "sha256", "resumed_from"}``.
    At most ``max_bytes`` are written: a larger file is a PermanentError naming the limit."""
    url = _url(ctx, destinations)
    shown = redact_url(url)
    want_size, want_sha = _expected(ctx)
    if want_size is not None and want_size > max_bytes:
        raise PermanentError(f"download {shown}: expected size {want_size} bytes is {_over_limit(max_bytes)}")
    ctx.artifact_dir.mkdir(parents=True, exist_ok=True)
    part, meta = ctx.artifact_dir / PART, ctx.artifact_dir / META
    final = ctx.artifact_dir / safe_name(ctx.file.name)
    if final.is_file() and not part.exists():
        # A previous attempt of this step finished but its output was never recorded (killed
        # before the ack). The directory is this step's own: another step's file is never here.
        sha, size = await hash_file(final)
        if _mismatch(size, sha, want_size, want_sha) is None:
            return {"path": str(final), "size": size, "sha256": sha, "resumed_from": size}
        final.unlink()
    try:
        async with outbound.client_session(destinations, timeout=TIMEOUT, auto_decompress=False) as session:
            resumed_from = await _fetch(session, ctx, url, part, meta, want_size, destinations, max_bytes)
            if resumed_from is None:  # the partial was unusable: go again from 0, now
                resumed_from = await _fetch(session, ctx, url, part, meta, want_size, destinations, max_bytes)
            if resumed_from is None:
                raise TransientError(f"download {shown}: server keeps answering a different range")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        # The bytes already on disk stay: a transient failure's next attempt resumes from them.
        raise outbound.failure("download", url, exc) from exc
    except _Overrun as overrun:
        _discard(part, meta)  # bytes of a file too big to keep: no attempt may resume from them
        if overrun.over_limit:  # however it was reached, the resource is too big: for good
            raise PermanentError(f"download {shown}: {overrun.problem}") from None
        raise _rejected(shown, overrun.problem, overrun.resumed_from) from None
    sha, size = await hash_file(part)
    problem = _mismatch(size, sha, want_size, want_sha)
    if problem:
        _discard(part, meta)
        raise _rejected(shown, problem, resumed_from)
    part.replace(final)
    meta.unlink(missing_ok=True)
    return {"path": str(final), "size": size, "sha256": sha, "resumed_from": resumed_from}
