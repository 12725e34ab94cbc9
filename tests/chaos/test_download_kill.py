"""Chaos: the executor is killed -9 in the middle of a `download` (product.md item 4). The
restarted executor, handed the job again after the ack wait, must resume from the bytes the
dead one had written (HTTP Range with If-Range), verify the checksum, not count the kill as
a failed attempt, and charge the file once."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
from pathlib import Path

import pytest
from aiohttp import web

from tests.chaos.conftest import FIGURES
from tests.chaos.invariants import check, wait_all_terminal
from tests.procs import ProcStack

pytestmark = pytest.mark.chaos

BODY = random.Random(3).randbytes(2 * 2**20)  # ~2 MB, incompressible
SHA = hashlib.sha256(BODY).hexdigest()
ETAG = f'"{SHA[:16]}"'
PIECE = 32 * 2**10  # the origin writes this much at a time...
PACE_S = 0.02  # ...every 20 ms: ~1.3 s for the whole body
KILL_AFTER = len(BODY) // 2  # the executor is killed once the origin has sent this much


class SlowOrigin:
    """Serves BODY slowly, with an ETag; honours `Range: bytes=N-` when `If-Range` matches
    (206), else the whole body (200). Records every request and how much it was sent."""

    def __init__(self) -> None:
        self.requests: list[dict] = []  # {"range", "if_range", "status", "sent"}
        self.half_sent = asyncio.Event()
        app = web.Application()
        app.router.add_get("/file.bin", self.serve)
        self.runner = web.AppRunner(app)

    async def start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/file.bin"

    async def serve(self, request: web.Request) -> web.StreamResponse:
        asked, if_range = request.headers.get("Range"), request.headers.get("If-Range")
        record = {"range": asked, "if_range": if_range, "status": 200, "sent": 0}
        self.requests.append(record)
        start, headers = 0, {"ETag": ETAG, "Accept-Ranges": "bytes"}
        m = re.fullmatch(r"bytes=(\d+)-", asked or "")
        if m and (if_range is None or if_range == ETAG):
            start = int(m.group(1))
            if start >= len(BODY):
                record["status"] = 416
                return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{len(BODY)}"})
            record["status"] = 206
            headers["Content-Range"] = f"bytes {start}-{len(BODY) - 1}/{len(BODY)}"
        resp = web.StreamResponse(status=record["status"], headers={**headers, "Content-Length": str(len(BODY) - start)})
        await resp.prepare(request)
        try:
            for at in range(start, len(BODY), PIECE):
                await resp.write(BODY[at:at + PIECE])
                record["sent"] += len(BODY[at:at + PIECE])
                if record["sent"] >= KILL_AFTER:
                    self.half_sent.set()
                await asyncio.sleep(PACE_S)
        except ConnectionError:  # the executor died mid-body
            return resp
        await resp.write_eof()
        return resp


async def test_executor_killed_mid_download_resumes_from_its_bytes(chaos_settings):
    origin = SlowOrigin()
    url = await origin.start()
    # The origin listens on 127.0.0.1: allowed as a single-tenant install would.
    settings = await chaos_settings(executor_allow_private_urls=True)
    stack = await ProcStack(settings).start("billing", "coordinator", "notifier", "executor")
    try:
        tenant = await stack.tenant(monthly=100)
        await stack.call("coordinator", "put_settings", tenant_id=tenant, auto_retries=3, backoff_base_ms=50,
                         backoff_max_ms=200, breaker_failure_threshold=5, breaker_reset_s=1)
        template = await stack.template(tenant, [{"name": "fetch", "handler": "download"}])
        run_id = (await stack.submit(tenant, template, 0, files=[
            {"name": "file.bin", "url": url, "size": len(BODY), "sha256": SHA}]))["id"]

        await asyncio.wait_for(origin.half_sent.wait(), timeout=30)
        stack.kill("executor")  # blocks until it is dead: nothing more is sent meanwhile
        sent_before_kill = origin.requests[0]["sent"]
        since = time.monotonic()
        assert sent_before_kill < len(BODY), "the kill came after the whole body was sent"

        await wait_all_terminal(stack, tenant, [run_id], timeout=30)
        run = await stack.run(tenant, run_id)
        [f] = run["files"]
        assert run["status"] == "COMPLETED", (f["status"], f["attempts"], f["last_error"])
        assert stack.deaths.get("executor") == 1  # the watcher brought it back, once

        # One request before the kill, one after: resumed where the disk had it.
        assert len(origin.requests) == 2, origin.requests
        first, resumed = origin.requests
        assert (first["range"], first["if_range"]) == (None, None)
        m = re.fullmatch(r"bytes=(\d+)-", resumed["range"] or "")
        assert m, f"the request after the kill did not resume: {resumed}"
        offset = int(m.group(1))
        assert 0 < offset <= sent_before_kill, (offset, sent_before_kill)
        assert resumed["if_range"] == ETAG and resumed["status"] == 206

        out = f["output"]
        assert out["sha256"] == SHA and out["size"] == len(BODY)
        assert out["resumed_from"] == offset
        assert hashlib.sha256(Path(out["path"]).read_bytes()).hexdigest() == SHA

        # A kill is not a failed attempt (job_runner/progress.py count only the handler's
        # failures): the file succeeded at its first attempt, and nothing was retried.
        assert f["attempts"] == 1, f
        timeline = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run_id))["items"]
        assert not [e for e in timeline if e["kind"] == "file_retrying"], timeline

        figures = await check(stack, tenant, [run_id])  # nothing lost, no double charge, books balance
        entries = [e for e in await stack.ledger(tenant) if e["run_id"] == run_id]
        charges = [e for e in entries if e["kind"] == "charge"]
        assert sum(-e["amount"] for e in charges) == 1, entries  # one file, one credit
        assert sum(e["amount"] for e in entries) == -1, entries  # and nothing refunded or voided
        FIGURES.append({"scenario": "kill -9 executor mid-download", **figures,
                        "recovery_s": time.monotonic() - since})
        print(f"sent before kill {sent_before_kill}, resumed at {offset}, recovery {time.monotonic() - since:.1f}s")
    finally:
        await stack.stop()
        await origin.runner.cleanup()
