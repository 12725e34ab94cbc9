"""POST the file to ``params.url``: 408/429/5xx and timeouts are transient (Retry-After
honoured), other 4xx permanent."""

from __future__ import annotations

import base64
from urllib.parse import urlparse

import aiohttp

from shared.errors import PermanentError
from services.executor.handlers.base import FileRef, StepContext
from services.executor.handlers.http_errors import raise_for_status


def dependency_of(params: dict, file: FileRef) -> str | None:
    return urlparse(str(params.get("url") or "")).hostname


async def run(ctx: StepContext) -> dict:
    url = str(ctx.params.get("url") or "")
    if urlparse(url).scheme not in ("http", "https"):
        raise PermanentError("http_call needs params.url (http or https)")
    headers = {"Idempotency-Key": f"{ctx.job_id}:{ctx.step_name}"}
    if ctx.file.content_b64 is not None:
        kwargs = {"data": base64.b64decode(ctx.file.content_b64)}
    else:
        kwargs = {"json": {"name": ctx.file.name, "url": ctx.file.url, "size": ctx.file.size}}
    timeout = aiohttp.ClientTimeout(total=float(ctx.params.get("timeout_s", 30)))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(url, headers=headers, **kwargs) as resp:
            body = await resp.text(errors="replace")
            raise_for_status(resp.status, resp.headers.get("Retry-After"), f"http_call {url}")
            return {"status": resp.status, "body": body[:2000]}
