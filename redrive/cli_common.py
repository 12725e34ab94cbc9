"""What every `redrive` command shares: options, settings, API calls, output, and the one
place where expected failures (bad input, a server that does not answer) become one line."""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Optional, get_type_hints

import typer
from pydantic import ValidationError

try:  # typer 0.2x carries its own click; older ones use click itself
    from typer._click import exceptions as _click
except ImportError:  # pragma: no cover - typer < 0.20
    from click import exceptions as _click
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from redrive.api_client import TENANT_OPTION, Api, ApiError
from shared.settings import ConfigurationError, Settings, load_settings

console = Console()
err = Console(stderr=True, soft_wrap=True)  # soft_wrap: a message stays one line, whatever the width

DataDir = typer.Option(None, "--data-dir", envvar="REDRIVE_DATA_DIR", help="Where redrive keeps its data.")
JsonOut = typer.Option(False, "--json", help="Machine-readable output.")
# Every command that calls the API has it (App.command(api=True)): not a parameter of each.
Tenant = typer.Option(None, "--tenant", envvar="REDRIVE_TENANT", show_envvar=True, metavar="ID",
                      help="Act for this tenant (sent as X-Tenant-Id): a platform admin's key may name any tenant, "
                           "another key only its own. Default: the key's tenant.")

# Where a setting comes from, for messages: the environment variable a user would set.
_ENV_NAMES = {"nats_url": "NATS_URL", "database_url": "DATABASE_URL"}


def _config_problem(exc: ValidationError) -> str:
    problems = []
    for e in exc.errors():
        field = str(e["loc"][0]) if e["loc"] else ""
        name = _ENV_NAMES.get(field.lower(), field if field.isupper() else f"REDRIVE_{field.upper()}")
        msg = e["msg"].removeprefix("Value error, ")
        shown = not name.endswith("_URL") and not isinstance(e["input"], dict)  # a URL may hold a password
        problems.append(f"{name}={str(e['input'])!r}: {msg}" if shown else f"{name}: {msg}")
    return "; ".join(problems)


def settings_from(data_dir: Optional[Path], *, runtime: bool = True, **overrides) -> Settings:
    """``runtime``: complete the environment with what a running `redrive up` recorded."""
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        return load_settings(runtime=runtime, **overrides)
    except ValidationError as exc:  # bad configuration
        err.print(f"[red]invalid configuration:[/red] {escape(_config_problem(exc))}")
        raise typer.Exit(2)


def require(settings: Settings, *, nats: bool = False, database: bool = False) -> None:
    """Fail clearly when a command needs a server that nothing names."""
    for needed, url, name in ((nats, settings.nats_url, "NATS_URL"), (database, settings.database_url, "DATABASE_URL")):
        if needed and not url:
            fail(f"{name} is not set and no `redrive up` runs with data dir {settings.data_dir} (set {name} or --data-dir)")


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _from_module(exc: BaseException, *packages: str) -> bool:
    """Whether the exception was raised inside one of these packages (a connect call's OSError
    says nothing of whom it tried to reach)."""
    if type(exc).__module__.split(".")[0] in packages:
        return True
    tb = exc.__traceback__
    while tb is not None:
        if any(f"/{p}/" in tb.tb_frame.f_code.co_filename for p in packages):
            return True
        tb = tb.tb_next
    return False


# SQLSTATE classes that come from outside the code: connection, authorization, an unknown
# database, exhausted resources, an operator's shutdown, data out of range.
_DB_ENVIRONMENT = ("08", "28", "3D", "53", "57", "22")


def describe(exc: BaseException) -> str | None:
    """One line for an expected failure; None for anything else (a bug: let it show)."""
    from shared.embedded import EmbeddedServerError

    if isinstance(exc, (ApiError, EmbeddedServerError, ConfigurationError)):
        return str(exc)
    if _from_module(exc, "asyncpg", "sqlalchemy"):
        cause = getattr(exc, "orig", None) or exc
        cause = cause.__cause__ or cause  # SQLAlchemy's asyncpg adapter wraps asyncpg's own error
        sqlstate = getattr(cause, "sqlstate", None) or ""
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if sqlstate in ("42P01", "3F000"):  # undefined table, undefined schema
            return f"the database has no redrive tables ({reason}): run `redrive migrate` first"
        if isinstance(cause, OSError) or sqlstate[:2] in _DB_ENVIRONMENT:
            return f"database (DATABASE_URL): {reason or type(cause).__name__}"
        return None
    if type(exc).__module__.startswith("nats") or (isinstance(exc, OSError) and _from_module(exc, "nats")):
        return f"NATS (NATS_URL): {str(exc) or type(exc).__name__}"
    if isinstance(exc, OSError):  # a file, a port, a directory
        return str(exc)
    return None


def _one_line_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            message = describe(exc)
            if message is None:
                raise
            fail(message, code=2 if isinstance(exc, ConfigurationError) else 1)  # 2: as invalid configuration

    return wrapper


def _with_tenant_option(func):
    """``func`` with a ``--tenant`` option (:data:`Tenant`) added: while it runs, every
    :class:`Api` it makes sends that tenant as X-Tenant-Id (TENANT_OPTION)."""
    signature = inspect.signature(func, eval_str=True)
    if {"tenant", "tenant_ctx"} & set(signature.parameters):
        raise TypeError(f"{func.__name__} has its own `tenant` parameter: it cannot also get --tenant")

    @functools.wraps(func)
    def wrapper(*args, tenant: Optional[str] = None, tenant_ctx: Optional[typer.Context] = None, **kwargs):
        from_env = tenant_ctx is not None and getattr(tenant_ctx.get_parameter_source("tenant"), "name", "") == "ENVIRONMENT"
        token = TENANT_OPTION.set((tenant, "REDRIVE_TENANT" if from_env else "--tenant"))
        try:
            return func(*args, **kwargs)
        finally:
            TENANT_OPTION.reset(token)

    added = [inspect.Parameter("tenant", inspect.Parameter.KEYWORD_ONLY, default=Tenant, annotation=Optional[str]),
             # typer passes its context (where --tenant came from: the line, or REDRIVE_TENANT)
             inspect.Parameter("tenant_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *added])
    # Resolved annotations: typer reads these.
    wrapper.__annotations__ = {**get_type_hints(func), "tenant": Optional[str], "tenant_ctx": typer.Context}
    return wrapper


class App(typer.Typer):
    """A Typer whose commands turn expected failures into one line on stderr and exit 1 (2 for
    a configuration a server refuses). ``api=True``: the command calls the HTTP API, and gets
    the ``--tenant`` option (env REDRIVE_TENANT) a platform admin acts for another tenant with."""

    def __call__(self, *args, **kwargs):
        """As the console script: a usage error (a bad option, or a value from its env var
        such as REDRIVE_PORT=99999) is one line on stderr and exit 2, as every other refusal
        of a setting, not click's framed box."""
        import sys

        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except _click.NoArgsIsHelpError as exc:  # `redrive` alone: typer has shown its help
            if exc.format_message().strip():
                typer.echo(exc.format_message(), err=True)
            sys.exit(exc.exit_code)
        except _click.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            typer.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        except _click.ClickException as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)

    def command(self, *args, api: bool = False, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(func):
            register(_one_line_errors(_with_tenant_option(func) if api else func))
            return func

        return decorator


def api_call(settings: Settings, method: str, path: str, body=None, *, idempotent: bool = False, expect: tuple = ()):
    """One API call; ``expect``: keys the answer must have (else the URL is not a redrive API)."""
    api = Api.from_settings(settings)
    try:
        data = api.call(method, path, body, idempotent=idempotent)
    except ApiError as exc:
        fail(str(exc))
    if expect and not (isinstance(data, dict) and all(k in data for k in expect)):
        fail(f"unexpected answer from {api.base_url}/api/v1{path}: is REDRIVE_API_URL a redrive API?")
    return data


_CONTROL = str.maketrans({c: "?" for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F),
                                            *range(0x2066, 0x206A)]})


def shown(value: object) -> Text:
    """A value of the system's (a name someone typed) as a table cell or a line: as text,
    never as rich markup ("[/b]" in a file name would raise), and with each control
    character as '?' (a terminal obeys escape sequences; names made before the API refused
    them may hold some)."""
    return Text(str(value).translate(_CONTROL))


def _json_default(value):
    # Times as the API writes them (ISO 8601, "T"), not str()'s "2026-12-05 14:31:11+00:00".
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def print_json(data, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=_json_default))
    else:
        console.print_json(data=data, default=_json_default)
