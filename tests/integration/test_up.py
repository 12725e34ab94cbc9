"""`redrive up` as the README's first command runs it: embedded NATS and PostgreSQL in the
data directory, the five services as their own processes, the URL and key printed once the
API answers, a service or embedded server that dies restarted, Ctrl-C stops everything, and
a second `up` on the same data directory finds its data again."""

from __future__ import annotations

import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil

from redrive.api_client import Api
from shared.embedded import EmbeddedPostgres, free_port

# The embedded default, whatever servers the rest of the suite was given.
_SERVER_VARS = ("NATS_URL", "DATABASE_URL", "REDRIVE_NATS_URL", "REDRIVE_DATABASE_URL", "REDRIVE_PREFIX")


class _Up:
    def __init__(self, data_dir: Path, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _SERVER_VARS}
        self.proc = subprocess.Popen([sys.executable, "-m", "redrive", "up", "--data-dir", str(data_dir), "--port", str(port)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.printed: list[str] = []  # every line, for what must never be shown
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
            self.printed.append(line)

    def line_starting(self, prefix: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if prefix in line:
                return line[line.index(prefix) + len(prefix):].strip()
        raise AssertionError(f"`redrive up` printed no line with {prefix!r} within {timeout}s")

    def service_pid(self, name: str) -> int:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if child.cmdline()[-2:] == ["service", name]:
                return child.pid
        raise AssertionError(f"no {name} process")

    def nats_pid(self) -> int | None:
        found = [p.pid for p in psutil.Process(self.proc.pid).children() if p.name() == "nats-server" and _alive(p)]
        return found[0] if found else None

    def interrupt(self, timeout: float = 60) -> list[psutil.Process]:
        """Ctrl-C; returns what `up` had started (all of which must be gone)."""
        started = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout)
        return started


def _until(check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return found


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
            return resp.status == 200
    except OSError:  # 503 (HTTPError), or no answer
        return False


def _run_to_the_end(api: Api, template_id: str, files: int) -> dict:
    run = api.call("POST", "/workflow-runs", {"template_id": template_id, "files": [{"name": f"f{i}"} for i in range(files)]})
    return _finished(api, run["id"])


def _finished(api: Api, run_id: str) -> dict:
    return _until(lambda: (r := api.call("GET", f"/workflow-runs/{run_id}"))["status"] != "RUNNING" and r)


def _submit_through_503(api: Api, template_id: str, files: int, timeout: float = 20) -> str:
    """A run submitted as a client rides out a dependency coming back: again after each 503 (a
    service's pooled connection that died with PostgreSQL fails once), under the same
    Idempotency-Key, so that it is made (and charged) once."""
    body = json.dumps({"template_id": template_id, "files": [{"name": f"f{i}"} for i in range(files)]}).encode()
    headers = {"Authorization": f"Bearer {api.key}", "Content-Type": "application/json",
               "Idempotency-Key": uuid.uuid4().hex}

    def attempt() -> str | None:
        request = urllib.request.Request(f"{api.base_url}/api/v1/workflow-runs", body, headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return json.loads(resp.read())["id"]
        except urllib.error.HTTPError as exc:
            said = exc.read()
            if exc.code != 503:
                raise AssertionError(f"HTTP {exc.code}: {said[:300]!r}") from None
            return None

    return _until(attempt, timeout=timeout)


def test_up_starts_restarts_stops_and_finds_its_data_again(tmp_path):
    data_dir, port = tmp_path / "rd", free_port()
    first = _Up(data_dir, port)
    try:
        url = first.line_starting("API: ")
        key = first.line_starting("Admin key: ")
        api = Api(url, key)
        assert "purchased" in api.call("GET", "/credits")  # at once: the URL is printed once the API answers
        # runtime.json: the URLs carry the embedded servers' credentials, generated in the data dir.
        for secret in ("admin.key", "runtime.json", "nats.token", "postgres.password"):
            assert stat.S_IMODE((data_dir / secret).stat().st_mode) == 0o600, secret
        api.call("POST", "/admin/tenants/platform/credits", {"purchased": 10})
        template = api.call("POST", "/templates", {"name": "t", "steps": [{"name": "s", "handler": "noop"}]})
        done = _run_to_the_end(api, template["id"], 3)
        assert done["status"] == "COMPLETED" and done["counts"]["succeeded"] == 3

        os.kill(first.service_pid("executor"), signal.SIGKILL)
        first.line_starting("executor-0 exited")
        again = _run_to_the_end(api, template["id"], 2)  # the restarted executor runs it
        assert again["status"] == "COMPLETED" and again["counts"]["succeeded"] == 2

        # Its own servers too: each, killed -9, is started again on its port with its data, and
        # the services (not restarted) find it again. PostgreSQL is a daemon: no child of `up`.
        pg = EmbeddedPostgres(data_dir)
        for name, pid_of, ended in (("nats-server", first.nats_pid, "exited (-9)"), ("postgres", lambda: pg.pid, None)):
            services = {s: first.service_pid(s) for s in ("coordinator", "billing", "notifier", "executor", "gateway")}
            old = pid_of()
            os.kill(old, signal.SIGKILL)
            first.line_starting(f"redrive: {name} {ended or f'stopped (pid {old} is gone)'}; restarting in ", timeout=10)
            new = int(first.line_starting(f"redrive: {name} restarted (pid ", timeout=20).rstrip(")"))
            assert new != old and pid_of() == new, name
            _until(lambda: _ready(url), timeout=20)
            after = _finished(api, _submit_through_503(api, template["id"], 1))
            assert after["status"] == "COMPLETED" and after["counts"]["succeeded"] == 1, name
            assert {s: first.service_pid(s) for s in services} == services, f"a service was restarted ({name})"
    finally:
        started = first.interrupt()
    assert first.proc.returncode == 0
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "Ctrl-C left processes"
    assert EmbeddedPostgres(data_dir).pid is None, "Ctrl-C left PostgreSQL (restarted) running"
    _assert_credentials_never_shown(data_dir, "".join(first.printed))

    second = _Up(data_dir, port)
    try:
        assert second.line_starting("API: ") == url and second.line_starting("Admin key: ") == key
        assert api.call("GET", f"/workflow-runs/{done['id']}")["counts"]["succeeded"] == 3
        assert api.call("GET", "/credits")["purchased"]["remaining"] == 3  # 10 - (3 + 2 + 1 + 1) files
        # The README's `redrive demo`, and `run watch`, for scripts (--json), finding the system from its data dir.
        env = {**{k: v for k, v in os.environ.items() if k not in _SERVER_VARS}, "REDRIVE_DATA_DIR": str(data_dir)}
        demo = subprocess.run([sys.executable, "-m", "redrive", "demo", "--json"], env=env, capture_output=True,
                              text=True, timeout=120)
        assert demo.returncode == 0, demo.stderr
        shown = json.loads(demo.stdout)
        assert shown["run"]["status"] == "COMPLETED" and shown["dashboard"].startswith(url)
        assert all(f["attempts"] == 3 for f in shown["run"]["files"])  # each failed twice, then succeeded
        watched = subprocess.run([sys.executable, "-m", "redrive", "run", "watch", shown["run"]["id"], "--json"],
                                 env=env, capture_output=True, text=True, timeout=60)
        assert watched.returncode == 0 and json.loads(watched.stdout)["id"] == shown["run"]["id"]
        # A third `up` on the same directory would start a second nats-server on the live store.
        credits = api.call("GET", "/credits")
        third = subprocess.run([sys.executable, "-m", "redrive", "up", "--data-dir", str(data_dir), "--port",
                                str(free_port())], env=env, capture_output=True, text=True, timeout=60)
        assert third.returncode == 2 and f"{data_dir} is in use by another `redrive up` (pid {second.proc.pid})" \
            in third.stderr, third.stderr
        assert api.call("GET", "/credits") == credits  # the second goes on, untouched
    finally:
        started = psutil.Process(second.proc.pid).children(recursive=True)
        second.proc.kill()  # kill -9: nothing of it can stop its children
        try:
            # They stop with it all the same (SIGTERM from the kernel), but for PostgreSQL, a
            # daemon of its own, which the next `up` takes over.
            _until(lambda: not [p for p in started if _alive(p) and "postgres" not in p.name()], timeout=30)
        finally:
            EmbeddedPostgres(data_dir).stop()


def _assert_credentials_never_shown(data_dir: Path, printed: str) -> None:
    """Neither `up`'s output nor any log of the stack holds the embedded servers' credentials."""
    credentials = [(data_dir / name).read_text().strip() for name in ("nats.token", "postgres.password")]
    runtime = json.loads((data_dir / "runtime.json").read_text())
    assert credentials[0] in runtime["nats_url"] and credentials[1] in runtime["database_url"]
    logs = [*(data_dir / "logs").glob("*.log"), data_dir / "nats.log", EmbeddedPostgres(data_dir).log_path]
    for where, text in [("output", printed), *((str(log), log.read_text(errors="replace")) for log in logs)]:
        assert not [c for c in credentials if c in text], f"a credential in {where}"


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_service_waiting_for_nats_at_start_stops_on_sigterm(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in _SERVER_VARS}
    env.update(NATS_URL=f"nats://127.0.0.1:{free_port()}", DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
               REDRIVE_DATA_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "redrive", "service", "billing"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # it is starting: connecting to a NATS that is not there
            if "nats.error" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()


# `up` gives up (and stops everything it started) rather than print the URL of a system that
# will never answer, or restart for ever a service that cannot run as configured.

_REPO = Path(__file__).resolve().parents[2]


def _up_that_gives_up(data_dir: Path, *args: str, timeout: float = 90, **env: str) -> subprocess.CompletedProcess:
    """`redrive up` expected to exit on its own; Ctrl-C'd (and the test failed) if it does not."""
    command = [sys.executable, "-m", "redrive", "up", "--data-dir", str(data_dir), "--port", str(free_port()), *args]
    proc = subprocess.Popen(command, env={k: v for k, v in os.environ.items() if k not in _SERVER_VARS} | env, cwd=_REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"`redrive up` was still running after {timeout}s:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _left_behind(data_dir: Path) -> list[str]:
    """Live processes of the system in ``data_dir``: its nats-server and PostgreSQL, its services."""
    from shared.embedded import EmbeddedPostgres

    found = [f"postgres (pid {pid})"] if (pid := EmbeddedPostgres(data_dir).pid) else []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(data_dir) in cmdline or proc.environ().get("REDRIVE_DATA_DIR") == str(data_dir):
                found.append(cmdline)
        except psutil.Error:  # gone meanwhile, or not ours to look at
            pass
    return found


def _the_error(result: subprocess.CompletedProcess) -> str:
    text = result.stderr.strip()
    assert text.count("\n") == 0 and text.startswith("error: "), text
    assert "API:" not in result.stdout and "Admin key:" not in result.stdout, result.stdout
    return text


def test_up_with_handler_modules_that_do_not_load_starts_nothing(tmp_path):
    data_dir = tmp_path / "rd"
    refused = _up_that_gives_up(data_dir, REDRIVE_HANDLERS="myapp_that_is_not_there.handlers", timeout=60)
    assert refused.returncode == 2
    assert "REDRIVE_HANDLERS: cannot import 'myapp_that_is_not_there.handlers'" in _the_error(refused)
    assert not (data_dir / "runtime.json").exists() and not (data_dir / "logs").exists()
    assert not _left_behind(data_dir)


def test_up_stops_when_a_service_cannot_run_as_configured(tmp_path):
    """A service that exits 2 (its configuration) before the stack is ready: `up` names it and
    its error, and stops everything, instead of restarting it for ever. Here one nats-server
    cannot hold 3 replicas."""
    data_dir = tmp_path / "rd"
    data_dir.mkdir()
    (data_dir / "runtime.json").write_text(json.dumps({"prefix": "stale"}))  # an earlier `up`'s
    refused = _up_that_gives_up(data_dir, REDRIVE_STREAM_REPLICAS="3")
    assert refused.returncode == 2
    said = _the_error(refused)
    name = said.removeprefix("error: ").split()[0]
    assert name in ("coordinator", "executor-0", "notifier"), said  # the services that declare streams
    assert said.startswith(f"error: {name} could not start (exit 2): REDRIVE_STREAM_REPLICAS=3 needs a NATS cluster; "
                           "this server is not clustered (use 1); everything is stopped; see "
                           f"{data_dir / 'logs' / name}.log"), said
    assert not _left_behind(data_dir)
    assert json.loads((data_dir / "runtime.json").read_text())["prefix"] == "redrive"  # its own, not the stale one


def test_up_that_is_not_ready_in_time_stops_everything(tmp_path):
    data_dir = tmp_path / "rd"
    late = _up_that_gives_up(data_dir, "--ready-timeout", "5", REDRIVE_HANDLERS="tests.integration.handlers_that_hang")
    assert late.returncode == 1
    said = _the_error(late)
    assert "not ready after 5 s (--ready-timeout): no answer on NATS from executor" in said, said
    assert f"see {data_dir / 'logs'}" in said
    assert not _left_behind(data_dir)
