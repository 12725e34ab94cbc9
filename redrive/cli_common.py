"""What every `redrive` command shares: options, settings, API calls, output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from redrive.api_client import Api, ApiError
from shared.settings import Settings, load_settings

console = Console()
err = Console(stderr=True)

DataDir = typer.Option(None, "--data-dir", envvar="REDRIVE_DATA_DIR", help="Where redrive keeps its data.")
JsonOut = typer.Option(False, "--json", help="Machine-readable output.")


def settings_from(data_dir: Optional[Path], **overrides) -> Settings:
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        return load_settings(**overrides)
    except Exception as exc:  # pydantic ValidationError: bad configuration
        err.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(2)


def fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def api_call(settings: Settings, method: str, path: str, body=None, *, idempotent: bool = False):
    try:
        return Api.from_settings(settings).call(method, path, body, idempotent=idempotent)
    except ApiError as exc:
        fail(str(exc))


def print_json(data, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        console.print_json(data=data, default=str)


