"""sha256 of the file's bytes: inline content, or the artifact a download step wrote."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from pathlib import Path

from shared.errors import PermanentError
from services.executor.handlers.base import StepContext


def _hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


async def run(ctx: StepContext) -> dict:
    if ctx.file.content_b64 is not None:
        try:
            data = base64.b64decode(ctx.file.content_b64, validate=True)
        except (binascii.Error, ValueError):
            raise PermanentError("content_b64 is not valid base64") from None
        return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    path = (ctx.previous_output or {}).get("path")
    if path and Path(path).is_file():
        sha, size = await asyncio.to_thread(_hash_file, Path(path))
        return {"sha256": sha, "size": size}
    raise PermanentError("checksum needs content_b64 or a downloaded artifact")
