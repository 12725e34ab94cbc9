"""`--tenant ID` (env REDRIVE_TENANT) on every `redrive` command that calls the API: sent as
X-Tenant-Id, and only then; `redrive attention` shows each run under its tenant. Against a
fake API that records what it was sent (the real gateway: tests/integration/test_cli_against_a_system.py)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest

from tests.unit.test_cli_bad_input import cli, one_line_error  # noqa: F401 (cli: a fixture)
from tests.unit.test_cli_hints import send_json

RUN = {"id": "ef59bab3c3c14d0e9f1a2b3c4d5e6f70", "tenant_id": "0123456789abcdef", "status": "COMPLETED", "round": 0,
       "counts": {"total": 1, "pending": 0, "succeeded": 1, "failed": 0, "errored": 0, "skipped": 0, "cancelled": 0},
       "auto_retries": 3, "items": []}
FORBIDDEN = {"error": {"code": "forbidden", "message": "only a platform admin may act for another tenant"}}
API_COMMANDS = [["credits"], ["attention"], ["settings"], ["settings", "--auto-retries", "1"], ["run", "show", "r1"],
                ["run", "watch", "r1"], ["run", "retry-failed", "r1"], ["run", "recover", "r1"], ["run", "cancel", "r1"],
                ["run", "restore", "r1", "--checkpoint-step", "0"], ["run", "submit", "--template", "t", "--file", "a"]]


class _Recording(http.server.BaseHTTPRequestHandler):
    answer: tuple[int, dict] = (200, RUN)
    seen: list[tuple[str, str, str | None]] = []  # method, path, X-Tenant-Id

    def log_message(self, *args):
        pass

    def _reply(self):
        type(self).seen.append((self.command, self.path, self.headers.get("X-Tenant-Id")))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, body = self.answer
        send_json(self, status, body)

    do_GET = do_POST = do_PUT = _reply


@pytest.fixture
def api(monkeypatch):
    monkeypatch.delenv("REDRIVE_TENANT", raising=False)
    _Recording.answer, _Recording.seen = (200, RUN), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("REDRIVE_API_URL", url)
    yield url
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("args", API_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_api_command_sends_the_tenant_it_is_given_and_none_otherwise(cli, api, args):
    cli(*args, code=0)
    cli(*args, "--tenant", "acme", code=0)
    cli(*args, env={"REDRIVE_TENANT": "envco"}, code=0)
    cli(*args, "--tenant", "acme", env={"REDRIVE_TENANT": "envco"}, code=0)  # the command line wins
    sent = {tenant for _, _, tenant in _Recording.seen}
    assert sent == {None, "acme", "envco"} and _Recording.seen[0][2] is None
    assert [t for _, _, t in _Recording.seen if t is not None][-1] == "acme"


def test_a_refusal_for_another_tenant_is_one_line_naming_the_tenant_and_where_it_came_from(cli, api):
    _Recording.answer = (403, FORBIDDEN)
    one_line_error(cli("credits", "--tenant", "acme"), "HTTP 403 forbidden", "only a platform admin",
                   "acting for tenant acme, from --tenant")
    one_line_error(cli("run", "watch", "r1", env={"REDRIVE_TENANT": "acme"}), "HTTP 403 forbidden",
                   "acting for tenant acme, from REDRIVE_TENANT")
    _Recording.answer = (403, {"error": {"code": "forbidden", "message": "this action needs the tenant_admin role"}})
    text = one_line_error(cli("settings"), "HTTP 403 forbidden", "tenant_admin role")
    assert "tenant" not in text.replace("tenant_admin", "")  # no tenant named: nothing said of one


def test_a_run_not_found_says_how_to_name_another_tenant(cli, api):
    _Recording.answer = (404, {"error": {"code": "not_found", "message": "run r1 was not found"}})
    one_line_error(cli("run", "show", "r1"), "HTTP 404 not_found", "another tenant's?", "--tenant ID or REDRIVE_TENANT",
                   "`redrive attention` shows a run's tenant")
    one_line_error(cli("run", "show", "r1", "--tenant", "acme"), "HTTP 404", "acting for tenant acme, from --tenant")


@pytest.mark.parametrize("tenant", ["", "a b", "ünï", "x\ny"])
def test_a_tenant_no_header_can_carry_is_refused_before_anything_is_sent(cli, api, tenant):
    one_line_error(cli("credits", "--tenant", tenant), "the tenant (--tenant, or REDRIVE_TENANT)")
    assert _Recording.seen == []


def test_commands_that_do_not_call_the_api_have_no_tenant_option(cli):
    for args in (["inspect"], ["demo"], ["migrate"], ["up"], ["bench"]):
        assert "--tenant" not in cli(*args, "--help", code=0).stdout
    assert "REDRIVE_TENANT" in " ".join(cli("run", "show", "--help", code=0).stdout.split())


def test_attention_shows_each_run_under_its_tenant_whole_at_80_columns(api):
    items = [{"id": "aa" * 16, "tenant_id": "0123456789abcdef", "status": "COMPLETED_WITH_ERRORS",
              "reason": "recovery_failed", "counts": {"total": 9, "pending": 0, "failed": 3, "errored": 1}},
             {"id": "bb" * 16, "tenant_id": "platform", "status": "FAILED", "reason": "failed",
              "counts": {"total": 9, "pending": 12, "failed": 3000, "errored": 0}},
             {"id": "cc" * 16, "tenant_id": "0123456789abcdef", "status": "FAILED", "reason": "stuck",
              "counts": {"total": 1, "pending": 1}}]
    _Recording.answer = (200, {"items": items, "next_cursor": None, "total": 3,
                               "by_tenant": {"0123456789abcdef": 2, "platform": 1}})
    shown = subprocess.run([sys.executable, "-m", "redrive", "attention"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "COLUMNS": "80", "REDRIVE_API_URL": api})
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in shown.stdout
    first = lines.index("tenant 0123456789abcdef  (its runs: --tenant 0123456789abcdef)")
    second = lines.index("tenant platform  (its runs: --tenant platform)")
    assert first < second
    for item, under in ((items[0], first), (items[2], first), (items[1], second)):
        row = next(i for i, line in enumerate(lines) if item["id"] in line)  # the whole id, on one line
        assert under < row and (under == second or row < second)
        assert item["status"] in lines[row].split() and item["reason"] in lines[row].split()
