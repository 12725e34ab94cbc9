"""A resumed download never splices two versions of a file, nor takes a part cut short for
the whole: against a local server that ignores If-Range, or answers a resume with a 416
that does not say the resource's size."""

from __future__ import annotations

import hashlib
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.executor.handlers.registry import builtin_registry
from tests.unit.test_download_limits import make_ctx

V1, V2 = bytes(range(256)) * 40, bytes(reversed(range(256))) * 40  # same size, other bytes
MODIFIED = "Mon, 30 Nov 2026 10:00:00 GMT"
fetch = builtin_registry(allow_private_urls=True).get("download").run


class Origin:
    def __init__(self) -> None:
        self.ranges: list[str | None] = []
        app = web.Application()
        app.router.add_get("/changed", self.changed)
        app.router.add_get("/no-size-416", self.no_size_416)
        app.router.add_get("/same", self.same)
        app.router.add_get("/capped", self.capped)
        self.validators: dict[str, str] = {}  # what /same's 206 carries (the file never changes)
        self.server = TestServer(app, host="127.0.0.1")

    async def changed(self, request: web.Request) -> web.Response:
        """Version 2 now; a Range is honoured, If-Range ignored (as some servers do)."""
        self.ranges.append(request.headers.get("Range"))
        if rng := request.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            return web.Response(status=206, body=V2[start:], headers={
                "ETag": '"v2"', "Content-Range": f"bytes {start}-{len(V2) - 1}/{len(V2)}"})
        return web.Response(body=V2, headers={"ETag": '"v2"'})

    async def same(self, request: web.Request) -> web.Response:
        """V1, unchanged; its 206 may carry other validator fields than its 200 did."""
        self.ranges.append(request.headers.get("Range"))
        if rng := request.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            return web.Response(status=206, body=V1[start:], headers={
                **self.validators, "Content-Range": f"bytes {start}-{len(V1) - 1}/{len(V1)}"})
        return web.Response(body=V1, headers={"ETag": '"e1"', "Last-Modified": MODIFIED})

    async def capped(self, request: web.Request) -> web.Response:
        """Ranges capped at 1,000 bytes (as some CDNs do)."""
        self.ranges.append(request.headers.get("Range"))
        start = int((request.headers.get("Range") or "bytes=0-").removeprefix("bytes=").rstrip("-"))
        end = min(start + 1000, len(V1))
        return web.Response(status=206, body=V1[start:end], headers={
            "Content-Range": f"bytes {start}-{end - 1}/{len(V1)}"})

    async def no_size_416(self, request: web.Request) -> web.Response:
        self.ranges.append(request.headers.get("Range"))
        if request.headers.get("Range"):
            return web.Response(status=416)  # and no Content-Range
        return web.Response(body=V1)


@pytest.fixture
async def origin():
    found = Origin()
    await found.server.start_server()
    yield found
    await found.server.close()


def _cut_short(ctx, validator: str | None, url: str, size: int | None = None) -> None:
    """What an attempt cut off halfway leaves: half of version 1, and its sidecar."""
    ctx.artifact_dir.mkdir(parents=True, exist_ok=True)
    (ctx.artifact_dir / "download.part").write_bytes(V1[:len(V1) // 2])
    (ctx.artifact_dir / "download.json").write_text(json.dumps({"validator": validator, "url": url, "size": size}))


async def test_a_range_of_another_version_is_not_spliced_onto_the_part(tmp_path, origin):
    url = str(origin.server.make_url("/changed"))
    ctx = make_ctx(tmp_path, url)
    _cut_short(ctx, '"v1"', url)
    out = await fetch(ctx)
    assert out["sha256"] == hashlib.sha256(V2).hexdigest() and out["size"] == len(V2)
    assert origin.ranges == [f"bytes={len(V1) // 2}-", None]  # asked to resume, then from the start


@pytest.mark.parametrize("saved_size", [None, len(V1)])  # a sidecar from before sizes were saved, or one with it
async def test_a_416_that_does_not_say_the_size_starts_again_instead_of_passing_a_short_part(tmp_path, origin,
                                                                                            saved_size):
    url = str(origin.server.make_url("/no-size-416"))
    ctx = make_ctx(tmp_path, url)
    _cut_short(ctx, None, url, saved_size)
    out = await fetch(ctx)
    assert out["sha256"] == hashlib.sha256(V1).hexdigest() and out["size"] == len(V1)


@pytest.mark.parametrize("validators", [
    {"Last-Modified": MODIFIED},                          # the 206 says only Last-Modified
    {"ETag": 'W/"e1"', "Last-Modified": MODIFIED},        # weakened by a CDN
    {},                                                   # says nothing
])
async def test_an_unchanged_file_resumes_whatever_validators_its_range_carries(tmp_path, origin, validators):
    url = str(origin.server.make_url("/same"))
    origin.validators = validators
    ctx = make_ctx(tmp_path, url)
    ctx.artifact_dir.mkdir(parents=True, exist_ok=True)
    (ctx.artifact_dir / "download.part").write_bytes(V1[:len(V1) // 2])
    (ctx.artifact_dir / "download.json").write_text(json.dumps(
        {"validator": '"e1"', "etag": '"e1"', "last_modified": MODIFIED, "url": url, "size": len(V1)}))
    out = await fetch(ctx)
    assert out["sha256"] == hashlib.sha256(V1).hexdigest() and out["resumed_from"] == len(V1) // 2
    assert origin.ranges == [f"bytes={len(V1) // 2}-"]


async def test_a_range_cut_short_by_the_server_is_not_the_whole_file(tmp_path, origin):
    from shared.errors import TransientError

    url = str(origin.server.make_url("/capped"))
    ctx = make_ctx(tmp_path, url)
    for _ in range(len(V1) // 1000):  # each attempt gets 1,000 bytes more and says it is short
        with pytest.raises(TransientError, match="got .* of 10240 bytes"):
            await fetch(ctx)
    out = await fetch(ctx)
    assert out["sha256"] == hashlib.sha256(V1).hexdigest() and out["size"] == len(V1)
