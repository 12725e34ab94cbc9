"""Resumable download (seed 003): fetch ``url`` into the file's artifact directory and
resume from the exact byte reached after a failure or a killed executor.

The bytes on disk are the offset: each chunk is written and flushed before the next is
read. A resumed request sends ``Range: bytes=<offset>-`` with ``If-Range`` (the validator
of the first response), so a changed resource restarts from 0; a server that ignores
Range (200) also restarts from 0.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from urllib.parse import urlparse

import aiohttp

from shared.errors import PermanentError, TransientError
from services.executor.handlers.base import FileRef, StepContext
from services.executor.handlers.http_errors import raise_for_status

CHUNK = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-")


def _url(ctx: StepContext) -> str:
    url = ctx.params.get("url") or ctx.file.url
    if not url or urlparse(url).scheme not in ("http", "https"):
        raise PermanentError("download needs an http(s) url")
    return url


def dependency_of(params: dict, file: FileRef) -> str | None:
    return urlparse(params.get("url") or file.url or "").hostname


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


async def run(ctx: StepContext) -> dict:
    url = _url(ctx)
    ctx.artifact_dir.mkdir(parents=True, exist_ok=True)
    part, meta_path = ctx.artifact_dir / "download.part", ctx.artifact_dir / "download.json"
    final = ctx.artifact_dir / (re.sub(r"[^A-Za-z0-9._-]", "_", ctx.file.name) or "download")
    offset = part.stat().st_size if part.exists() else 0
    meta = json.loads(meta_path.read_text()) if meta_path.exists() and offset else {}
    resumed_from = offset
    headers = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url, headers=headers) as resp:
            if resp.status == 416 and offset:
                pass  # already complete on disk
            else:
                raise_for_status(resp.status, resp.headers.get("Retry-After"), f"download {url}")
                start = 0
                if resp.status == 206:
                    m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                    start = int(m.group(1)) if m else 0
                if start != offset:  # the server ignored Range or answered another range
                    offset = resumed_from = 0
                    if start != 0:
                        raise TransientError("download: unexpected Content-Range; restarting from 0")
                validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
                meta_path.write_text(json.dumps({"validator": validator}))
                with part.open("r+b" if offset else "wb") as fh:
                    fh.seek(offset)
                    fh.truncate()
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        fh.write(chunk)
                        fh.flush()
                        if ctx.heartbeat is not None:
                            await ctx.heartbeat()
    size = part.stat().st_size
    sha = _sha256(part)
    want_size = ctx.file.size or ctx.params.get("size")
    want_sha = ctx.file.sha256 or ctx.params.get("sha256")
    if (want_size is not None and size != int(want_size)) or (want_sha and sha != str(want_sha).lower()):
        part.unlink(missing_ok=True)
        if resumed_from:
            raise TransientError("download: size or checksum mismatch after resume; restarting from 0")
        raise PermanentError(f"download: size or checksum mismatch (got {size} bytes, sha256 {sha})")
    part.replace(final)
    meta_path.unlink(missing_ok=True)
    return {"path": str(final), "size": size, "sha256": sha, "resumed_from": resumed_from}
