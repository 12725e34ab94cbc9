"""`redrive run …`: submit, show, watch and act on workflow runs through the HTTP API."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote
from typing import Optional

import typer

from redrive.cli_common import App, DataDir, JsonOut, api_call as _api_call, fail as _fail, print_json as _print
from redrive.cli_common import settings_from as _settings

run_app = App(no_args_is_help=True, help="Workflow runs.")


@run_app.command("submit")
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

    files = []
    for item in file:
        if item.startswith("@"):
            path = Path(item[1:])
            try:
                content = path.read_bytes()
            except OSError as exc:
                _fail(f"--file {item}: cannot read {path}: {exc.strerror}")
            files.append({"name": path.name, "content_b64": base64.b64encode(content).decode()})
        else:
            files.append({"name": item})
    body = {"template_id": template, "files": files, "max_retry_count": max_retry_count, "mode": mode}
    _print(_api_call(_settings(data_dir), "POST", "/workflow-runs", body, idempotent=True), as_json)


def _run_path(run_id: str) -> str:
    return f"/workflow-runs/{quote(run_id, safe='')}"  # an id is one path segment, whatever it holds


def _run_action(run_id: str, action: str, data_dir, as_json: bool, method="POST", body=None) -> None:
    path = _run_path(run_id) + (f"/{action}" if action else "")
    _print(_api_call(_settings(data_dir), method, path, body, idempotent=method == "POST"), as_json)


@run_app.command("show")
def run_show(run_id: str, data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """A run with its files."""
    _run_action(run_id, "", data_dir, as_json, method="GET")


@run_app.command("retry-failed")
def run_retry_failed(run_id: str, data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """Continue: retry FAILED (charged) and PENDING (free) files."""
    _run_action(run_id, "retry-failed", data_dir, as_json)


@run_app.command("recover")
def run_recover(run_id: str, data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """Resume a FAILED or stuck run from its checkpoints (free)."""
    _run_action(run_id, "recover", data_dir, as_json)


@run_app.command("cancel")
def run_cancel(run_id: str, data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """Cancel a run; unused credits are refunded."""
    _run_action(run_id, "cancel", data_dir, as_json)


@run_app.command("restore")
def run_restore(
    run_id: str,
    checkpoint_step: int = typer.Option(..., "--checkpoint-step", min=-1),
    file_index: Optional[int] = typer.Option(None, "--file-index", min=0),
    data_dir: Optional[Path] = DataDir,
    as_json: bool = JsonOut,
) -> None:
    """Rewind files to an earlier checkpoint and resume them (platform admin)."""
    body = {"checkpoint_step": checkpoint_step} | ({"file_index": file_index} if file_index is not None else {})
    _print(_api_call(_settings(data_dir), "POST", f"/admin{_run_path(run_id)}/restore", body), as_json)


@run_app.command("watch")
def run_watch(run_id: str, data_dir: Optional[Path] = DataDir, interval: float = typer.Option(1.0, "--interval", min=0.1),
              as_json: bool = JsonOut) -> None:
    """Follow a run's progress until it leaves RUNNING (exit 0 if it COMPLETED, else 1).
    With --json, no progress bar: the finished run, as JSON."""
    from rich.progress import BarColumn, Progress, TextColumn

    settings = _settings(data_dir)
    if as_json:
        while (run := _api_call(settings, "GET", _run_path(run_id), expect=("status",)))["status"] == "RUNNING":
            time.sleep(interval)
        _print(run, True)
        raise typer.Exit(0 if run["status"] == "COMPLETED" else 1)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}")) as bar:
        task = None
        while True:
            run = _api_call(settings, "GET", _run_path(run_id), expect=("status", "round", "counts"))
            c = run["counts"]
            done = c["total"] - c["pending"]
            label = f"{run['status']} round {run['round']} ok={c['succeeded']} failed={c['failed']} error={c['errored']}"
            if task is None:
                task = bar.add_task(label, total=c["total"])
            bar.update(task, completed=done, description=label)
            if run["status"] != "RUNNING":
                break
            time.sleep(interval)
    raise typer.Exit(0 if run["status"] == "COMPLETED" else 1)


