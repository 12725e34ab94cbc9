"""`redrive tenant …` and `redrive key …`: identity chores done straight on the database
(redrive/bootstrap_admin.py), so they work with no service running."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Column, Table

from redrive.cli_common import App, DataDir, JsonOut, console, require, shown
from redrive.cli_common import fail as _fail, print_json as _print, settings_from as _settings

tenant_app = App(no_args_is_help=True, help="Tenants.")
key_app = App(no_args_is_help=True, help="API keys.")


@tenant_app.command("create")
def tenant_create(
    name: str,
    monthly_credits: int = typer.Option(0, "--monthly-credits", min=0, max=2**31 - 1),  # a PostgreSQL integer
    purchased_credits: int = typer.Option(0, "--purchased-credits", min=0, max=2**31 - 1),
    data_dir: Optional[Path] = DataDir,
    as_json: bool = JsonOut,
) -> None:
    """Create a tenant with a billing account; prints its id."""
    from redrive.bootstrap_admin import create_tenant, tenant_name_problem

    if (problem := tenant_name_problem(name)) is not None:
        _fail(problem, code=2)
    settings = _settings(data_dir)
    require(settings, database=True)
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
    from redrive.bootstrap_admin import make_key

    from services.gateway.identity import user_name_problem

    if role not in ("platform_admin", "tenant_admin", "member"):
        _fail(f"--role must be platform_admin, tenant_admin or member, not {role!r}", code=2)
    if (problem := user_name_problem(user)) is not None:  # a usage error, as a bad tenant name is
        _fail(f"--user: {problem}", code=2)
    settings = _settings(data_dir)
    require(settings, database=True)
    try:
        key_id, key = asyncio.run(make_key(settings, tenant, role, user))
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"key": key, "id": key_id}) if as_json else key)


@key_app.command("list")
def key_list(
    tenant: Optional[str] = typer.Option(None, "--tenant", help="one tenant's keys (default: every tenant's)"),
    data_dir: Optional[Path] = DataDir,
    as_json: bool = JsonOut,
) -> None:
    """API keys: id, tenant, user, role, when made and revoked (never the key itself)."""
    from redrive.bootstrap_admin import with_gateway_engine
    from services.gateway.identity import list_keys

    settings = _settings(data_dir)
    require(settings, database=True)
    keys = asyncio.run(with_gateway_engine(settings, lambda engine: list_keys(engine, tenant)))
    if as_json:
        _print(keys, True)
        return
    # The id is what `key revoke` takes: never cut. The rest fold into what width is left
    # (a tenant id is 32 characters: at 80 columns something must).
    widest = max((len(k["id"]) for k in keys), default=2)
    table = Table(Column("id", no_wrap=True, min_width=widest), Column("role", no_wrap=True, min_width=14),
                  Column("tenant", overflow="fold"), Column("user", overflow="fold", min_width=4),
                  Column("created", overflow="fold"), Column("revoked", overflow="fold"),
                  box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    for k in keys:
        table.add_row(k["id"], k["role"], k["tenant_id"], shown(k["user"]), f"{k['created_at']:%Y-%m-%d %H:%M}",
                      f"{k['revoked_at']:%Y-%m-%d %H:%M}" if k["revoked_at"] else "-")
    console.print(table)


@key_app.command("revoke")
def key_revoke(
    key_id: str = typer.Argument(..., help="the key's id (redrive key list), or the key itself (rk_…)"),
    data_dir: Optional[Path] = DataDir,
    as_json: bool = JsonOut,
) -> None:
    """Revoke an API key: every gateway refuses it from then on (each hears of it from
    PostgreSQL and forgets the key at once)."""
    from redrive.bootstrap_admin import with_gateway_engine
    from services.gateway.identity import KEY_PREFIX, key_id_of, revoke_key

    settings = _settings(data_dir)
    require(settings, database=True)

    async def revoke(engine) -> str | None:
        wanted = await key_id_of(engine, key_id) if key_id.startswith(KEY_PREFIX) else key_id
        return wanted if wanted is not None and await revoke_key(engine, wanted) else None

    revoked = asyncio.run(with_gateway_engine(settings, revoke))
    if revoked is None:
        _fail(f"no live key {key_id if not key_id.startswith(KEY_PREFIX) else 'like that'} (see `redrive key list`)")
    typer.echo(json.dumps({"revoked": revoked}) if as_json else f"revoked {revoked}")
