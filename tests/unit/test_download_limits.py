"""A download writes at most REDRIVE_EXECUTOR_MAX_DOWNLOAD_BYTES, and no more than the file's
expected size; the executor removes run directories of artifacts untouched for
REDRIVE_EXECUTOR_ARTIFACT_RETENTION_HOURS. Against a local aiohttp server on 127.0.0.1,
reached as with REDRIVE_EXECUTOR_ALLOW_PRIVATE_URLS=true (as in test_handlers.py)."""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import ValidationError
from structlog.testing import capture_logs

from shared.errors import PermanentError, TransientError
from services.executor import artifacts
from services.executor.artifacts import ArtifactSweeper, sweep
from services.executor.handlers import download
from services.executor.handlers.base import FileRef, StepContext
from services.executor.handlers.registry import builtin_registry
from tests.stack import Stack
from tests.unit.test_settings_bounds import env  # noqa: F401  (a fixture: settings from a clean environment)

LIMIT = 256 * 1024
BODY = random.Random(5).randbytes(LIMIT + 64 * 1024)  # over the limit
SMALL = BODY[:100_000]  # within it
fetch = builtin_registry(allow_private_urls=True, max_download_bytes=LIMIT).get("download").run
NAMES_THE_LIMIT = f"over the download limit of {LIMIT} bytes (REDRIVE_EXECUTOR_MAX_DOWNLOAD_BYTES)"
HANG_S = 10  # a download that does not stop early hangs on these servers: fail, do not wait for the timeout


def _fetch_within(ctx: StepContext):
    """Download under a limit BODY just fits in (``>``, not ``>=``): only the expected size can stop it."""
    return builtin_registry(allow_private_urls=True, max_download_bytes=len(BODY)).get("download").run(ctx)


def make_ctx(tmp_path: Path, url: str, *, size: int | None = None, params: dict | None = None) -> StepContext:
    return StepContext(job_id="run1:file:0:r0", run_id="run1", tenant_id="t1", file_index=0, round=0, attempt=1,
                       step_index=0, step_name="get", params=params or {}, file=FileRef("a.bin", url=url, size=size),
                       previous_output=None, artifact_root=tmp_path / "artifacts")


class Feed:
    """A file server that records requests; some of its answers never end."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.release = asyncio.Event()  # what hangs, hangs until the test ends
        app = web.Application()
        app.router.add_get("/file", self.file)          # BODY with its Content-Length; honours Range (206)
        app.router.add_get("/huge", self.huge)          # announces a terabyte, sends 1,000 bytes, hangs
        app.router.add_get("/endless", self.endless)    # no length (chunked), bytes for ever
        app.router.add_get("/trickle", self.trickle)    # no length, ?n= bytes, then hangs without ending
        self.server = TestServer(app, host="127.0.0.1")

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def file(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, request.headers.get("Range")))
        if rng := request.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            return web.Response(status=206, body=BODY[start:],
                                headers={"Content-Range": f"bytes {start}-{len(BODY) - 1}/{len(BODY)}"})
        return web.Response(body=BODY)

    async def huge(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, None))
        resp = web.StreamResponse(headers={"Content-Length": str(10**12)})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        await self.release.wait()
        return resp

    async def endless(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, None))
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b"y" * 65536
        for _ in range(1024):  # 64 MiB at most, should a client read on and on
            await resp.write(chunk)
        return resp

    async def trickle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, None))
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(BODY[:int(request.query["n"])])
        await self.release.wait()
        return resp


@pytest.fixture
async def feed():
    found = Feed()
    await found.server.start_server()
    yield found
    found.release.set()
    await found.server.close()


def _left_in(ctx: StepContext) -> list[str]:
    return sorted(p.name for p in ctx.artifact_dir.iterdir()) if ctx.artifact_dir.exists() else []


# --- the download limit -----------------------------------------------------------------------


async def test_an_expected_size_over_the_limit_is_refused_before_any_request(tmp_path, feed):
    for ctx in (make_ctx(tmp_path / "file", feed.url("/file"), size=LIMIT + 1),  # the run's file.size
                make_ctx(tmp_path / "params", feed.url("/file"), params={"size": LIMIT + 1})):  # the step's
        with pytest.raises(PermanentError) as refused:
            await fetch(ctx)
        assert str(refused.value) == \
            f"download {feed.url('/file')}: expected size {LIMIT + 1} bytes is {NAMES_THE_LIMIT}"
        assert _left_in(ctx) == []
    assert feed.seen == []
    # An expected size of the limit exactly is asked for (and the server's answer is what is refused).
    with pytest.raises(PermanentError, match="the server announces"):
        await fetch(make_ctx(tmp_path / "at", feed.url("/file"), size=LIMIT))
    assert len(feed.seen) == 1


async def test_a_content_length_over_the_limit_is_refused_before_the_body_is_read(tmp_path, feed):
    ctx = make_ctx(tmp_path, feed.url("/huge"))
    with pytest.raises(PermanentError) as refused:
        await asyncio.wait_for(fetch(ctx), HANG_S)  # its body never ends: reading any of it would hang
    assert str(refused.value) == f"download {feed.url('/huge')}: the server announces {10**12} bytes, {NAMES_THE_LIMIT}"
    assert _left_in(ctx) == []  # no partial bytes, no sidecar


async def test_a_resumed_range_whose_total_is_over_the_limit_is_refused_and_its_part_deleted(tmp_path, feed):
    ctx = make_ctx(tmp_path, feed.url("/file"))
    ctx.artifact_dir.mkdir(parents=True)
    (ctx.artifact_dir / "download.part").write_bytes(BODY[:1000])  # an earlier attempt's bytes
    with pytest.raises(PermanentError) as refused:
        await fetch(ctx)
    assert feed.seen == [("/file", "bytes=1000-")]  # answered 206, bytes 1000-…/<total>
    assert str(refused.value).endswith(f"the server announces {len(BODY)} bytes, {NAMES_THE_LIMIT}")
    assert _left_in(ctx) == []  # the next attempt does not resume a file too big to keep


async def test_a_body_without_a_length_is_cut_off_at_the_limit(tmp_path, feed, monkeypatch):
    written: list[int] = []  # the part's size each time a chunk is about to be written
    check_room = download._check_room

    def spy(size, said, offset, want_size, max_bytes):
        part = ctx.artifact_dir / download.PART
        written.append(part.stat().st_size)
        check_room(size, said, offset, want_size, max_bytes)

    monkeypatch.setattr(download, "_check_room", spy)
    ctx = make_ctx(tmp_path, feed.url("/endless"))
    with pytest.raises(PermanentError) as refused:
        await asyncio.wait_for(fetch(ctx), HANG_S)
    said = re.fullmatch(rf"download {re.escape(feed.url('/endless'))}: got at least (\d+) bytes, "
                        rf"{re.escape(NAMES_THE_LIMIT)}", str(refused.value))
    assert said and LIMIT < int(said.group(1)) <= LIMIT + download.CHUNK, str(refused.value)  # stopped at once
    assert max(written) <= LIMIT  # the disk never held more than the limit
    assert _left_in(ctx) == []


async def test_a_file_of_exactly_the_limit_is_downloaded(tmp_path, feed):
    out = await _fetch_within(make_ctx(tmp_path, feed.url("/file"), size=len(BODY)))
    assert out["size"] == len(BODY) and Path(out["path"]).read_bytes() == BODY


async def test_a_body_past_the_expected_size_stops_there_as_a_size_mismatch(tmp_path, feed):
    ctx = make_ctx(tmp_path, feed.url("/trickle") + f"?n={len(SMALL) + 1}", size=len(SMALL))
    with pytest.raises(PermanentError) as refused:
        await asyncio.wait_for(fetch(ctx), HANG_S)  # the body never ends: only stopping early returns
    assert str(refused.value) == (f"download {feed.url('/trickle')}: size mismatch: got at least {len(SMALL) + 1} "
                                  f"bytes, expected {len(SMALL)}")
    assert _left_in(ctx) == []


async def test_a_length_past_the_expected_size_is_a_size_mismatch_before_the_body(tmp_path, feed):
    fresh = make_ctx(tmp_path / "fresh", feed.url("/file"), size=len(SMALL))
    with pytest.raises(PermanentError, match=rf"size mismatch: the server announces {len(BODY)} bytes, "
                                             rf"expected {len(SMALL)}$"):
        await _fetch_within(fresh)
    assert _left_in(fresh) == []
    # After a resume the splice may be what is wrong: transient, and the next attempt starts from 0.
    resumed = make_ctx(tmp_path / "resumed", feed.url("/file"), size=len(SMALL))
    resumed.artifact_dir.mkdir(parents=True)
    (resumed.artifact_dir / "download.part").write_bytes(BODY[:1000])
    with pytest.raises(TransientError, match=r"size mismatch: .* after resuming at byte 1000$"):
        await _fetch_within(resumed)
    assert _left_in(resumed) == []


def test_both_settings_are_read_from_their_variables(env):
    defaults = env()
    assert defaults.executor_max_download_bytes == download.DEFAULT_MAX_BYTES == 10 * 2**30
    assert defaults.executor_artifact_retention_hours == 168  # a week
    s = env(REDRIVE_EXECUTOR_MAX_DOWNLOAD_BYTES="1048576", REDRIVE_EXECUTOR_ARTIFACT_RETENTION_HOURS="0")
    assert (s.executor_max_download_bytes, s.executor_artifact_retention_hours) == (2**20, 0)  # 0: kept forever


@pytest.mark.parametrize("variable, value", [
    ("REDRIVE_EXECUTOR_MAX_DOWNLOAD_BYTES", "0"), ("REDRIVE_EXECUTOR_MAX_DOWNLOAD_BYTES", "1023"),
    ("REDRIVE_EXECUTOR_MAX_DOWNLOAD_BYTES", "10GB"), ("REDRIVE_EXECUTOR_MAX_DOWNLOAD_BYTES", str(2**50 + 1)),
    ("REDRIVE_EXECUTOR_ARTIFACT_RETENTION_HOURS", "-1"), ("REDRIVE_EXECUTOR_ARTIFACT_RETENTION_HOURS", "inf"),
    ("REDRIVE_EXECUTOR_ARTIFACT_RETENTION_HOURS", "876601"),
])
def test_a_bad_value_is_refused_naming_its_variable(env, variable, value):
    with pytest.raises(ValidationError) as refused:
        env(**{variable: value})
    assert [str(e["loc"][0]).upper() for e in refused.value.errors()] == [variable.removeprefix("REDRIVE_")]


# --- artifact retention -----------------------------------------------------------------------

HOUR = 3600


def _tree(root: Path, tenant: str, run: str, *, age_s: float) -> Path:
    """A run directory holding one file's artifact, everything in it ``age_s`` old."""
    run_dir = root / tenant / run
    (run_dir / "0").mkdir(parents=True)
    (run_dir / "0" / "a.bin").write_bytes(b"bytes")
    _age(run_dir, age_s)
    return run_dir


async def _until(done, timeout_s: float = 10) -> None:
    """Wait, bounded, until ``done()``: no fixed sleeps, no hanging test."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def _age(path: Path, age_s: float) -> None:
    """Set the mtime of ``path`` and all below it (links themselves, not their targets)."""
    when = time.time() - age_s
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (when, when), follow_symlinks=False)
    os.utime(path, (when, when), follow_symlinks=False)


def test_run_directories_untouched_past_the_retention_go_and_the_rest_stay(tmp_path):
    root = tmp_path / "artifacts"
    old = _tree(root, "t1", "old", age_s=3 * HOUR)
    fresh = _tree(root, "t1", "fresh", age_s=0)
    resuming = _tree(root, "t2", "resuming", age_s=3 * HOUR)
    (resuming / "0" / "a.bin").touch()  # one file written just now: the run is in use
    removed, failed = sweep(root, 2 * HOUR)
    assert (removed, failed) == (["t1/old"], [])
    assert not old.exists() and fresh.exists() and resuming.exists() and (root / "t1").is_dir()
    assert sweep(tmp_path / "none-yet", 2 * HOUR) == ([], [])  # no artifacts directory: nothing to do


async def test_the_sweeper_sweeps_at_start_and_logs_one_line(tmp_path):
    root = tmp_path / "artifacts"
    old, fresh = _tree(root, "t1", "old", age_s=3 * HOUR), _tree(root, "t1", "fresh", age_s=0)
    sweeper = ArtifactSweeper(root, retention_hours=2)
    with capture_logs() as logs:
        sweeper.start()
        await _until(lambda: sweeper.passes > 0)
        await sweeper.stop()
    assert not old.exists() and fresh.exists() and sweeper.passes == 1
    [line] = [entry for entry in logs if entry["event"].startswith("artifacts.")]
    assert (line["event"], line["removed"], line["runs"], line["failed"]) == ("artifacts.swept", 1, ["t1/old"], 0)


async def test_the_sweeper_logs_a_failed_sweep_and_sweeps_again(tmp_path, monkeypatch):
    def broken(root, older_than_s):
        raise PermissionError("nope")

    monkeypatch.setattr(artifacts, "sweep", broken)
    sweeper = ArtifactSweeper(tmp_path, retention_hours=1, every_s=0.01)
    with capture_logs() as logs:
        sweeper.start()
        await _until(lambda: sweeper.passes >= 2)  # the loop lives on after a failed sweep
        await sweeper.stop()
    assert [e["event"] for e in logs if e["event"].startswith("artifacts.")][:2] == ["artifacts.sweep_failed"] * 2


async def test_a_retention_of_0_keeps_everything(tmp_path):
    root = tmp_path / "artifacts"
    ancient = _tree(root, "t1", "ancient", age_s=20 * 365 * 24 * HOUR)
    sweeper = ArtifactSweeper(root, retention_hours=0, every_s=0.01)
    sweeper.start()
    await asyncio.sleep(0.1)  # were it sweeping, it would have swept several times by now
    assert await sweeper.sweep_once() == []
    await sweeper.stop()
    assert ancient.exists() and sweeper.passes == 0  # no loop at all


def test_the_sweep_follows_no_symlink_out_of_the_root(tmp_path):
    root, outside = tmp_path / "artifacts", tmp_path / "outside"
    keep = _tree(outside, "elsewhere", "run", age_s=3 * HOUR)  # would go, were it under the root
    fresh_outside = _tree(outside, "elsewhere", "fresh", age_s=0)
    # An old run holding links to old and to fresh places outside: the run goes (a link's
    # target is neither judged nor removed), the places stay.
    linking = _tree(root, "t1", "linking", age_s=0)
    (linking / "0" / "to-old").symlink_to(keep)
    (linking / "0" / "to-fresh").symlink_to(fresh_outside)
    _age(linking, 3 * HOUR)
    # Links standing for a tenant and for a run, both to old places outside: not followed.
    (root / "t-linked").symlink_to(outside / "elsewhere")
    (root / "t1" / "run-linked").symlink_to(keep)
    _age(root / "t1", 3 * HOUR)
    removed, failed = sweep(root, 2 * HOUR)
    assert (removed, failed) == (["t1/linking"], [])
    assert keep.exists() and (keep / "0" / "a.bin").read_bytes() == b"bytes" and fresh_outside.exists()
    assert (root / "t-linked").is_symlink() and (root / "t1" / "run-linked").is_symlink()


# --- through the executor's composition root ----------------------------------------------------


async def test_the_executor_applies_both_settings(make_settings, feed):
    settings = await make_settings(executor_allow_private_urls=True, executor_max_download_bytes=LIMIT,
                                   executor_artifact_retention_hours=1)
    root = settings.data_dir / "artifacts"
    old, fresh = _tree(root, "t-old", "run-old", age_s=2 * HOUR), _tree(root, "t-old", "run-fresh", age_s=0)
    stack = await Stack(settings).start("billing", "coordinator", "executor")
    try:
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "get", "handler": "download"}])
        run = await stack.submit(tenant, template, 0, files=[{"name": "a.bin", "url": feed.url("/file")}])
        [file] = (await stack.wait_run(tenant, run["id"]))["files"]
        assert (file["status"], file["attempts"], file["last_error"]["transient"]) == ("ERROR", 1, False)
        assert file["last_error"]["message"].endswith(f"the server announces {len(BODY)} bytes, {NAMES_THE_LIMIT}")
        await _until(lambda: not old.exists())  # swept at the executor's start
        assert fresh.exists()
    finally:
        await stack.stop()
