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
from urllib.parse import urlencode

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.test_utils import TestServer

from shared.destinations import Destinations, PublicOnlyResolver, redact_url
from shared.errors import PermanentError, TransientError
from services.executor.handlers import checksum, download, flaky, http_call, noop
from services.executor.handlers.base import FileRef, StepContext
from services.executor.handlers.registry import HandlerRegistry, builtin_registry

ROOT = Path(__file__).resolve().parents[2]
BODY = random.Random(3).randbytes(1 << 20)  # 1 MiB, the same bytes every run
BODY_SHA = hashlib.sha256(BODY).hexdigest()
CUT = 300_000
ETAG = '"v1"'
# The servers below listen on 127.0.0.1: the handlers reach them as a single-tenant install
# would, with REDRIVE_EXECUTOR_ALLOW_PRIVATE_URLS=true. By default they are refused (see the
# "destinations" tests).
LOCAL = builtin_registry(allow_private_urls=True)
fetch, call = LOCAL.get("download").run, LOCAL.get("http_call").run


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


def test_a_handler_module_whose_own_code_fails_is_one_line_saying_where(tmp_path, monkeypatch):
    """Not a traceback of 70 lines from `redrive up` or the executor: a line naming the module,
    the error and its place (exit 2 from the CLI, as for a module that is not there)."""
    (tmp_path / "redrive_app_raises.py").write_text("import os\nraise RuntimeError('OCR_URL is not set')\n")
    (tmp_path / "redrive_app_syntax.py").write_text("def register(registry:\n")
    (tmp_path / "redrive_app_badreg.py").write_text("def register(registry):\n    return {}['x']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = builtin_registry()
    with pytest.raises(ValueError) as raised:
        registry.load_modules("redrive_app_raises")
    assert str(raised.value) == (f"REDRIVE_HANDLERS: cannot import 'redrive_app_raises': RuntimeError: OCR_URL is not "
                                 f"set ({tmp_path / 'redrive_app_raises.py'}:2)")
    with pytest.raises(ValueError, match=r"cannot import 'redrive_app_syntax': SyntaxError: .*line 1"):
        registry.load_modules("redrive_app_syntax")
    with pytest.raises(ValueError, match=r"redrive_app_badreg.register failed: KeyError: 'x' \(.*redrive_app_badreg.py:2\)"):
        registry.load_modules("redrive_app_badreg")
    # A script's sys.exit() ended the executor with status 0 and not a word.
    (tmp_path / "redrive_app_exits.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / "redrive_app_exits_late.py").write_text("import sys\ndef register(registry):\n    sys.exit('no')\n")
    with pytest.raises(ValueError, match=r"^REDRIVE_HANDLERS: importing 'redrive_app_exits' called sys.exit\(0\)$"):
        registry.load_modules("redrive_app_exits")
    with pytest.raises(ValueError, match=r"^REDRIVE_HANDLERS: redrive_app_exits_late.register called sys.exit\('no'\)$"):
        registry.load_modules("redrive_app_exits_late")


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


def test_flaky_crash_exits_the_process_where_the_operator_allows_it(tmp_path):
    snippet = textwrap.dedent("""
        import asyncio
        from pathlib import Path
        from services.executor.handlers import flaky
        from services.executor.handlers.base import FileRef, StepContext

        def ctx(name):
            return StepContext(job_id="j", run_id="r", tenant_id="t", file_index=0, round=0, attempt=1,
                               step_index=0, step_name="s", params={"crash": "^boom"}, file=FileRef(name),
                               previous_output=None, artifact_root=Path("."))

        handler = flaky.Flaky(allow_crash=True)  # REDRIVE_EXECUTOR_ALLOW_CRASH=true
        print(asyncio.run(handler.run(ctx("fine.txt"))), flush=True)
        asyncio.run(handler.run(ctx("boom.txt")))
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
        await checksum.run(make_ctx(tmp_path, previous_output={"path": str(tmp_path / "artifacts" / "gone")}))


async def test_checksum_hashes_only_artifacts_of_its_own_run(tmp_path):
    elsewhere = tmp_path / "another-run" / "secret.bin"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"not yours")
    for path in (str(elsewhere), str(tmp_path / "artifacts" / ".." / "another-run" / "secret.bin"), "/etc/hostname"):
        with pytest.raises(PermanentError, match="not an artifact of this run"):
            await checksum.run(make_ctx(tmp_path, previous_output={"path": path}))


async def test_checksum_of_downloaded_artifact(tmp_path):
    artifact = tmp_path / "artifacts" / "0" / "0" / "big.bin"
    artifact.parent.mkdir(parents=True)
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
        app.router.add_route("*", "/redirect", self.redirect)  # ?to=<Location>&code=<3xx>
        app.router.add_get("/loop", self.loop)  # redirects to itself
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

    async def redirect(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(status=int(request.query.get("code", "302")), headers={"Location": request.query["to"]})

    async def loop(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.Response(status=302, headers={"Location": "/loop"})

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
        await fetch(ctx)
    assert (ctx.artifact_dir / "download.part").stat().st_size == CUT
    out = await fetch(ctx)
    assert origin.seen == [("/file", None, None), ("/file", f"bytes={CUT}-", ETAG)]
    assert out == {"path": str(ctx.artifact_dir / "a.bin"), "size": len(BODY), "sha256": BODY_SHA, "resumed_from": CUT}
    assert Path(out["path"]).read_bytes() == BODY
    assert sorted(p.name for p in ctx.artifact_dir.iterdir()) == ["a.bin"]
    # Run again (the output was lost): the finished artifact is reused, nothing is fetched.
    assert (await fetch(ctx))["sha256"] == BODY_SHA and len(origin.seen) == 2


async def test_download_restarts_when_server_ignores_range(tmp_path, origin):
    ctx = make_ctx(tmp_path, url=origin.url("/plain"))
    ctx.artifact_dir.mkdir(parents=True)
    (ctx.artifact_dir / "download.part").write_bytes(b"\xff" * CUT)  # stale bytes from before
    out = await fetch(ctx)
    assert origin.seen == [("/plain", f"bytes={CUT}-", None)]
    assert out["resumed_from"] == 0 and out["size"] == len(BODY) and out["sha256"] == BODY_SHA


async def test_download_restarts_on_unexpected_content_range(tmp_path, origin):
    ctx = make_ctx(tmp_path, url=origin.url("/wrong-range"))
    ctx.artifact_dir.mkdir(parents=True)
    (ctx.artifact_dir / "download.part").write_bytes(b"\xff" * CUT)
    out = await fetch(ctx)
    assert [rng for _, rng, _ in origin.seen] == [f"bytes={CUT}-", None]
    assert out["resumed_from"] == 0 and out["sha256"] == BODY_SHA


async def test_download_416_with_complete_part_is_done(tmp_path, origin):
    origin.drop_first = False
    ctx = make_ctx(tmp_path, url=origin.url("/file"))
    ctx.artifact_dir.mkdir(parents=True)
    (ctx.artifact_dir / "download.part").write_bytes(BODY)
    out = await fetch(ctx)
    assert origin.seen == [("/file", f"bytes={len(BODY)}-", None)]
    assert out["sha256"] == BODY_SHA and out["resumed_from"] == len(BODY)


async def test_download_http_errors(tmp_path, origin):
    with pytest.raises(PermanentError, match="HTTP 404"):
        await fetch(make_ctx(tmp_path, url=origin.url("/status/404")))
    with pytest.raises(TransientError, match="HTTP 503") as info:
        await fetch(make_ctx(tmp_path, url=origin.url("/status/503")))
    assert info.value.retry_after_s == 7
    with pytest.raises(TransientError, match="HTTP 429") as info:
        await fetch(make_ctx(tmp_path, url=origin.url("/status/429")))
    assert info.value.retry_after_s is None
    with pytest.raises(PermanentError, match="needs an http"):
        await fetch(make_ctx(tmp_path))


async def test_download_connection_refused_is_transient(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on once this socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransientError, match="ClientConnectorError"):
        await fetch(make_ctx(tmp_path, url=f"http://127.0.0.1:{port}/x"))


async def test_download_size_mismatch(tmp_path, origin):
    origin.drop_first = False
    fresh = make_ctx(tmp_path / "fresh", url=origin.url("/file"), size=len(BODY) + 1)
    with pytest.raises(PermanentError, match="size mismatch"):
        await fetch(fresh)  # downloaded from 0 in this attempt: the input is wrong
    assert not (fresh.artifact_dir / "download.part").exists()
    resumed = make_ctx(tmp_path / "resumed", url=origin.url("/file"), sha256=BODY_SHA)
    resumed.artifact_dir.mkdir(parents=True)
    (resumed.artifact_dir / "download.part").write_bytes(b"\xff" * CUT)  # bytes of another version
    with pytest.raises(TransientError, match=r"sha256 mismatch: .* after resuming at byte 300000"):
        await fetch(resumed)
    assert not (resumed.artifact_dir / "download.part").exists()  # next attempt starts from 0
    assert (await fetch(resumed))["resumed_from"] == 0


async def test_download_heartbeats_at_most_once_a_second(tmp_path, origin, monkeypatch):
    origin.drop_first = False
    beats = []

    async def heartbeat():
        beats.append(1)

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(download, "time", SimpleNamespace(monotonic=lambda: clock.now))
    await fetch(make_ctx(tmp_path / "frozen", url=origin.url("/file"), heartbeat=heartbeat))
    assert beats == []  # the clock never moved: no heartbeat, however many chunks

    def ticking() -> float:
        clock.now += 0.5
        return clock.now

    monkeypatch.setattr(download, "time", SimpleNamespace(monotonic=ticking))
    await fetch(make_ctx(tmp_path / "ticking", url=origin.url("/file"), heartbeat=heartbeat))
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
    out = await call(make_ctx(tmp_path, {"url": origin.url("/echo")}, content=b"payload"))
    assert out["status"] == 200 and out["body"] == ("ok:" + "x" * 5000)[:2000]
    assert origin.seen == [("/echo", "run1:file:0:r0:step", "payload")]
    await call(make_ctx(tmp_path, {"url": origin.url("/echo")}, size=3))
    assert origin.seen[1][2] == '{"name": "a.bin", "url": null, "size": 3}'


@pytest.mark.parametrize("code, error, retry_after", [
    (429, TransientError, 7.0), (500, TransientError, None), (400, PermanentError, None),
])
async def test_http_call_status_split(tmp_path, origin, code, error, retry_after):
    query = f"?code={code}" + ("&retry_after=7" if retry_after else "")
    with pytest.raises(error, match=f"HTTP {code}") as info:
        await call(make_ctx(tmp_path, {"url": origin.url("/echo") + query}))
    if error is TransientError:
        assert info.value.retry_after_s == retry_after


async def test_http_call_bad_params(tmp_path):
    for params in ({}, {"url": "ftp://x/y"}, {"url": "http://127.0.0.1/x", "timeout_s": 0}):
        with pytest.raises(PermanentError):
            await call(make_ctx(tmp_path, params))
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
            await call(make_ctx(tmp_path, {"url": str(server.make_url("/stall")), "timeout_s": 0.2}))
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


# --- destinations: public only, unless the operator allows private ones (SSRF) --------------------

DEFAULT = builtin_registry()  # as an executor runs with REDRIVE_EXECUTOR_ALLOW_PRIVATE_URLS unset
SECRET = "s3cret-token"


def _run(registry: HandlerRegistry, handler: str, tmp_path: Path, url: str):
    """Run ``handler`` of ``registry`` at ``url``: a member's file url, or a template's params.url."""
    ctx = make_ctx(tmp_path, url=url) if handler == "download" else make_ctx(tmp_path, {"url": url}, content=b"x")
    return registry.get(handler).run(ctx)


class _PublicLookingDNS(AbstractResolver):
    """``cdn.example.test`` resolves to 127.0.0.1 as if that were a public address (the stand-in
    for a public server); ``rebind.example.test`` resolves to 127.0.0.1 through the real
    public-only resolver, as a name a tenant controls would."""

    def __init__(self) -> None:
        self._public_only = PublicOnlyResolver(self)

    async def resolve(self, host, port=0, family=socket.AF_INET):
        if host not in ("cdn.example.test", "rebind.example.test"):
            raise OSError(f"{host}: no such name")
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


class _PublicLooking(Destinations):
    """Private destinations refused, with _PublicLookingDNS as the world's DNS."""

    def resolver(self):
        dns = _PublicLookingDNS()

        class Split(AbstractResolver):
            async def resolve(self, host, port=0, family=socket.AF_INET):
                resolver = dns if host == "cdn.example.test" else dns._public_only
                return await resolver.resolve(host, port, family)

            async def close(self):
                pass

        return Split()


def _cdn(origin: Origin, path: str, **query: str) -> str:
    """``path`` of the origin, reached as the public-looking cdn.example.test."""
    url = origin.url(path).replace("127.0.0.1", "cdn.example.test", 1)
    return url + ("?" + urlencode(query) if query else "")


@pytest.mark.parametrize("handler, path", [("download", "/plain"), ("http_call", "/echo")])
@pytest.mark.parametrize("host, refusal", [
    ("127.0.0.1", "must not point at a private or reserved address (127.0.0.1)"),
    ("localhost", "must not point at this machine (localhost)"),  # a name for 127.0.0.1, refused by name
    ("[::ffff:127.0.0.1]", "must not point at a private or reserved address (::ffff:127.0.0.1)"),
])
async def test_a_private_url_is_refused_for_good_unless_private_urls_are_allowed(tmp_path, origin, handler, path,
                                                                                  host, refusal):
    url = origin.url(path).replace("127.0.0.1", host, 1)
    with pytest.raises(PermanentError) as refused:
        await _run(DEFAULT, handler, tmp_path / "default", url)
    assert str(refused.value) == f"{handler}: {'params.url' if handler == 'http_call' else 'url'} {refusal}"
    with pytest.raises(PermanentError, match="must not point at"):  # the module's own run: the same default
        await (download.run if handler == "download" else http_call.run)(make_ctx(tmp_path, {"url": url}))
    assert origin.seen == []  # nothing was requested
    if host != "[::ffff:127.0.0.1]":  # (connecting to a mapped address needs a dual-stack host)
        out = await _run(LOCAL, handler, tmp_path / "allowed", url)
        assert out.get("sha256") == BODY_SHA or out.get("status") == 200
        assert len(origin.seen) == 1


@pytest.mark.parametrize("handler", ["download", "http_call"])
async def test_the_cloud_metadata_address_is_refused_unless_private_urls_are_allowed(tmp_path, handler):
    url = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    with pytest.raises(PermanentError, match=r"must not point at a private or reserved address \(169\.254\.169\.254\)"):
        await _run(DEFAULT, handler, tmp_path, url)


def test_a_template_calling_a_private_url_is_refused_when_made_unless_allowed():
    urls = ["http://127.0.0.1:4222/", "http://localhost/x", "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.7/x", "http://[64:ff9b::a9fe:a9fe]/x"]
    steps = [{"handler": "http_call", "params": {"url": url}} for url in urls]
    problems = DEFAULT.check_steps(steps)
    assert sorted(problems) == [f"steps.{i}.params" for i in range(len(urls))]
    assert problems["steps.2.params"] == "http_call: params.url must not point at a private or reserved address " \
                                         "(169.254.169.254)"
    assert LOCAL.check_steps(steps) == {}


@pytest.mark.parametrize("handler, path", [("download", "/plain"), ("http_call", "/echo")])
async def test_a_name_resolving_to_a_private_address_is_refused_at_connect_time(tmp_path, origin, handler, path):
    url = origin.url(path).replace("127.0.0.1", "rebind.example.test", 1)
    ctx = make_ctx(tmp_path, url=url) if handler == "download" else make_ctx(tmp_path, {"url": url})
    run = download.run if handler == "download" else http_call.run
    with pytest.raises(PermanentError, match="rebind.example.test resolves only to private or reserved addresses"):
        await run(ctx, destinations=_PublicLooking())
    assert origin.seen == []
    # The same server under a public-looking name is reached: only the private answer was refused.
    await run(make_ctx(tmp_path / "public", url=_cdn(origin, path)) if handler == "download"
              else make_ctx(tmp_path / "public", {"url": _cdn(origin, path)}), destinations=_PublicLooking())
    assert [p for p, *_ in origin.seen] == [path]


@pytest.mark.parametrize("target, refusal", [
    ("http://127.0.0.1:{port}/plain", "to http://127.0.0.1:{port}/plain refused: its url must not point at a "
                                      "private or reserved address (127.0.0.1)"),
    ("http://localhost:{port}/plain", "to http://localhost:{port}/plain refused: its url must not point at this "
                                      "machine (localhost)"),
    ("http://169.254.169.254/latest/meta-data/", "refused: its url must not point at a private or reserved address "
                                                 "(169.254.169.254)"),
    ("http://rebind.example.test:{port}/plain", "refused: rebind.example.test resolves only to private or reserved "
                                                "addresses"),
    ("file:///etc/passwd", "HTTP 302 redirect to a URL that is not http(s)"),
])
async def test_download_follows_no_redirect_to_a_private_place(tmp_path, origin, target, refusal):
    port = origin.server.port
    with pytest.raises(PermanentError) as refused:
        await download.run(make_ctx(tmp_path, url=_cdn(origin, "/redirect", to=target.format(port=port))),
                           destinations=_PublicLooking())
    assert refusal.format(port=port) in str(refused.value)
    assert str(refused.value).startswith(f"download http://cdn.example.test:{port}/redirect: ")
    assert [p for p, *_ in origin.seen] == ["/redirect"]  # the private place was never asked


async def test_download_follows_redirects_it_may(tmp_path, origin):
    origin.drop_first = False
    # A CDN's redirect (relative here) to a public place is followed, Range and all.
    ctx = make_ctx(tmp_path / "cdn", url=_cdn(origin, "/redirect", code="307", to="/file"), sha256=BODY_SHA)
    ctx.artifact_dir.mkdir(parents=True)
    (ctx.artifact_dir / "download.part").write_bytes(BODY[:CUT])
    out = await download.run(ctx, destinations=_PublicLooking())
    assert origin.seen == [("/redirect", f"bytes={CUT}-", None), ("/file", f"bytes={CUT}-", None)]
    assert out["resumed_from"] == CUT and out["sha256"] == BODY_SHA
    # Private destinations allowed: a redirect to 127.0.0.1 is followed too.
    origin.seen.clear()
    local = origin.url("/redirect") + "?" + urlencode({"to": origin.url("/plain")})
    out = await fetch(make_ctx(tmp_path / "local", url=local))
    assert out["sha256"] == BODY_SHA and [p for p, *_ in origin.seen] == ["/redirect", "/plain"]
    # A loop ends.
    origin.seen.clear()
    with pytest.raises(PermanentError, match="more than 10 redirects"):
        await download.run(make_ctx(tmp_path / "loop", url=_cdn(origin, "/loop")), destinations=_PublicLooking())
    assert [p for p, *_ in origin.seen] == ["/loop"] * 11


@pytest.mark.parametrize("code", [302, 307, 308])
async def test_http_call_follows_no_redirect(tmp_path, origin, code):
    port = origin.server.port
    public = _cdn(origin, "/redirect", code=str(code), to=origin.url("/echo") + f"?token={SECRET}")
    with pytest.raises(PermanentError) as refused:
        await http_call.run(make_ctx(tmp_path, {"url": public}), destinations=_PublicLooking())
    assert str(refused.value) == (f"http_call http://cdn.example.test:{port}/redirect: HTTP {code} redirect to "
                                  f"http://127.0.0.1:{port}/echo, not followed (a call goes only to params.url)")
    # Not even where private destinations are allowed: a call's body goes only where params.url says.
    local = origin.url("/redirect") + "?" + urlencode({"code": code, "to": origin.url("/echo")})
    with pytest.raises(PermanentError, match=f"HTTP {code} redirect to http://127.0.0.1:{port}/echo, not followed"):
        await call(make_ctx(tmp_path, {"url": local}))
    assert [p for p, *_ in origin.seen] == ["/redirect", "/redirect"]


def test_a_url_is_shown_without_credentials_query_or_fragment():
    assert redact_url(f"https://user:pa55@Files.Example:8443/a/b?token={SECRET}#frag") == \
        "https://files.example:8443/a/b"
    assert redact_url("http://[::1]:8080/x?y=1") == "http://[::1]:8080/x"
    assert redact_url("http://h/a b\x1b[2J") == "http://h/a b?[2J"
    assert redact_url("http://h/" + "p" * 500) == "http://h/" + "p" * 191 + "…"
    assert redact_url("http://[::1/x") == "(not a valid URL)"
    assert redact_url("user:pa55@host") == "(a URL without a host)"


async def test_messages_carry_no_credentials_query_or_whole_reply(tmp_path, origin):
    with socket.socket() as sock:  # a port nobody listens on once this socket is closed
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]

    def secret(url: str) -> str:  # the same URL with credentials, and a token in its query
        scheme, rest = url.split("://", 1)
        return f"{scheme}://user:pa55word@{rest}{'&' if '?' in rest else '?'}token={SECRET}"

    here, gone = f"http://127.0.0.1:{origin.server.port}", f"http://127.0.0.1:{closed}"
    cases = [  # (registry, handler, url, error, how its message starts)
        (DEFAULT, "download", f"{here}/plain", PermanentError, "download: url must not point at"),
        (LOCAL, "download", f"{here}/status/404", PermanentError, f"download {here}/status/404: HTTP 404"),
        (LOCAL, "download", f"{here}/status/503", TransientError, f"download {here}/status/503: HTTP 503"),
        (LOCAL, "download", f"{gone}/x", TransientError, f"download {gone}/x: ClientConnectorError"),
        (LOCAL, "http_call", f"{here}/echo?code=400", PermanentError, f"http_call {here}/echo: HTTP 400"),
        (LOCAL, "http_call", f"{gone}/x", TransientError, f"http_call {gone}/x: ClientConnectorError"),
        (LOCAL, "http_call", "ftp://127.0.0.1/x", PermanentError,
         "http_call needs params.url (an http or https URL), got 'ftp://127.0.0.1/x'"),
    ]
    for i, (registry, handler, url, error, start) in enumerate(cases):
        with pytest.raises(error) as failed:
            await _run(registry, handler, tmp_path / str(i), secret(url))
        said = str(failed.value)
        assert said.startswith(start) and "pa55word" not in said and SECRET not in said, said


async def test_a_reply_that_is_no_http_is_quoted_short_and_printable(tmp_path):
    """What a raw TCP service says (NATS's INFO banner) is no HTTP: a permanent error quoting a
    short, printable excerpt of it, not the banner."""
    banner = b'INFO {"server_id":"' + b"N" * 3000 + b'","auth_required":true}\x1b[2J\r\n'

    async def speak(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(speak, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for handler in ("download", "http_call"):
            with pytest.raises(PermanentError) as failed:
                await _run(LOCAL, handler, tmp_path / handler, f"http://user:pa55word@127.0.0.1:{port}/?token={SECRET}")
            said = str(failed.value)
            # No server said 400: aiohttp's parser refused the answer, and the error says so.
            assert said.startswith(f"{handler} http://127.0.0.1:{port}/: the answer is not valid HTTP (Bad status line")
            assert len(said) < 400 and said.isprintable() and "N" * 300 not in said, said
            assert "pa55word" not in said and SECRET not in said
    finally:
        server.close()
        await server.wait_closed()
