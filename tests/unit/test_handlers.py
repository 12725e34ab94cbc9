"""Built-in step handlers and their registry, against local aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from shared.errors import PermanentError, TransientError
from services.executor.handlers import checksum, download, flaky, http_call, noop
from services.executor.handlers.base import FileRef, StepContext
from services.executor.handlers.registry import HandlerRegistry, builtin_registry

ROOT = Path(__file__).resolve().parents[2]
BODY = random.Random(3).randbytes(1 << 20)  # 1 MiB, the same bytes every run
BODY_SHA = hashlib.sha256(BODY).hexdigest()
CUT = 300_000
ETAG = '"v1"'


def make_ctx(tmp_path: Path, params: dict | None = None, *, name: str = "a.bin", url: str | None = None,
             content: bytes | None = None, size: int | None = None, sha256: str | None = None,
             attempt: int = 1, round_: int = 0, job_id: str = "run1:file:0:r0",
             previous_output: dict | None = None, heartbeat=None) -> StepContext:
    content_b64 = base64.b64encode(content).decode() if content is not None else None
    return StepContext(
        job_id=job_id, run_id="run1", tenant_id="t1", file_index=0, round=round_, attempt=attempt,
        step_index=0, step_name="step", params=params or {},
        file=FileRef(name=name, url=url, content_b64=content_b64, size=size, sha256=sha256),
        previous_output=previous_output, artifact_root=tmp_path / "artifacts", heartbeat=heartbeat,
    )


# --- registry -------------------------------------------------------------------------------


def test_registry_builtins_and_unknown_handler():
    registry = builtin_registry()
    assert registry.names() == ["checksum", "download", "flaky", "http_call", "noop"]
    assert registry.get("flaky").dependency_of({"dependency": "ocr"}, FileRef("a")) == "ocr"
    with pytest.raises(PermanentError, match="unknown handler 'nope'"):
        registry.get("nope")


async def test_registry_decorator_form(tmp_path):
    registry = HandlerRegistry()

    @registry.handler("twice", dependency_of=lambda params, file: "svc")
    async def twice(ctx):
        return {"n": 2}

    assert await registry.get("twice").run(make_ctx(tmp_path)) == {"n": 2}
    assert registry.get("twice").dependency_of({}, FileRef("a")) == "svc"


async def test_load_modules_registers_application_handlers(tmp_path, monkeypatch):
    (tmp_path / "redrive_app_handlers_ok.py").write_text(textwrap.dedent("""
        async def shout(ctx):
            return {"name": ctx.file.name.upper()}

        def register(registry):
            registry.register("shout", shout)
    """))
    (tmp_path / "redrive_app_handlers_noreg.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = builtin_registry()
    registry.load_modules(" redrive_app_handlers_ok , ")
    assert "shout" in registry.names() and "noop" in registry.names()
    assert await registry.get("shout").run(make_ctx(tmp_path, name="abc")) == {"name": "ABC"}
    with pytest.raises(ValueError, match="cannot import 'redrive_app_handlers_missing'"):
        registry.load_modules("redrive_app_handlers_missing")
    with pytest.raises(ValueError, match="has no register"):
        registry.load_modules("redrive_app_handlers_noreg")


async def test_noop(tmp_path):
    assert await noop.run(make_ctx(tmp_path)) == {}


# --- flaky ----------------------------------------------------------------------------------


async def test_flaky_fail_attempts_each_round(tmp_path):
    for round_ in (0, 1):
        for attempt in (1, 2):
            with pytest.raises(TransientError, match=rf"\(attempt {attempt}\)"):
                await flaky.run(make_ctx(tmp_path, {"fail_attempts": 2}, attempt=attempt, round_=round_))
        assert await flaky.run(make_ctx(tmp_path, {"fail_attempts": 2}, attempt=3, round_=round_)) == {"attempt": 3}


async def test_flaky_fail_rounds(tmp_path):
    for round_ in (0, 1):
        for attempt in (1, 5):
            with pytest.raises(TransientError):
                await flaky.run(make_ctx(tmp_path, {"fail_rounds": 2}, attempt=attempt, round_=round_))
    assert await flaky.run(make_ctx(tmp_path, {"fail_rounds": 2}, round_=2)) == {"attempt": 1}


async def test_flaky_poison_is_permanent(tmp_path):
    with pytest.raises(PermanentError, match="poison"):
        await flaky.run(make_ctx(tmp_path, {"poison": r"^bad"}, name="bad-3.csv"))
    assert await flaky.run(make_ctx(tmp_path, {"poison": r"^bad"}, name="good.csv")) == {"attempt": 1}


async def test_flaky_p_is_deterministic_per_job_and_attempt(tmp_path):
    async def outcome(job_id: str, attempt: int) -> bool:
        try:
            await flaky.run(make_ctx(tmp_path, {"p": 0.5}, job_id=job_id, attempt=attempt))
            return True
        except TransientError:
            return False

    first = [await outcome(f"job{i}", a) for i in range(20) for a in (1, 2)]
    again = [await outcome(f"job{i}", a) for i in range(20) for a in (1, 2)]
    assert first == again and True in first and False in first  # seeded, and really random
    assert await flaky.run(make_ctx(tmp_path, {"p": 0})) == {"attempt": 1}
    with pytest.raises(TransientError):
        await flaky.run(make_ctx(tmp_path, {"p": 1}))


@pytest.mark.parametrize("params", [
    {"p": 1.5}, {"p": "0.5"}, {"fail_attempts": 1.5}, {"fail_attempts": True}, {"sleep_ms": -1},
    {"fail_rounds": float("nan")}, {"poison": "("}, {"crash": 3}, {"dependency": 5},
])
async def test_flaky_rejects_bad_params(tmp_path, params):
    with pytest.raises(PermanentError, match="flaky: param"):
        await flaky.run(make_ctx(tmp_path, params))


def test_flaky_crash_exits_the_process(tmp_path):
    snippet = textwrap.dedent("""
        import asyncio
        from pathlib import Path
        from services.executor.handlers import flaky
        from services.executor.handlers.base import FileRef, StepContext

        def ctx(name):
            return StepContext(job_id="j", run_id="r", tenant_id="t", file_index=0, round=0, attempt=1,
                               step_index=0, step_name="s", params={"crash": "^boom"}, file=FileRef(name),
                               previous_output=None, artifact_root=Path("."))

        print(asyncio.run(flaky.run(ctx("fine.txt"))), flush=True)
        asyncio.run(flaky.run(ctx("boom.txt")))
        print("survived", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == flaky.CRASH_EXIT_CODE == 86, proc.stderr
    assert proc.stdout.strip() == "{'attempt': 1}"


# --- checksum -------------------------------------------------------------------------------


async def test_checksum_of_inline_content(tmp_path):
    out = await checksum.run(make_ctx(tmp_path, content=b"hello"))
    assert out == {"sha256": hashlib.sha256(b"hello").hexdigest(), "size": 5}


async def test_checksum_bad_base64_and_nothing_to_hash(tmp_path):
    bad = make_ctx(tmp_path)
    bad.file = FileRef("a", content_b64="not*base64!")
    with pytest.raises(PermanentError, match="not valid base64"):
        await checksum.run(bad)
    with pytest.raises(PermanentError, match="checksum needs content_b64 or a downloaded artifact"):
        await checksum.run(make_ctx(tmp_path))
    with pytest.raises(PermanentError, match="missing"):
        await checksum.run(make_ctx(tmp_path, previous_output={"path": str(tmp_path / "gone")}))


async def test_checksum_of_downloaded_artifact(tmp_path):
    artifact = tmp_path / "big.bin"
    artifact.write_bytes(BODY * 3)  # over the threshold: hashed in a thread, in chunks
    out = await checksum.run(make_ctx(tmp_path, previous_output={"path": str(artifact)}))
    assert out == {"sha256": hashlib.sha256(BODY * 3).hexdigest(), "size": 3 * len(BODY)}


# --- download -------------------------------------------------------------------------------


class Origin:
    """A file server on 127.0.0.1 that records each request's Range and If-Range."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, str | None]] = []
        self.drop_first = True
        app = web.Application()
        app.router.add_get("/file", self.file)          # honours Range; first request cut at CUT
        app.router.add_get("/plain", self.plain)        # ignores Range: always 200
        app.router.add_get("/wrong-range", self.wrong_range)  # answers any Range with bytes 0-
        app.router.add_get("/status/{code}", self.status)
        app.router.add_post("/echo", self.echo)
        self.server = TestServer(app, host="127.0.0.1")

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def _record(self, request: web.Request) -> None:
        self.seen.append((request.path, request.headers.get("Range"), request.headers.get("If-Range")))

    async def file(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if self.drop_first:
            self.drop_first = False
            resp = web.StreamResponse(headers={"ETag": ETAG, "Content-Length": str(len(BODY))})
            await resp.prepare(request)
            await resp.write(BODY[:CUT])
            # close() flushes what was written, then hangs up mid-body: the client gets
            # exactly CUT bytes and a ClientPayloadError.
            request.transport.close()
            return resp
        start = 0
        if (rng := request.headers.get("Range")) and request.headers.get("If-Range", ETAG) == ETAG:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(BODY):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(BODY)}"})
            return web.Response(status=206, body=BODY[start:], headers={
                "ETag": ETAG, "Content-Range": f"bytes {start}-{len(BODY) - 1}/{len(BODY)}"})
        return web.Response(body=BODY, headers={"ETag": ETAG})

    async def plain(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(body=BODY)

    async def wrong_range(self, request: web.Request) -> web.Response:
        self._record(request)
        if request.headers.get("Range"):
            return web.Response(status=206, body=BODY, headers={"Content-Range": f"bytes 0-{len(BODY) - 1}/{len(BODY)}"})
        return web.Response(body=BODY)

    async def status(self, request: web.Request) -> web.Response:
        self._record(request)
        code = int(request.match_info["code"])
        return web.Response(status=code, text="nope", headers={"Retry-After": "7"} if code == 503 else {})

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append((request.path, request.headers.get("Idempotency-Key"), body.decode()))
        code = int(request.query.get("code", "200"))
        headers = {"Retry-After": request.query["retry_after"]} if "retry_after" in request.query else {}
        return web.Response(status=code, text="ok:" + "x" * 5000, headers=headers)


@pytest.fixture
async def origin():
    found = Origin()
    await found.server.start_server()
    yield found
    await found.server.close()


async def test_download_resumes_from_the_byte_where_the_connection_dropped(tmp_path, origin):
    ctx = make_ctx(tmp_path, url=origin.url("/file"), size=len(BODY), sha256=BODY_SHA)
    with pytest.raises(TransientError, match="ClientPayloadError"):
        await download.run(ctx)
    assert (ctx.artifact_dir / "download.part").stat().st_size == CUT
    out = await download.run(ctx)
    assert origin.seen == [("/file", None, None), ("/file", f"bytes={CUT}-", ETAG)]
    assert out == {"path": str(ctx.artifact_dir / "a.bin"), "size": len(BODY), "sha256": BODY_SHA, "resumed_from": CUT}
    assert Path(out["path"]).read_bytes() == BODY
    assert sorted(p.name for p in ctx.artifact_dir.iterdir()) == ["a.bin"]
    # Run again (the output was lost): the finished artifact is reused, nothing is fetched.
    assert (await download.run(ctx))["sha256"] == BODY_SHA and len(origin.seen) == 2


async def test_download_restarts_when_server_ignores_range(tmp_path, origin):
    ctx = make_ctx(tmp_path, url=origin.url("/plain"))
    ctx.artifact_dir.mkdir(parents=True)
    (ctx.artifact_dir / "download.part").write_bytes(b"\xff" * CUT)  # stale bytes from before
    out = await download.run(ctx)
    assert origin.seen == [("/plain", f"bytes={CUT}-", None)]
    assert out["resumed_from"] == 0 and out["size"] == len(BODY) and out["sha256"] == BODY_SHA


async def test_download_restarts_on_unexpected_content_range(tmp_path, origin):
    ctx = make_ctx(tmp_path, url=origin.url("/wrong-range"))
    ctx.artifact_dir.mkdir(parents=True)
    (ctx.artifact_dir / "download.part").write_bytes(b"\xff" * CUT)
    out = await download.run(ctx)
    assert [rng for _, rng, _ in origin.seen] == [f"bytes={CUT}-", None]
    assert out["resumed_from"] == 0 and out["sha256"] == BODY_SHA


async def test_download_416_with_complete_part_is_done(tmp_path, origin):
    origin.drop_first = False
    ctx = make_ctx(tmp_path, url=origin.url("/file"))
    ctx.artifact_dir.mkdir(parents=True)
    (ctx.artifact_dir / "download.part").write_bytes(BODY)
    out = await download.run(ctx)
    assert origin.seen == [("/file", f"bytes={len(BODY)}-", None)]
    assert out["sha256"] == BODY_SHA and out["resumed_from"] == len(BODY)


async def test_download_http_errors(tmp_path, origin):
    with pytest.raises(PermanentError, match="HTTP 404"):
        await download.run(make_ctx(tmp_path, url=origin.url("/status/404")))
    with pytest.raises(TransientError, match="HTTP 503") as info:
        await download.run(make_ctx(tmp_path, url=origin.url("/status/503")))
    assert info.value.retry_after_s == 7
    with pytest.raises(TransientError, match="HTTP 429") as info:
        await download.run(make_ctx(tmp_path, url=origin.url("/status/429")))
    assert info.value.retry_after_s is None
    with pytest.raises(PermanentError, match="needs an http"):
        await download.run(make_ctx(tmp_path))


async def test_download_connection_refused_is_transient(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on once this socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransientError, match="ClientConnectorError"):
        await download.run(make_ctx(tmp_path, url=f"http://127.0.0.1:{port}/x"))


async def test_download_size_mismatch(tmp_path, origin):
    origin.drop_first = False
    fresh = make_ctx(tmp_path / "fresh", url=origin.url("/file"), size=len(BODY) + 1)
    with pytest.raises(PermanentError, match="size mismatch"):
        await download.run(fresh)  # downloaded from 0 in this attempt: the input is wrong
    assert not (fresh.artifact_dir / "download.part").exists()
    resumed = make_ctx(tmp_path / "resumed", url=origin.url("/file"), sha256=BODY_SHA)
    resumed.artifact_dir.mkdir(parents=True)
    (resumed.artifact_dir / "download.part").write_bytes(b"\xff" * CUT)  # bytes of another version
    with pytest.raises(TransientError, match=r"sha256 mismatch: .* after resuming at byte 300000"):
        await download.run(resumed)
    assert not (resumed.artifact_dir / "download.part").exists()  # next attempt starts from 0
    assert (await download.run(resumed))["resumed_from"] == 0


async def test_download_heartbeats_at_most_once_a_second(tmp_path, origin, monkeypatch):
    origin.drop_first = False
    beats = []

    async def heartbeat():
        beats.append(1)

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(download, "time", SimpleNamespace(monotonic=lambda: clock.now))
    await download.run(make_ctx(tmp_path / "frozen", url=origin.url("/file"), heartbeat=heartbeat))
    assert beats == []  # the clock never moved: no heartbeat, however many chunks

    def ticking() -> float:
        clock.now += 0.5
        return clock.now

    monkeypatch.setattr(download, "time", SimpleNamespace(monotonic=ticking))
    await download.run(make_ctx(tmp_path / "ticking", url=origin.url("/file"), heartbeat=heartbeat))
    assert beats and len(beats) <= clock.now / download.HEARTBEAT_EVERY_S


def test_download_dependency_and_safe_names():
    assert download.dependency_of({}, FileRef("a", url="http://files.example:81/x")) == "files.example"
    assert download.dependency_of({"url": "https://other.example/y"}, FileRef("a")) == "other.example"
    assert download.safe_name("../../etc/passwd") == "passwd"
    assert download.safe_name("..") == "file_download"
    assert download.safe_name("download.part") == "file_download.part"
    assert download.safe_name("my report (1).pdf") == "my_report__1_.pdf"


# --- http_call ------------------------------------------------------------------------------


async def test_http_call_success_sends_content_and_idempotency_key(tmp_path, origin):
    out = await http_call.run(make_ctx(tmp_path, {"url": origin.url("/echo")}, content=b"payload"))
    assert out["status"] == 200 and out["body"] == ("ok:" + "x" * 5000)[:2000]
    assert origin.seen == [("/echo", "run1:file:0:r0:step", "payload")]
    await http_call.run(make_ctx(tmp_path, {"url": origin.url("/echo")}, size=3))
    assert origin.seen[1][2] == '{"name": "a.bin", "url": null, "size": 3}'


@pytest.mark.parametrize("code, error, retry_after", [
    (429, TransientError, 7.0), (500, TransientError, None), (400, PermanentError, None),
])
async def test_http_call_status_split(tmp_path, origin, code, error, retry_after):
    query = f"?code={code}" + ("&retry_after=7" if retry_after else "")
    with pytest.raises(error, match=f"HTTP {code}") as info:
        await http_call.run(make_ctx(tmp_path, {"url": origin.url("/echo") + query}))
    if error is TransientError:
        assert info.value.retry_after_s == retry_after


async def test_http_call_bad_params(tmp_path):
    for params in ({}, {"url": "ftp://x/y"}, {"url": "http://127.0.0.1/x", "timeout_s": 0}):
        with pytest.raises(PermanentError):
            await http_call.run(make_ctx(tmp_path, params))
    assert http_call.dependency_of({"url": "https://api.example:8443/v1"}, FileRef("a")) == "api.example"


async def test_http_call_timeout_is_transient(tmp_path):
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_post("/stall", stall)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        with pytest.raises(TransientError, match="TimeoutError"):
            await http_call.run(make_ctx(tmp_path, {"url": str(server.make_url("/stall")), "timeout_s": 0.2}))
    finally:
        release.set()
        await server.close()


def test_a_handlers_params_check_names_each_step_it_refuses():
    from services.executor.handlers.registry import builtin_registry

    registry = builtin_registry()
    registry.register("boom", noop.run, check_params=lambda params: 1 / 0)  # a broken check is reported, not hidden
    problems = registry.check_steps([
        {"handler": "flaky", "params": {"fail_attempts": 2, "poison": r"\.exe$"}},  # fine
        {"handler": "flaky", "params": {"poison": "(a+)+$["}},
        {"handler": "flaky", "params": {"p": 2}},
        {"handler": "noop", "params": {"anything": 1}},  # no check: anything goes
        {"handler": "http_call", "params": {"url": "https://example.com", "timeout_s": 0}},
        {"handler": "unknown-here", "params": {}},  # not this registry's to judge
        {"handler": "boom", "params": {}},
    ])
    assert set(problems) == {"steps.1.params", "steps.2.params", "steps.4.params", "steps.6.params"}
    assert "poison" in problems["steps.1.params"] and "regex" in problems["steps.1.params"]
    assert "'p'" in problems["steps.2.params"] and "timeout_s" in problems["steps.4.params"]
    assert problems["steps.6.params"].startswith("the handler's params check failed: ZeroDivisionError")
