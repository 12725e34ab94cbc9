"""The `redrive` command. Exit codes: 0 ok, 1 failure, 2 usage (typer's own)."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Column, Table

from redrive.cli_common import App, DataDir, JsonOut, console, require
from redrive.cli_common import api_call as _api_call, fail as _fail, print_json as _print, settings_from as _settings
from redrive.identity_commands import key_app, tenant_app
from redrive.run_commands import run_app

app = App(no_args_is_help=True, add_completion=False, help="redrive: batch workflows that make failure boring.")
app.add_typer(tenant_app, name="tenant")
app.add_typer(key_app, name="key")
app.add_typer(run_app, name="run")


@app.command()
def up(
    data_dir: Optional[Path] = DataDir,
    host: str = typer.Option("127.0.0.1", "--host", envvar="REDRIVE_HOST"),
    port: int = typer.Option(8080, "--port", envvar="REDRIVE_PORT", min=1, max=65535),
    executors: int = typer.Option(1, "--executors", min=1, max=32),
    ready_timeout: float = typer.Option(60.0, "--ready-timeout", min=1, max=3600,
                                        help="seconds the services have to become ready, else `up` stops everything"),
) -> None:
    """Start everything: servers (embedded by default), migrations, the five services."""
    from redrive.bootstrap_admin import ensure_admin_key
    from redrive.supervisor import DataDirInUse, ServiceFailed, Stack, lock_data_dir
    from shared.migrations import migrate_sync

    # Not the prefix of an earlier `up` (runtime.json): this one's environment says.
    settings = _settings(data_dir, runtime=False, host=host, port=port)
    _check_handlers(settings)  # as `redrive service executor` would, again and again
    _check_data_dir(settings.data_dir)
    _check_can_listen(host, port)  # before anything starts: the gateway alone would crash, again and again
    try:
        lock = lock_data_dir(settings.data_dir)  # until everything it starts has stopped (below)
    except DataDirInUse as exc:
        _fail(str(exc), code=2)
    stack = Stack(settings, executors=executors)
    stopping = False
    failure: tuple[str, int] | None = None  # why `up` gives up before the stack is ready, and its exit code

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
        logs = settings.data_dir / "logs"
        try:
            ready = stack.wait_ready(api_url, lambda: stopping, timeout=ready_timeout)
        except ServiceFailed as exc:  # its configuration: restarting it would fail the same way
            failure = (f"{exc}; everything is stopped; see {exc.log_path}", 2)
        else:
            if not ready and not stopping:
                failure = (f"not ready after {ready_timeout:g} s (--ready-timeout): {stack.not_ready}; everything is "
                           f"stopped; see {logs}", 1)
        if failure is None and not stopping:
            # The URL and key are what a user acts on next: print them once the API answers.
            typer.echo(f"API: {api_url}")
            typer.echo(f"Dashboard: {api_url}/")
            typer.echo(f"Admin key: {key}")
            typer.echo(f"Data: {settings.data_dir} (logs in {logs})", err=True)
            sys.stdout.flush()
            stack.watch(lambda: stopping)
    finally:
        if failure is None:
            typer.echo("redrive: stopping", err=True)
        stack.stop()
        lock.close()
    if failure is not None:
        _fail(*failure)


def _check_data_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".redrive-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        _fail(f"cannot use {path} as the data directory (--data-dir / REDRIVE_DATA_DIR): {exc.strerror}")


def _check_can_listen(host: str, port: int) -> None:
    if not host:
        _fail("--host must not be empty (0.0.0.0 listens on every interface)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the gateway's own listener
            sock.bind(infos[0][4])
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port} (--host/--port): {exc.strerror or exc}")


def _check_handlers(settings, handler: Optional[str] = None) -> None:
    """REDRIVE_HANDLERS loads (the executor would stop at its start) and knows ``handler``."""
    from services.executor.handlers.registry import builtin_registry

    registry = builtin_registry(allow_private_urls=settings.executor_allow_private_urls)
    try:
        registry.load_modules(settings.handlers)
    except ValueError as exc:  # an application module that does not import or register
        _fail(str(exc), code=2)
    if handler is not None and handler not in registry.names():
        _fail(f"unknown handler {handler!r}; known: {', '.join(registry.names())}", code=2)


@app.command()
def service(name: str = typer.Argument(..., help="coordinator|executor|billing|notifier|gateway"), data_dir: Optional[Path] = DataDir) -> None:
    """Run one service in this process (what compose.yaml runs)."""
    import importlib

    from redrive.supervisor import SERVICES

    if name not in SERVICES:
        _fail(f"unknown service {name!r}; expected one of: {', '.join(SERVICES)}", code=2)
    settings = _settings(data_dir)
    require(settings, nats=True, database=name != "executor")
    if name == "executor":
        _check_handlers(settings)
    importlib.import_module(f"services.{name}.bootstrap").main(settings)


@app.command()
def migrate(data_dir: Optional[Path] = DataDir) -> None:
    """Apply every service's migrations."""
    from shared.migrations import migrate_sync

    settings = _settings(data_dir)
    require(settings, database=True)
    migrate_sync(settings)
    typer.echo("migrations applied")


@app.command(api=True)
def credits(data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """The tenant's credit balance."""
    _print(_api_call(_settings(data_dir), "GET", "/credits"), as_json)


@app.command(api=True)
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
    current = _api_call(s, "GET", "/settings/retry", expect=("auto_retries",))
    changes = {k: v for k, v in dict(auto_retries=auto_retries, backoff_base_ms=backoff_base_ms, backoff_max_ms=backoff_max_ms,
                                     jitter=jitter, breaker_failure_threshold=breaker_failure_threshold,
                                     breaker_reset_s=breaker_reset_s).items() if v is not None}
    if changes:
        current = _api_call(s, "PUT", "/settings/retry", {**current, **changes}, expect=("auto_retries",))
    _print(current, as_json)


@app.command(api=True)
def attention(data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """Runs that need an operator: the key's tenant's (a platform admin: every tenant's, or those of --tenant)."""
    data = _api_call(_settings(data_dir), "GET", "/admin/attention", expect=("items",))
    if as_json:
        _print(data, True)
        return
    items = data["items"]
    if not items:
        console.print(_attention_table([], []))
        return
    # A platform admin's list holds every tenant's runs, and a command on one of them names its
    # tenant (--tenant): runs are shown under their tenant, whose id is whole on its line.
    tenants: dict[str, list] = {}
    for r in items:
        tenants.setdefault(str(r.get("tenant_id")), []).append(r)
    for i, (tenant, runs) in enumerate(tenants.items()):
        console.print(("\n" if i else "") + f"tenant {tenant}  (its runs: --tenant {tenant})", highlight=False,
                      soft_wrap=True, markup=False)
        console.print(_attention_table(runs, items))  # the columns of every tenant's table line up


def _attention_table(runs: list, items: list) -> Table:
    # Ids are copied into the next command and statuses are read whole: those columns are never
    # cut (nor wrapped); the others wrap, or fold, in what width is left. Spaces between columns,
    # not lines: a copied id takes no border along.
    table = Table(Column("run", no_wrap=True, min_width=max((len(str(r["id"])) for r in items), default=3)),
                  Column("status", no_wrap=True, min_width=max((len(str(r["status"])) for r in items), default=6)),
                  Column("reason", no_wrap=True, min_width=max((len(str(r["reason"])) for r in items), default=6)),
                  Column("files", overflow="fold"), box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    for r in runs:
        c = r["counts"]
        files = ", ".join(f"{c[k]} {k}" for k in ("failed", "errored", "pending") if c.get(k)) or "-"
        table.add_row(str(r["id"]), str(r["status"]), str(r["reason"]), files)
    return table


@app.command()
def inspect(data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """Streams, consumers and services, as `nats stream info` / `nats micro ls` would show."""
    from redrive.inspect import inspect_system, render

    settings = _settings(data_dir)
    require(settings, nats=True)
    found = asyncio.run(inspect_system(settings))
    if as_json:
        _print(found, True)
    else:
        typer.echo(render(found))


@app.command()
def bench(
    files: int = typer.Option(10_000, "--files", min=1),
    handler: str = typer.Option("noop", "--handler"),
    executors: int = typer.Option(1, "--executors", min=1, max=32),
    repeat: int = typer.Option(3, "--repeat", min=1, max=100, help="rounds (run + limit); the summary takes the median"),
    # Not REDRIVE_DATA_DIR: that names a system's data (the tour exports it), and the bench
    # starts servers and services of its own; on a live system's directory its nats-server
    # would open the live JetStream store.
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Where the bench keeps its own servers' data "
                                            "(default: a scratch directory, removed after)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document (every round's figures in it) instead of "
                                                      "a line per round as it ends, then the summary."),
) -> None:
    """End-to-end throughput through the real services, and the hand-written limit."""
    from bench.e2e import main as bench_main
    from redrive.api_client import ApiError
    from redrive.supervisor import DataDirInUse, lock_data_dir

    settings = _settings(data_dir)  # the bench builds its own, from the same environment: check it first
    if files > settings.max_files_per_run:
        _fail(f"--files {files} is over the limit of a run ({settings.max_files_per_run}, REDRIVE_MAX_FILES_PER_RUN)")
    _check_handlers(settings, handler)  # else every file fails and the figures measure nothing
    if data_dir is not None:
        _check_data_dir(data_dir)
        try:
            held = lock_data_dir(data_dir)  # while the bench runs, as `redrive up` holds it
        except DataDirInUse as exc:
            _fail(f"{exc}. The bench starts servers of its own: give it a directory of its own, or none "
                  "(a scratch one)", code=2)
    try:
        result = bench_main(files=files, handler=handler, executors=executors, data_dir=data_dir, repeat=repeat,
                            rounds_shown=not as_json)
    except ApiError as exc:  # e.g. 413: the run's files do not fit in one request
        _fail(f"the system refused the benchmark's request: {exc}")
    except RuntimeError as exc:
        _fail(f"the benchmark could not run: {exc}")
    if data_dir is not None:
        held.close()
    if not result["exact"]:  # figures of a run that lost or double-counted files mean nothing
        _fail("a round was not exact (counts or credits): see its figures above")


@app.command()
def demo(data_dir: Optional[Path] = DataDir, as_json: bool = JsonOut) -> None:
    """On a running system: add 10 purchased credits to the platform tenant (the admin key's), create a
    flaky template, and start a run whose files fail twice, then succeed, to watch the retries."""
    from redrive.demo import run_demo

    run_demo(_settings(data_dir), as_json)
