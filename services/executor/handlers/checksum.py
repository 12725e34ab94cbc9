"""sha256 of the file's bytes: inline content, or the artifact a download step wrote."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from pathlib import Path

from shared.errors import PermanentError
from services.executor.handlers.base import StepContext

CHUNK = 1 << 20
# Hashing a file this size or larger goes to a thread, so a big artifact does not stall the
# event loop (and with it every other job's heartbeats on this executor).
THREAD_THRESHOLD = 1 << 20


def hash_file_sync(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of ``path``, read in 1 MiB chunks so memory stays flat."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


async def hash_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of ``path``; off the event loop when the file is large."""
    if path.stat().st_size >= THREAD_THRESHOLD:
        return await asyncio.to_thread(hash_file_sync, path)
    return hash_file_sync(path)


def decode_b64(content_b64: str, what: str) -> bytes:
    """Strict base64 (whitespace such as MIME line breaks allowed); bad input is permanent."""
    try:
        return base64.b64decode("".join(content_b64.split()), validate=True)
    except (binascii.Error, ValueError):
        raise PermanentError(f"{what}: content_b64 is not valid base64") from None


async def run(ctx: StepContext) -> dict:
    """Output ``{"sha256", "size"}`` of the file's inline content or downloaded artifact."""
    if ctx.file.content_b64 is not None:
        data = decode_b64(ctx.file.content_b64, "checksum")
        return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    path = (ctx.previous_output or {}).get("path")
    if path:
        artifact = Path(path)
        # Only this run's artifacts: the path comes from the step before, and a handler that
        # passes on what a remote service says would otherwise make this a size-and-hash
        # oracle over every file the executor can read (other tenants' artifacts included).
        if not artifact.resolve().is_relative_to(ctx.artifact_root.resolve()):
            raise PermanentError(f"checksum: {path} is not an artifact of this run")
        if not artifact.is_file():
            # Retrying this step cannot bring the artifact back; the download step must re-run.
            raise PermanentError(f"checksum: downloaded artifact {path} is missing")
        sha, size = await hash_file(artifact)
        return {"sha256": sha, "size": size}
    raise PermanentError("checksum needs content_b64 or a downloaded artifact")
