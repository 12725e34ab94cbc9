"""Bad input to the `redrive` CLI: one clear line on stderr, a non-zero exit code, never a
traceback; and nothing started or created before the input was checked."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest
from typer.testing import CliRunner

from redrive.cli import app
from tests.integration.test_cli import redrive


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Run the CLI in this process with a fresh data dir and no servers named."""
    for name in ("NATS_URL", "DATABASE_URL", "REDRIVE_API_KEY", "REDRIVE_HANDLERS", "REDRIVE_PORT", "REDRIVE_HOST"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"REDRIVE_{name}", raising=False)
    monkeypatch.setenv("REDRIVE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("REDRIVE_API_URL", f"http://127.0.0.1:{_closed_port()}")

    def invoke(*args, env=None, code=1):
        result = CliRunner().invoke(app, list(args), env=env)
        # CliRunner catches what would have been a traceback: it must have been an exit
        assert isinstance(result.exception, SystemExit | None), repr(result.exception)
        assert result.exit_code == code, (result.exit_code, result.output)
        assert "Traceback" not in result.output
        return result

    return invoke


def one_line_error(result, *fragments: str) -> str:
    text = result.stderr.strip()
    assert text.count("\n") == 0, text
    assert text.startswith(("error:", "invalid configuration:")), text
    for fragment in fragments:
        assert fragment in text, text
    return text


class _Answers(http.server.BaseHTTPRequestHandler):
    mode = "html"
    paths: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.paths.append(self.path)
        if self.mode == "drop":
            self.close_connection = True
            return
        status, body = {
            "html": (200, b"<html>a proxy</html>"), "html500": (500, b"<html>Internal Server Error</html>"),
            "list": (200, b"[1, 2]"), "object": (200, b'{"something": "else"}'),
            "not_found": (404, b'{"error": {"code": "not_found", "message": "run was not found"}}'),
            "invalid": (422, b'{"error": {"code": "validation_error", "message": "the request body is not valid",'
                             b' "details": {"fields": {"auto_retries": "Input should be less than or equal to 10"}}}}'),
        }[self.mode]
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_GET


@pytest.fixture(scope="module")
def _answering_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_api(_answering_server, monkeypatch):
    """An HTTP server at REDRIVE_API_URL that answers as told; returns the paths asked for."""
    monkeypatch.setenv("REDRIVE_API_URL", _answering_server)
    _Answers.paths = []

    def answer(mode: str) -> list[str]:
        _Answers.mode = mode
        return _Answers.paths

    return answer


API_COMMANDS = [["credits"], ["attention"], ["settings"], ["run", "show", "r1"], ["run", "watch", "r1"],
                ["run", "cancel", "r1"], ["run", "submit", "--template", "t", "--file", "a.pdf"]]


@pytest.mark.parametrize("args", API_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_an_api_that_does_not_answer(cli, args):
    one_line_error(cli(*args), "cannot reach http://127.0.0.1:", "Connection refused")


def test_a_data_dir_where_no_system_ever_ran_is_named_when_nothing_answers(cli, monkeypatch, tmp_path):
    monkeypatch.delenv("REDRIVE_API_URL")
    monkeypatch.setenv("REDRIVE_PORT", str(_closed_port()))
    one_line_error(cli("credits"), "cannot reach", f"no `redrive up` has run with the data dir {tmp_path / 'data'}")


@pytest.mark.parametrize("mode, expected", [
    ("html", "not JSON: is REDRIVE_API_URL a redrive API?"),
    ("html500", "HTTP 500"),
    ("drop", "no answer from http://127.0.0.1:"),
])
@pytest.mark.parametrize("args", API_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_a_url_that_is_not_the_api(cli, fake_api, mode, expected, args):
    fake_api(mode)
    one_line_error(cli(*args), expected)


@pytest.mark.parametrize("args", [["attention"], ["settings"], ["run", "watch", "r1"]], ids=lambda a: a[-1])
@pytest.mark.parametrize("mode", ["list", "object"])
def test_json_of_another_shape(cli, fake_api, mode, args):
    fake_api(mode)
    one_line_error(cli(*args), "unexpected answer from", "is REDRIVE_API_URL a redrive API?")


def test_api_errors_keep_their_details(cli, fake_api):
    fake_api("invalid")
    one_line_error(cli("settings", "--auto-retries", "99"), "HTTP 422", "auto_retries: Input should be less than or equal to 10")


@pytest.mark.parametrize("run_id", ["a b", "é", "x/../../credits?y#z", "a\nb", "[bold]x[/bold]"])
def test_any_run_id_is_one_path_segment(cli, fake_api, run_id):
    paths = fake_api("not_found")
    one_line_error(cli("run", "show", run_id), "HTTP 404")
    assert len(paths) == 1 and paths[0].count("/") == 4 and paths[0].startswith("/api/v1/workflow-runs/"), paths


@pytest.mark.parametrize("url, expected", [
    ("notaurl", "must be an http:// or https:// URL"), ("ftp://x", "must be an http:// or https:// URL"),
    ("http://[::1", "not a valid URL"), ("http://127.0.0.1:abc", "not a valid URL"),
])
def test_a_malformed_api_url(cli, url, expected):
    one_line_error(cli("credits", env={"REDRIVE_API_URL": url}), expected)


@pytest.mark.parametrize("key", ["a b", "a\nb", "clé"])
def test_a_malformed_api_key(cli, key):
    one_line_error(cli("credits", env={"REDRIVE_API_KEY": key}), "the API key")


def test_submit_a_file_that_cannot_be_read(cli, tmp_path):
    one_line_error(cli("run", "submit", "--template", "t", "--file", f"@{tmp_path}/missing.pdf"), "No such file or directory")
    one_line_error(cli("run", "submit", "--template", "t", "--file", f"@{tmp_path}"), "Is a directory")


def test_submit_a_file_larger_than_a_request_carries_reads_no_more_of_it(cli):
    # /dev/zero never ends: read whole, it was a hang until memory ran out.
    one_line_error(cli("run", "submit", "--template", "t", "--file", "@/dev/zero",
                       env={"REDRIVE_MAX_REQUEST_BYTES": "65536"}),
                   "--file @/dev/zero: more than 49152 bytes, the most a request carries (REDRIVE_MAX_REQUEST_BYTES)")


@pytest.mark.parametrize("env, expected", [
    ({"REDRIVE_PORT": "abc"}, "REDRIVE_PORT='abc': Input should be a valid integer"),
    ({"REDRIVE_PORT": "70000"}, "REDRIVE_PORT='70000'"),
    ({"REDRIVE_EXECUTOR_CONCURRENCY": "0"}, "REDRIVE_EXECUTOR_CONCURRENCY='0'"),
    ({"REDRIVE_EXECUTOR_REDELIVERY_BACKOFF_S": "1,2"}, "every value must lie between the ack wait (30 s)"),
    ({"REDRIVE_EXECUTOR_REDELIVERY_BACKOFF_S": "thirty"}, "REDRIVE_EXECUTOR_REDELIVERY_BACKOFF_S='thirty'"),
    ({"REDRIVE_EXECUTOR_MAX_DELIVER": "2", "REDRIVE_EXECUTOR_REDELIVERY_BACKOFF_S": "30,60"}, "at most 1 values"),
    ({"REDRIVE_PREFIX": "a.b"}, "REDRIVE_PREFIX='a.b'"),
    ({"REDRIVE_LOG_JSON": "maybe"}, "REDRIVE_LOG_JSON='maybe'"),
    ({"NATS_URL": "127.0.0.1:abc"}, "NATS_URL: its port is not a number"),
    ({"NATS_URL": "http://127.0.0.1:4222"}, "NATS_URL: expected a URL like nats://"),
    ({"NATS_URL": "nats://127.0.0.1:abc"}, "NATS_URL: its port is not a number"),
    ({"DATABASE_URL": "mysql://u:secret@h/db"}, "DATABASE_URL: expected a URL like postgresql://"),
    ({"DATABASE_URL": "postgresql://u:secret@h:abc/db"}, "DATABASE_URL: its port is not a number"),
])
@pytest.mark.parametrize("args", [["credits"], ["migrate"], ["inspect"], ["service", "billing"]], ids=lambda a: a[0])
def test_invalid_configuration(cli, env, expected, args):
    text = one_line_error(cli(*args, env=env, code=2), "invalid configuration:", expected)
    assert "secret" not in text  # a URL's password stays out of the message


def test_a_data_dir_that_is_a_file(cli, tmp_path):
    (tmp_path / "file").write_text("")
    one_line_error(cli("credits", "--data-dir", str(tmp_path / "file"), code=2), "REDRIVE_DATA_DIR=", "not a directory")
    one_line_error(cli("up", "--data-dir", str(tmp_path / "file" / "sub")), "cannot use", "Not a directory")


@pytest.mark.parametrize("args, needs", [
    (["migrate"], "DATABASE_URL"), (["tenant", "create", "acme"], "DATABASE_URL"),
    (["key", "create", "--tenant", "t", "--role", "member"], "DATABASE_URL"),
    (["inspect"], "NATS_URL"), (["service", "gateway"], "NATS_URL"),
])
def test_no_server_named(cli, args, needs):
    one_line_error(cli(*args), f"{needs} is not set")


@pytest.mark.parametrize("args", [["migrate"], ["tenant", "create", "acme"], ["key", "create", "--tenant", "t", "--role", "member"]],
                         ids=lambda a: a[0])
def test_a_database_that_does_not_answer(cli, args):
    one_line_error(cli(*args, env={"DATABASE_URL": f"postgresql://u@127.0.0.1:{_closed_port()}/db"}),
                   "database (DATABASE_URL):", "Connect call failed")


def test_inspect_when_nats_does_not_answer(cli):
    started = time.monotonic()
    one_line_error(cli("inspect", env={"NATS_URL": f"nats://127.0.0.1:{_closed_port()}"}), "cannot connect to NATS")
    assert time.monotonic() - started < 5  # no reconnecting forever


@pytest.mark.parametrize("args, code", [
    (["service", "nonsense"], 2), (["service", ""], 2), (["tenant", "create", " "], 2),
    (["key", "create", "--tenant", "t", "--role", "king"], 2),
])
def test_usage_errors(cli, args, code):
    one_line_error(cli(*args, code=code))


def test_an_executor_whose_handler_modules_do_not_load(cli):
    one_line_error(cli("service", "executor", env={"NATS_URL": "nats://127.0.0.1:4222", "REDRIVE_HANDLERS": "no_such.module"},
                       code=2), "REDRIVE_HANDLERS: cannot import 'no_such.module'")


def test_up_on_a_port_in_use_starts_nothing(cli, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        one_line_error(cli("up", "--port", str(port)), f"cannot listen on 127.0.0.1:{port}", "Address already in use")
    assert not (tmp_path / "data" / "runtime.json").exists()
    one_line_error(cli("up", "--host", ""), "--host must not be empty")


@pytest.mark.parametrize("args", [["--port", "0"], ["--port", "70000"], ["--executors", "0"], ["--executors", "99"]])
def test_up_with_silly_values(cli, args):
    result = cli("up", *args, code=2)
    assert "Invalid value" in result.stderr


@pytest.mark.parametrize("args, code", [
    (["--files", "0"], 2), (["--files", "-1"], 2), (["--executors", "1000"], 2), (["--repeat", "0"], 2),
    (["--repeat", "1000000"], 2), (["--files", "99999999999999999999"], 1), (["--handler", "bogus"], 2),
])
def test_bench_with_silly_values_starts_nothing(cli, tmp_path, args, code):
    result = cli("bench", *args, "--data-dir", str(tmp_path / "bench"), code=code)
    if code == 1:
        one_line_error(result, "over the limit of a run")
    assert not (tmp_path / "bench").exists()


def test_bench_never_runs_on_a_live_systems_data(cli, tmp_path, monkeypatch):
    """A directory a `redrive up` holds is refused (its nats-server would open the live
    store); REDRIVE_DATA_DIR, which the tour exports for the CLI, is not the bench's."""
    from redrive.supervisor import lock_data_dir
    import bench.e2e

    live = tmp_path / "live"
    live.mkdir()
    held = lock_data_dir(live)
    try:
        refused = cli("bench", "--files", "1", "--data-dir", str(live), code=2)
        one_line_error(refused, f"{live} is in use by another `redrive up`", "a directory of its own")
        assert sorted(p.name for p in live.iterdir()) == ["up.lock"]
        given = []
        monkeypatch.setattr(bench.e2e, "main", lambda **kw: given.append(kw["data_dir"]) or {"exact": True})
        cli("bench", "--files", "1", env={"REDRIVE_DATA_DIR": str(live)}, code=0)
        assert given == [None]  # a scratch directory of its own
    finally:
        held.close()


async def test_against_real_servers(make_settings):
    """A database without redrive's tables; NATS without any service (no responders)."""
    settings = await make_settings(migrate=False)
    no_tables = redrive(settings, "key", "create", "--tenant", "t", "--role", "member")
    assert no_tables.returncode == 1 and "Traceback" not in no_tables.stderr, no_tables.stderr
    assert "run `redrive migrate` first" in no_tables.stderr
    seen = redrive(settings, "inspect", "--json")
    assert seen.returncode == 0, seen.stderr
    inspected = json.loads(seen.stdout)  # stdout holds the JSON and nothing else
    assert inspected["services"] == [] and inspected["prefix"]
    # Where it looked, so that the nats CLI can be pointed there: host and port, no credentials.
    assert inspected["nats"] == [u.split("://")[-1].rpartition("@")[2] for u in settings.nats_servers]


@pytest.mark.parametrize("args, env, said", [
    (["up"], {"REDRIVE_PORT": "99999"}, "error: Invalid value for '--port' (env var: 'REDRIVE_PORT')"),
    (["up", "--port", "abc"], {}, "error: Invalid value for '--port'"),
    (["bogus"], {}, "error: No such command 'bogus'"),
])
def test_usage_errors_from_the_console_script_are_one_line_and_exit_2(tmp_path, args, env, said):
    """As the README promises of a bad setting: one line, exit 2, not click's framed box."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "redrive", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "REDRIVE_DATA_DIR": str(tmp_path), **env})
    assert done.returncode == 2 and done.stderr.startswith(said), done.stderr
    assert done.stderr.strip().count("\n") == 0 and "╭" not in done.stderr


def test_an_api_url_given_with_the_apis_own_prefix_is_the_same_api(cli, fake_api, monkeypatch, _answering_server):
    """The tour's $API ends in /api/v1: set as REDRIVE_API_URL, every call went to
    /api/v1/api/v1/… and was a 404 that blamed the tenant."""
    paths = fake_api("invalid")
    monkeypatch.setenv("REDRIVE_API_URL", _answering_server + "/api/v1/")
    one_line_error(cli("settings", "--auto-retries", "99"), "HTTP 422")
    assert paths and all(p.startswith("/api/v1/settings") for p in paths), paths


@pytest.mark.parametrize("value", ["BOGUS", "FAILED,nope", ",", ""])
def test_run_show_names_its_own_option_for_a_status_it_does_not_know(cli, fake_api, value):
    paths = fake_api("invalid")
    one_line_error(cli("run", "show", "r1", "--status", value, code=2), "--status", "comma-separated", "FAILED")
    assert paths == []  # refused before anything was asked
