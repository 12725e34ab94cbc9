"""The executor's download and http_call reach public destinations only, unless the operator
sets REDRIVE_EXECUTOR_ALLOW_PRIVATE_URLS: end to end, through the executor's composition root
(the setting reaches the handlers and the template check)."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.stack import Stack, expect_error

BODY = b"private bytes" * 100


class Internal:
    """A service on 127.0.0.1 (the platform's own network) that records what reaches it."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        app = web.Application()
        app.router.add_get("/file", self.file)
        app.router.add_post("/hook", self.hook)
        self.server = TestServer(app, host="127.0.0.1")

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def file(self, request: web.Request) -> web.Response:
        self.seen.append(request.path)
        return web.Response(body=BODY)

    async def hook(self, request: web.Request) -> web.Response:
        self.seen.append(request.path)
        return web.json_response({"ok": True})


@pytest.fixture
async def internal():
    found = Internal()
    await found.server.start_server()
    yield found
    await found.server.close()


async def test_private_urls_are_refused_unless_the_operator_allows_them(make_settings, internal):
    call = [{"name": "call", "handler": "http_call", "params": {"url": internal.url("/hook")}}]
    stack = await Stack(await make_settings()).start("billing", "coordinator", "executor")
    try:
        tenant = await stack.tenant()
        # A template calling a private address is refused when it is made.
        refused = await expect_error("validation_error", stack.template(tenant, call))
        assert refused.details["fields"] == {
            "steps.0.params": "http_call: params.url must not point at a private or reserved address (127.0.0.1)"}
        # A member's file url at a private address: the file ends ERROR at its first attempt.
        template = await stack.template(tenant, [{"name": "get", "handler": "download"}])
        run = await stack.submit(tenant, template, 0, files=[{"name": "a.bin", "url": internal.url("/file")}])
        done = await stack.wait_run(tenant, run["id"])
        [file] = done["files"]
        assert (file["status"], file["attempts"], file["last_error"]["transient"]) == ("ERROR", 1, False)
        assert file["last_error"]["message"] == \
            "download: url must not point at a private or reserved address (127.0.0.1)"
    finally:
        await stack.stop()
    assert internal.seen == []  # nothing reached the internal service

    allowed = await make_settings(executor_allow_private_urls=True)  # REDRIVE_EXECUTOR_ALLOW_PRIVATE_URLS=true
    stack = await Stack(allowed).start("billing", "coordinator", "executor")
    try:
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "get", "handler": "download"}, *call])
        run = await stack.submit(tenant, template, 0, files=[{"name": "a.bin", "url": internal.url("/file")}])
        done = await stack.wait_run(tenant, run["id"])
        assert done["status"] == "COMPLETED", done["files"]
    finally:
        await stack.stop()
    assert internal.seen == ["/file", "/hook"]
