"""Two ``download`` steps in one template each fetch their own URL into their own artifact:
the second must not take the first one's file for a finished attempt of its own, while a
retried step still resumes its own partial bytes. Over the real services, from a local
HTTP server (private URLs allowed, as REDRIVE_EXECUTOR_ALLOW_PRIVATE_URLS does)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.executor.artifacts import sweep
from tests.stack import Stack

FIRST = b"the first step's bytes\n" * 500
SECOND = b"and the second's, longer\n" * 900
CUT = 4096  # the second URL's first response stops after this many bytes


class Origin:
    """Serves /first whole, and /second cut short once (then by Range, with an ETag)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        app = web.Application()
        app.router.add_get("/first", self.first)
        app.router.add_get("/second", self.second)
        self.server = TestServer(app, host="127.0.0.1")

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def first(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, request.headers.get("Range")))
        return web.Response(body=FIRST, headers={"ETag": '"first"'})

    async def second(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, request.headers.get("Range")))
        asked = request.headers.get("Range")
        if asked and request.headers.get("If-Range") == '"second"':
            start = int(asked.removeprefix("bytes=").rstrip("-"))
            return web.Response(status=206, body=SECOND[start:], headers={
                "ETag": '"second"', "Content-Range": f"bytes {start}-{len(SECOND) - 1}/{len(SECOND)}"})
        resp = web.StreamResponse(headers={"ETag": '"second"', "Content-Length": str(len(SECOND))})
        await resp.prepare(request)
        await resp.write(SECOND[:CUT])
        request.transport.close()  # the connection drops mid-body: a transient failure
        return resp


@pytest.fixture
async def origin():
    found = Origin()
    await found.server.start_server()
    yield found
    await found.server.close()


@pytest.fixture(scope="module")
async def stack(make_settings):
    s = await Stack(await make_settings(executor_allow_private_urls=True)).start("billing", "coordinator", "executor")
    yield s
    await s.stop()


def described(body: bytes) -> tuple[int, str]:
    return len(body), hashlib.sha256(body).hexdigest()


async def test_each_download_step_fetches_and_returns_its_own_file(stack, origin):
    tenant = await stack.tenant()
    await stack.call("coordinator", "put_settings", tenant_id=tenant, auto_retries=3, backoff_base_ms=10,
                     backoff_max_ms=40, jitter=True, breaker_failure_threshold=50, breaker_reset_s=1)
    checkpoints: list[dict] = []

    async def on(msg):
        checkpoints.append(orjson.loads(msg.data))

    sub = await stack.nc.subscribe(f"{stack.names.prefix}.events.file.checkpoint", cb=on)
    template = await stack.template(tenant, [
        {"name": "first", "handler": "download", "params": {"url": origin.url("/first")}},
        {"name": "second", "handler": "download", "params": {"url": origin.url("/second")}},
    ])
    run = await stack.submit(tenant, template, 0, files=[{"name": "same.bin"}])
    done = await stack.wait_run(tenant, run["id"])
    await sub.unsubscribe()
    [f] = done["files"]
    assert f["status"] == "SUCCEEDED", f

    [first] = [e["output"] for e in checkpoints if e["run_id"] == run["id"] and e["step"] == 0]
    second = f["output"]
    assert set(first) == set(second) == {"path", "size", "sha256", "resumed_from"}
    assert (first["size"], first["sha256"]) == described(FIRST)
    assert (second["size"], second["sha256"]) == described(SECOND)
    assert (first["resumed_from"], second["resumed_from"]) == (0, CUT)  # the retry resumed its own bytes
    assert first["path"] != second["path"]
    assert Path(first["path"]).read_bytes() == FIRST and Path(second["path"]).read_bytes() == SECOND
    assert origin.requests == [("/first", None), ("/second", None), ("/second", f"bytes={CUT}-")]

    # The retention sweep still finds both under the run's directory, and removes them.
    root = stack.settings.data_dir / "artifacts"
    removed, failed = sweep(root, 3600, now=time.time() + 7200)
    assert f"{tenant}/{run['id']}" in removed and failed == []
    assert not Path(first["path"]).exists() and not Path(second["path"]).exists()
