"""What the `redrive` CLI says when a user is one step from done: which key a refused request
used and how to give the right one; a watch that waits out a restart of the API; ids shown
whole in a narrow terminal; help that says what a command does. Against a fake API: an HTTP
server answering what each test scripts."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from redrive import run_commands
from tests.unit.test_cli_bad_input import cli, one_line_error  # noqa: F401 (cli: a fixture)

UNAUTHORIZED = {"error": {"code": "unauthorized", "message": "a valid API key is required (Authorization: Bearer <key>)"}}
UNAVAILABLE = {"error": {"code": "service_unavailable", "message": "coordinator is not available"}}
RUN_ID = "ef59bab3c3c14d0e9f1a2b3c4d5e6f70"


def _run(status: str) -> dict:
    return {"id": RUN_ID, "status": status, "round": 1,
            "counts": {"total": 2, "pending": 2 if status == "RUNNING" else 0, "succeeded": 0 if status == "RUNNING" else 2,
                       "failed": 0, "errored": 0, "skipped": 0, "cancelled": 0}}


def send_json(handler: http.server.BaseHTTPRequestHandler, status: int, body) -> None:
    """A fake API's answer: ``body`` as JSON with ``status``."""
    raw = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(raw)))
    handler.end_headers()
    handler.wfile.write(raw)

class _Scripted(http.server.BaseHTTPRequestHandler):
    """Answers each request with the next step of ``script`` (the last one repeats):
    (status, body) or "drop" (the connection closes with no answer)."""

    script: list = []
    served = threading.Event()  # set at each answer
    paths: list[str] = []  # what was asked, in order

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).paths.append(self.path)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if step == "drop":
            self.close_connection = True
            return
        status, body = step
        send_json(self, status, body)
        type(self).served.set()


class _Server:
    def __init__(self, script: list, port: int = 0) -> None:
        _Scripted.script = list(script)
        _Scripted.served = threading.Event()
        _Scripted.paths = []
        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Scripted)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.port = self.http.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def api(monkeypatch):
    """Start a fake API at REDRIVE_API_URL answering the given script."""
    started: list[_Server] = []

    def start(*script) -> _Server:
        server = _Server(list(script))
        started.append(server)
        monkeypatch.setenv("REDRIVE_API_URL", server.url)
        return server

    yield start
    for server in started:
        server.close()


# A command given only the data dir of a `redrive up` uses that stack's prefix (its streams).

def test_the_prefix_of_the_running_stack_applies_unless_the_environment_sets_one(tmp_path, monkeypatch):
    from shared.settings import load_settings

    monkeypatch.delenv("REDRIVE_PREFIX", raising=False)
    for name in ("NATS_URL", "REDRIVE_NATS_URL", "DATABASE_URL", "REDRIVE_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "runtime.json").write_text(json.dumps({"nats_url": "nats://127.0.0.1:4999", "prefix": "blue"}))
    assert load_settings(data_dir=tmp_path).prefix == "blue"
    assert load_settings(data_dir=tmp_path, runtime=False).prefix == "redrive"  # `up` itself: its own environment
    monkeypatch.setenv("NATS_URL", "nats://127.0.0.1:4999")
    assert load_settings(data_dir=tmp_path).prefix == "blue"  # the stack's NATS, named in the environment
    monkeypatch.setenv("NATS_URL", "nats://elsewhere:4222")
    assert load_settings(data_dir=tmp_path).prefix == "redrive"  # another NATS: not that stack's streams
    monkeypatch.delenv("NATS_URL")
    monkeypatch.setenv("REDRIVE_PREFIX", "green")
    assert load_settings(data_dir=tmp_path).prefix == "green"  # the environment wins
    monkeypatch.delenv("REDRIVE_PREFIX")
    (tmp_path / "runtime.json").write_text(json.dumps({"nats_url": "nats://127.0.0.1:4999", "prefix": "a.b"}))
    assert load_settings(data_dir=tmp_path).prefix == "redrive"  # not a prefix (edited by hand): ignored


# A 401 says which key it sent, or that it found none, and how to give the right one.

def test_a_refused_request_without_a_key_says_none_was_found_and_how_to_give_one(cli, api, tmp_path):
    api((401, UNAUTHORIZED))
    text = one_line_error(cli("credits"), "HTTP 401 unauthorized", "no API key found: REDRIVE_API_KEY is not set",
                          str(tmp_path / "data" / "admin.key"))
    assert "set REDRIVE_DATA_DIR=<dir> where `redrive up` wrote admin.key" in text and text.endswith("or REDRIVE_API_KEY)")


def test_a_refused_key_says_where_it_came_from(cli, api, tmp_path):
    api((401, UNAUTHORIZED))
    one_line_error(cli("credits", env={"REDRIVE_API_KEY": "rk_wrong"}), "HTTP 401", "key from REDRIVE_API_KEY",
                   "REDRIVE_DATA_DIR=<dir> where `redrive up` wrote admin.key")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "admin.key").write_text("rk_other_system\n")
    one_line_error(cli("attention"), "HTTP 401", f"key from {tmp_path / 'data' / 'admin.key'}", "REDRIVE_API_KEY")


# `run watch` waits out an outage of the API: a 503 (a service behind the gateway restarting),
# or no answer at all once the API had answered (the gateway restarting).

@pytest.mark.parametrize("as_json", [[], ["--json"]], ids=["bar", "json"])
def test_watch_waits_out_an_outage_and_says_so_once_per_outage(cli, api, as_json):
    api((200, _run("RUNNING")), (503, UNAVAILABLE), (503, UNAVAILABLE), (503, UNAVAILABLE), (200, _run("RUNNING")),
        "drop", "drop", (200, _run("COMPLETED")))
    result = cli("run", "watch", RUN_ID, "--interval", "0.1", *as_json, code=0)
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 2, notes  # two outages: one note each
    assert "HTTP 503 service_unavailable" in notes[0] and notes[0].endswith("still watching")
    assert "no answer from" in notes[1] and notes[1].endswith("still watching")
    if as_json:
        assert json.loads(result.stdout)["status"] == "COMPLETED"


def test_watch_waits_out_a_gateway_that_refuses_connections_while_it_restarts(api):
    first = api((200, _run("RUNNING")))
    env = {**os.environ, "REDRIVE_API_URL": first.url}
    watch = subprocess.Popen([sys.executable, "-m", "redrive", "run", "watch", RUN_ID, "--interval", "0.1", "--json"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _Scripted.served.wait(30), "the watch asked nothing"
        first.close()  # the gateway stops: connections are refused (or reset, if one was on its way in)
        note = watch.stderr.readline()
        assert ("Connection refused" in note or "Connection reset" in note) and note.rstrip().endswith("still watching"), note
        again = _Server([(200, _run("COMPLETED"))], port=first.port)  # back, on the same port
        try:
            out, err = watch.communicate(timeout=30)
        finally:
            again.close()
    finally:
        watch.kill()
    assert watch.returncode == 0, err
    assert json.loads(out)["status"] == "COMPLETED" and "error" not in err


def test_watch_gives_up_after_a_long_outage_with_the_error(cli, api, monkeypatch):
    monkeypatch.setattr(run_commands, "OUTAGE_LIMIT_S", 0.5)
    api((200, _run("RUNNING")), (503, UNAVAILABLE))
    result = cli("run", "watch", RUN_ID, "--interval", "0.1", "--json")
    note, error = result.stderr.strip().splitlines()
    assert note.endswith("still watching")
    assert error.startswith("error: HTTP 503 service_unavailable") and "gave up watching" in error, error


def test_watch_does_not_wait_for_an_api_that_never_answered(cli, api):
    """A first call with no answer is a URL where nothing runs (see test_cli_bad_input): at once."""
    server = api((200, _run("RUNNING")))
    server.close()
    one_line_error(cli("run", "watch", RUN_ID), "cannot reach", "Connection refused")


# Ids and statuses are shown whole, whatever the width.

def test_attention_shows_ids_and_statuses_whole_at_80_columns(api):
    items = [{"id": RUN_ID, "tenant_id": "0123456789abcdef", "status": "COMPLETED_WITH_ERRORS", "reason": "recovery_failed",
              "counts": {"total": 9, "pending": 0, "failed": 3, "errored": 1}},
             {"id": "aa" * 16, "tenant_id": "platform", "status": "FAILED", "reason": "failed",
              "counts": {"total": 9, "pending": 12, "failed": 3000, "errored": 0}}]
    server = api((200, {"items": items}))
    env = {**os.environ, "REDRIVE_API_URL": server.url, "COLUMNS": "80"}
    shown = subprocess.run([sys.executable, "-m", "redrive", "attention"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for item in items:
        row = next(line for line in lines if item["id"] in line)  # the whole id, on one line
        assert item["status"] in row.split() and item["reason"] in row.split()
    assert "…" not in shown.stdout


def test_demo_help_says_what_it_does(cli):
    text = " ".join(cli("demo", "--help", code=0).stdout.split())
    assert "platform tenant" in text and "10 purchased credits" in text and "demo tenant" not in text


# `run show` for a person: the run's state, cost and files as lines and a table (--json: the body).

def test_run_show_prints_the_run_for_a_person_and_asks_for_the_statuses_given(cli, api):
    run = {**_run("COMPLETED_WITH_ERRORS"), "mode": "per_file", "max_retry_count": 3, "needs_attention": True,
           "attention_reason": "failed", "credits": {"consumed": 2, "refunded": 0},
           "counts": {"total": 2, "succeeded": 1, "failed": 1, "errored": 0, "pending": 0, "skipped": 0, "cancelled": 0},
           "files": [{"index": 1, "name": "b.pdf", "status": "FAILED", "attempts": 4, "retry_attempt": 0,
                      "last_error": {"class": "TransientError", "message": "rate limited", "transient": True}},
                     {"index": 2, "name": "c.pdf", "status": "SUCCEEDED", "attempts": 2, "retry_attempt": 0,
                      "last_error": {"class": "TransientError", "message": "timed out", "transient": True}}],
           "files_page": {"offset": 0, "limit": 1000, "next_offset": 7, "status": ["FAILED"]}}
    server = api((200, run))
    shown = cli("run", "show", RUN_ID, "--status", "FAILED,ERROR", code=0).stdout
    assert _Scripted.paths[-1] == f"/api/v1/workflow-runs/{RUN_ID}?file_status=FAILED%2CERROR"
    lines = shown.splitlines()
    assert lines[0].split() == ["run", RUN_ID, "COMPLETED_WITH_ERRORS", "round", "1", "per_file", "max_retry_count", "3",
                                "needs", "attention:", "failed"]
    assert lines[1] == "files 2: 1 succeeded, 1 failed" and lines[2] == "credits consumed 2, refunded 0"
    row = next(line for line in lines if line.strip().startswith("1 "))
    assert row.split()[:5] == ["1", "b.pdf", "FAILED", "4", "0"] and "TransientError: rate limited" in row
    succeeded = next(line for line in lines if line.strip().startswith("2 "))
    assert succeeded.split() == ["2", "c.pdf", "SUCCEEDED", "2", "0"]  # its earlier failure is history, not its state
    assert lines[-1] == "more files: --file-offset 7"
    assert json.loads(cli("run", "show", RUN_ID, "--json", code=0).stdout) == run  # as the API gave it
    server.close()
