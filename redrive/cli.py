"""The `redrive` command. Exit codes: 0 ok, 1 failure, 2 usage (typer's own)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from redrive.api_client import Api, ApiError
from shared.settings import Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="redrive: batch workflows that make failure boring.")
tenant_app = typer.Typer(no_args_is_help=True, help="Tenants.")
key_app = typer.Typer(no_args_is_help=True, help="API keys.")
run_app = typer.Typer(no_args_is_help=True, help="Workflow runs.")
app.add_typer(tenant_app, name="tenant")
app.add_typer(key_app, name="key")
app.add_typer(run_app, name="run")
console = Console()
err = Console(stderr=True)

DataDir = typer.Option(None, "--data-dir", envvar="REDRIVE_DATA_DIR", help="Where redrive keeps its data.")
JsonOut = typer.Option(False, "--json", help="Machine-readable output.")


def _settings(data_dir: Optional[Path], **overrides) -> Settings:
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        return load_settings(**overrides)
    except Exception as exc:  # pydantic ValidationError: bad configuration
        err.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(2)


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def _api_call(settings: Settings, method: str, path: str, body=None, *, idempotent: bool = False):
    try:
        return Api.from_settings(settings).call(method, path, body, idempotent=idempotent)
    except ApiError as exc:
        _fail(str(exc))


def _print(data, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        console.print_json(data=data, default=str)


@app.command()
def up(
    data_dir: Optional[Path] = DataDir,
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port"),
    executors: int = typer.Option(1, "--executors", min=1, max=32),
) -> None:
    """Start everything: servers (embedded by default), migrations, the five services."""
    from redrive.bootstrap_admin import ensure_admin_key
    from redrive.supervisor import Stack
    from shared.migrations import migrate_sync

    settings = _settings(data_dir, host=host, port=port)
    stack = Stack(settings, executors=executors)
    stopping = False

    def request_stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        settings = stack.start_servers()
        migrate_sync(settings)
        key = ensure_admin_key(settings)
        api_url = f"http://{host}:{port}"
        stack.write_runtime(api_url)
        stack.start_services()
        typer.echo(f"API: {api_url}")
        typer.echo(f"Dashboard: {api_url}/")
        typer.echo(f"Admin key: {key}")
        typer.echo(f"Data: {settings.data_dir} (logs in {settings.data_dir / 'logs'})", err=True)
        sys.stdout.flush()
        stack.watch(lambda: stopping)
    finally:
        typer.echo("redrive: stopping", err=True)
        stack.stop()


@app.command()
def service(name: str = typer.Argument(..., help="coordinator|executor|billing|notifier|gateway"), data_dir: Optional[Path] = DataDir) -> None:
    """Run one service in this process (what compose.yaml runs)."""
    import importlib

    from redrive.supervisor import SERVICES

    if name not in SERVICES:
        err.print(f"unknown service {name!r}; expected one of: {', '.join(SERVICES)}")
        raise typer.Exit(2)
    settings = _settings(data_dir)
    importlib.import_module(f"services.{name}.bootstrap").main(settings)


@app.command()
def migrate(data_dir: Optional[Path] = DataDir) -> None:
    """Apply every service's migrations."""
    from shared.migrations import migrate_sync

    migrate_sync(_settings(data_dir))
    typer.echo("migrations applied")


@tenant_app.command("create")
def tenant_create(
    name: str,
    monthly_credits: int = typer.Option(0, "--monthly-credits", min=0),
    purchased_credits: int = typer.Option(0, "--purchased-credits", min=0),
    data_dir: Optional[Path] = DataDir,
    as_json: bool = JsonOut,
) -> None:
    """Create a tenant with a billing account; prints its id."""
    from redrive.bootstrap_admin import create_tenant

    settings = _settings(data_dir)
    tenant_id = asyncio.run(create_tenant(settings, name, monthly_credits, purchased_credits))
    typer.echo(json.dumps({"tenant_id": tenant_id}) if as_json else tenant_id)


@key_app.command("create")
def key_create(
    tenant: str = typer.Option(..., "--tenant"),
    role: str = typer.Option(..., "--role", help="platform_admin|tenant_admin|member"),
    user: str = typer.Option("cli", "--user"),
    data_dir: Optional[Path] = DataDir,
    as_json: bool = JsonOut,
) -> None:
    """Create an API key (printed once; only its hash is stored)."""
    from redrive.bootstrap_admin import create_key

    if role not in ("platform_admin", "tenant_admin", "member"):
        err.print("--role must be platform_admin, tenant_admin or member")
        raise typer.Exit(2)
    try:
        key = asyncio.run(create_key(_settings(data_dir), tenant, role, user))
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"key": key}) if as_json else key)


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
            files.append({"name": path.name, "content_b64": base64.b64encode(path.read_bytes()).decode()})
        else:
            files.append({"name": item})
    body = {"template_id": template, "files": files, "max_retry_count": max_retry_count, "mode": mode}
    _print(_api_call(_settings(data_dir), "POST", "/workflow-runs", body, idempotent=True), as_json)


def _run_action(run_id: str, action: str, data_dir, as_json: bool, method="POST", body=None) -> None:
    path = f"/workflow-runs/{run_id}" + (f"/{action}" if action else "")
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
    _print(_api_call(_settings(data_dir), "POST", f"/admin/workflow-runs/{run_id}/restore", body), as_json)


@run_app.command("watch")
def run_watch(run_id: str, data_dir: Optional[Path] = DataDir, interval: float = typer.Option(1.0, "--interval")) -> None:
    """Follow a run's progress until it leaves RUNNING."""
    from rich.progress import BarColumn, Progress, TextColumn

    settings = _settings(data_dir)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}")) as bar:
        task = None
        while True:
            run = _api_call(settings, "GET", f"/workflow-runs/{run_id}")
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


@app.command()
def credits(data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """The tenant's credit balance."""
    _print(_api_call(_settings(data_dir), "GET", "/credits"), as_json)


@app.command()
def settings(
    auto_retries: Optional[int] = typer.Option(None, "--auto-retries"),
    backoff_base_ms: Optional[int] = typer.Option(None, "--backoff-base-ms"),
    backoff_max_ms: Optional[int] = typer.Option(None, "--backoff-max-ms"),
    jitter: Optional[bool] = typer.Option(None, "--jitter/--no-jitter"),
    breaker_failure_threshold: Optional[int] = typer.Option(None, "--breaker-failure-threshold"),
    breaker_reset_s: Optional[int] = typer.Option(None, "--breaker-reset-s"),
    data_dir: Optional[Path] = DataDir,
    as_json: bool = JsonOut,
) -> None:
    """Show the retry settings, or change the given ones."""
    s = _settings(data_dir)
    current = _api_call(s, "GET", "/settings/retry")
    changes = {k: v for k, v in dict(auto_retries=auto_retries, backoff_base_ms=backoff_base_ms, backoff_max_ms=backoff_max_ms,
                                     jitter=jitter, breaker_failure_threshold=breaker_failure_threshold,
                                     breaker_reset_s=breaker_reset_s).items() if v is not None}
    if changes:
        current = _api_call(s, "PUT", "/settings/retry", {**current, **changes})
    _print(current, as_json)


@app.command()
def attention(data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """Runs that need an operator."""
    data = _api_call(_settings(data_dir), "GET", "/admin/attention")
    if as_json:
        _print(data, True)
        return
    table = Table("run", "tenant", "status", "reason", "pending", "failed", "errored")
    for r in data["items"]:
        c = r["counts"]
        table.add_row(r["id"], r["tenant_id"], r["status"], r["reason"], str(c["pending"]), str(c["failed"]), str(c["errored"]))
    console.print(table)


@app.command()
def inspect(data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """Streams, consumers and services, as `nats stream info` / `nats micro ls` would show."""
    from redrive.inspect import inspect_system

    _print(asyncio.run(inspect_system(_settings(data_dir))), as_json)


@app.command()
def bench(
    files: int = typer.Option(10_000, "--files", min=1),
    handler: str = typer.Option("noop", "--handler"),
    executors: int = typer.Option(1, "--executors", min=1),
    data_dir: Optional[Path] = DataDir,
) -> None:
    """End-to-end throughput through the real services, and the hand-written limit."""
    from bench.e2e import main as bench_main

    bench_main(files=files, handler=handler, executors=executors, data_dir=data_dir)


@app.command()
def demo(data_dir: Optional[Path] = DataDir) -> None:
    """Create a demo tenant, a flaky template and a run that retries, on a running system."""
    from redrive.demo import run_demo

    run_demo(_settings(data_dir))
