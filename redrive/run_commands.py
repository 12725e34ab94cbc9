"""`redrive run …`: submit, show, watch and act on workflow runs through the HTTP API."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote, urlencode
from typing import Optional, get_args

import typer

from redrive.api_client import Api, ApiError
from redrive.cli_common import App, DataDir, JsonOut, api_call as _api_call, fail as _fail, print_json as _print
from redrive.cli_common import settings_from as _settings
from redrive.run_view import print_run
from shared.messages import FileStatus

FILE_STATUSES = frozenset(get_args(FileStatus))

run_app = App(no_args_is_help=True, help="Workflow runs.")


@run_app.command("submit", api=True)
def run_submit(
    template: str = typer.Option(..., "--template"),
    file: list[str] = typer.Option(..., "--file", help="a file name (repeat), or @path to send a local file's bytes"),
    max_retry_count: int = typer.Option(3, "--max-retry-count", min=1, max=10),
    mode: str = typer.Option("per_file", "--mode"),
    data_dir: Optional[Path] = DataDir,
    as_json: bool = JsonOut,
) -> None:
    """Start a run over the given files."""
    import base64

    settings = _settings(data_dir)
    # What fits in a request once in base64 (4 bytes for 3): more is refused before it is
    # read, rather than read whole (@/dev/zero never ends) and then refused by the API.
    most = settings.max_request_bytes * 3 // 4
    files = []
    for item in file:
        if item.startswith("@"):
            path = Path(item[1:])
            try:
                with path.open("rb") as f:
                    content = f.read(most + 1)
            except OSError as exc:
                _fail(f"--file {item}: cannot read {path}: {exc.strerror}")
            if len(content) > most:
                _fail(f"--file {item}: more than {most} bytes, the most a request carries (REDRIVE_MAX_REQUEST_BYTES); "
                      "name the file by url instead")
            files.append({"name": path.name, "content_b64": base64.b64encode(content).decode()})
        else:
            files.append({"name": item})
    body = {"template_id": template, "files": files, "max_retry_count": max_retry_count, "mode": mode}
    _show(_api_call(settings, "POST", "/workflow-runs", body, idempotent=True), as_json)


def _run_path(run_id: str) -> str:
    return f"/workflow-runs/{quote(run_id, safe='')}"  # an id is one path segment, whatever it holds


def _run_action(run_id: str, action: str, data_dir, as_json: bool, method="POST", body=None, query: str = "") -> None:
    path = _run_path(run_id) + (f"/{action}" if action else "") + query
    _show(_api_call(_settings(data_dir), method, path, body, idempotent=method == "POST"), as_json)


def _show(answer, as_json: bool) -> None:
    """A run body for a person (print_run), or with --json as the API gave it."""
    if as_json or not isinstance(answer, dict) or "counts" not in answer:
        _print(answer, as_json)
    else:
        print_run(answer)


@run_app.command("show", api=True)
def run_show(
    run_id: str,
    status: Optional[str] = typer.Option(None, "--status", help="only files in these statuses, e.g. FAILED,ERROR"),
    file_offset: int = typer.Option(0, "--file-offset", min=0, max=2**31 - 1, help="files from this index on"),
    data_dir: Optional[Path] = DataDir,
    as_json: bool = JsonOut,
) -> None:
    """A run with (a page of) its files."""
    if status is not None:
        # Checked here, so the refusal names this option, not the API's query parameter.
        named = [part.strip().upper() for part in status.split(",") if part.strip()]
        if not named or any(s not in FILE_STATUSES for s in named):
            _fail(f"--status {status[:60]!r}: name file statuses, comma-separated, from "
                  f"{', '.join(sorted(FILE_STATUSES))}", code=2)
    query = {k: v for k, v in (("file_status", status), ("file_offset", file_offset or None)) if v is not None}
    _run_action(run_id, "", data_dir, as_json, method="GET", query="?" + urlencode(query) if query else "")


@run_app.command("retry-failed", api=True)
def run_retry_failed(run_id: str, data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """Continue: retry FAILED (charged) and PENDING (free) files."""
    _run_action(run_id, "retry-failed", data_dir, as_json)


@run_app.command("recover", api=True)
def run_recover(run_id: str, data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """Resume a FAILED or stuck run from its checkpoints (free)."""
    _run_action(run_id, "recover", data_dir, as_json)


@run_app.command("cancel", api=True)
def run_cancel(run_id: str, data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """Cancel a run; unused credits are refunded."""
    _run_action(run_id, "cancel", data_dir, as_json)


@run_app.command("restore", api=True)
def run_restore(
    run_id: str,
    checkpoint_step: int = typer.Option(..., "--checkpoint-step", min=-1),
    file_index: Optional[int] = typer.Option(None, "--file-index", min=0),
    data_dir: Optional[Path] = DataDir,
    as_json: bool = JsonOut,
) -> None:
    """Rewind files to an earlier checkpoint and resume them (platform admin; another tenant's run: --tenant)."""
    body = {"checkpoint_step": checkpoint_step} | ({"file_index": file_index} if file_index is not None else {})
    _show(_api_call(_settings(data_dir), "POST", f"/admin{_run_path(run_id)}/restore", body), as_json)


# A watch outlives a restart of the gateway or of a service behind it: it says so once per
# outage and asks again, backing off, for at most OUTAGE_LIMIT_S of continuous outage.
OUTAGE_LIMIT_S = 300.0
_RETRY_FIRST_S, _RETRY_MAX_S = 0.25, 5.0


class _Watch:
    """Asks for the run until an answer comes through an outage."""

    def __init__(self, api: Api, run_id: str) -> None:
        self.api, self.path = api, _run_path(run_id)
        self.answered = False  # then no answer at all is the gateway restarting, not a wrong URL

    def run(self, expect: tuple) -> dict:
        down_since, delay = None, _RETRY_FIRST_S
        while True:
            try:
                data = self.api.call("GET", self.path)
            except ApiError as exc:
                # The API's own 503: a service behind it restarting. No answer, or a proxy's 502/503/504:
                # only once the API answered this watch (at the first call: a URL where nothing runs).
                if not (exc.transient or (self.answered and (exc.no_answer or exc.status in (502, 503, 504)))):
                    _fail(str(exc))
                if down_since is None:
                    down_since = time.monotonic()
                    typer.echo(f"note: the API is unavailable ({' '.join(str(exc).split())}), still watching", err=True)
                elif time.monotonic() - down_since >= OUTAGE_LIMIT_S:
                    _fail(f"{exc} (the API was unavailable for {OUTAGE_LIMIT_S:g} s: gave up watching)")
                time.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            if not (isinstance(data, dict) and all(k in data for k in expect)):
                _fail(f"unexpected answer from {self.api.base_url}/api/v1{self.path}: is REDRIVE_API_URL a redrive API?")
            self.answered = True
            return data


@run_app.command("watch", api=True)
def run_watch(run_id: str, data_dir: Optional[Path] = DataDir, interval: float = typer.Option(1.0, "--interval", min=0.1),
              as_json: bool = JsonOut) -> None:
    """Follow a run's progress until it leaves RUNNING (exit 0 if it COMPLETED, else 1).
    With --json, no progress bar: the finished run, as JSON. Waits out a restart of the API."""
    from rich.progress import BarColumn, Progress, TextColumn

    watch = _Watch(Api.from_settings(_settings(data_dir)), run_id)
    if as_json:
        while (run := watch.run(("status",)))["status"] == "RUNNING":
            time.sleep(interval)
        _print(run, True)
        raise typer.Exit(0 if run["status"] == "COMPLETED" else 1)
    expect = ("status", "round", "counts")
    run = watch.run(expect)  # a refusal (no such run, another tenant's) is said before a progress bar shows
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}")) as bar:
        task = None
        while True:
            c = run["counts"]
            done = c["total"] - c["pending"]
            label = f"{run['status']} round {run['round']} ok={c['succeeded']} failed={c['failed']} error={c['errored']}"
            if task is None:
                task = bar.add_task(label, total=c["total"])
            bar.update(task, completed=done, description=label)
            if run["status"] != "RUNNING":
                break
            time.sleep(interval)
            run = watch.run(expect)
    raise typer.Exit(0 if run["status"] == "COMPLETED" else 1)
