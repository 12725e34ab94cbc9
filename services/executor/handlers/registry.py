"""Handler registry: the built-ins plus application handlers from ``REDRIVE_HANDLERS``."""

from __future__ import annotations

import importlib
from functools import partial
from typing import Callable

from shared.errors import PermanentError
from shared.requests import FILE_FIELDS
from services.executor.handlers.base import DependencyOf, FileNeeds, Handler, RegisteredHandler


class HandlerRegistry:
    """Step handlers by name. Registering an existing name replaces it, so an application
    can override a built-in on purpose."""

    def __init__(self) -> None:
        self._handlers: dict[str, RegisteredHandler] = {}

    def register(self, name: str, run: Handler, *, dependency_of: DependencyOf | None = None,
                 check_params: Callable[[dict], None] | None = None, file_needs: FileNeeds | None = None) -> None:
        """Register ``run`` under ``name``; ``dependency_of(params, file)`` names the external
        dependency a step talks to (for circuit breakers), or returns None; ``check_params``
        raises PermanentError for params no run could use (templates are refused with it);
        ``file_needs(params)`` names the fields (url, content_b64, size, sha256) every file
        must have for such a step (runs whose files lack one are refused with it)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"handler name must be a non-empty string, got {name!r}")
        if not callable(run):
            raise ValueError(f"handler {name!r}: run must be an async callable")
        self._handlers[name] = RegisteredHandler(name, run, dependency_of, check_params, file_needs)

    def handler(self, name: str, dependency_of: DependencyOf | None = None,
                check_params: Callable[[dict], None] | None = None,
                file_needs: FileNeeds | None = None) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`: ``@registry.handler("ocr")``."""

        def decorate(fn: Handler) -> Handler:
            self.register(name, fn, dependency_of=dependency_of, check_params=check_params, file_needs=file_needs)
            return fn

        return decorate

    def file_needs(self, steps: list[dict]) -> dict[str, list[str]]:
        """``{"N": [field, ...]}``: what every file needs of step N (see :meth:`register`).
        A needs function that fails, or names no file field, asks for nothing: a run's files
        are then judged when they run, as before there was such a check."""
        needs: dict[str, list[str]] = {}
        for i, step in enumerate(steps):
            registered = self._handlers.get(step.get("handler")) if isinstance(step, dict) else None
            if registered is None or registered.file_needs is None:
                continue
            params = step.get("params") if isinstance(step.get("params"), dict) else {}
            try:
                fields = [f for f in registered.file_needs(params) if f in FILE_FIELDS]
            except Exception:
                continue
            if fields:
                needs[str(i)] = fields
        return needs

    def check_steps(self, steps: list[dict]) -> dict[str, str]:
        """``{"steps.N.params": why}`` for each step whose handler refuses its params."""
        problems: dict[str, str] = {}
        for i, step in enumerate(steps):
            registered = self._handlers.get(step.get("handler")) if isinstance(step, dict) else None
            if registered is None or registered.check_params is None:
                continue
            params = step.get("params") or {}
            try:
                registered.check_params(params if isinstance(params, dict) else {})
            except PermanentError as exc:
                problems[f"steps.{i}.params"] = str(exc)[:500]
            except Exception as exc:  # the check itself is broken: say so rather than hide it
                problems[f"steps.{i}.params"] = f"the handler's params check failed: {type(exc).__name__}: {exc}"[:500]
        return problems

    def get(self, name: str) -> RegisteredHandler:
        """The handler registered as ``name``; an unknown name is a permanent failure of the step
        (retrying will not make it appear)."""
        try:
            return self._handlers[name]
        except KeyError:
            raise PermanentError(f"unknown handler {name!r}") from None

    def names(self) -> list[str]:
        """Registered handler names, sorted."""
        return sorted(self._handlers)

    def load_modules(self, spec: str) -> None:
        """Import each module of the comma-separated ``spec`` (``REDRIVE_HANDLERS``) and call its
        ``register(registry)``. Raises ValueError at startup rather than failing jobs later."""
        for module_name in (m.strip() for m in spec.split(",")):
            if not module_name:
                continue
            try:
                module = importlib.import_module(module_name)
            except SystemExit as exc:  # a script's sys.exit(): it would end the executor without a word
                raise ValueError(f"REDRIVE_HANDLERS: importing {module_name!r} called sys.exit({exc.code!r})") from None
            except Exception as exc:  # not found, or its own code failed (a syntax error, a raise at import)
                raise ValueError(f"REDRIVE_HANDLERS: cannot import {module_name!r}: {_one_line(exc)}") from exc
            register = getattr(module, "register", None)
            if not callable(register):
                raise ValueError(f"REDRIVE_HANDLERS: module {module_name!r} has no register(registry) function")
            try:
                register(self)
            except SystemExit as exc:
                raise ValueError(f"REDRIVE_HANDLERS: {module_name}.register called sys.exit({exc.code!r})") from None
            except ValueError:  # ours (a bad handler name, one registered twice): says what
                raise
            except Exception as exc:
                raise ValueError(f"REDRIVE_HANDLERS: {module_name}.register failed: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    """What went wrong, on one line: an exception's type, message, and where it was raised
    when the message does not say (a SyntaxError names its file and line itself)."""
    said = " ".join(str(exc).split()) or "(no message)"
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None and not isinstance(exc, SyntaxError) else ""
    return f"{type(exc).__name__}: {said[:500]}{where}"


def builtin_registry(*, allow_private_urls: bool = False, allow_crash: bool = False,
                     max_download_bytes: int | None = None) -> HandlerRegistry:
    """A registry holding the five built-ins: noop, checksum, flaky, download, http_call.

    ``allow_private_urls`` (``REDRIVE_EXECUTOR_ALLOW_PRIVATE_URLS``) lets download and
    http_call reach private and reserved addresses (127.0.0.1, 10.x, 169.254.169.254…): only
    for a single-tenant install fetching from its own network. It is bound into the handlers
    registered here; each module's own ``run`` refuses private destinations.

    ``max_download_bytes`` (``REDRIVE_EXECUTOR_MAX_DOWNLOAD_BYTES``) is the most one download
    may write; None: download's own default (10 GiB).

    ``allow_crash`` (``REDRIVE_EXECUTOR_ALLOW_CRASH``) lets flaky's ``crash`` param stop the
    executor, for fault tests; off, a template using it is refused and a job using it anyway
    errors its file."""
    # Imported here so that importing the registry stays cheap (download pulls in aiohttp).
    from shared.destinations import Destinations
    from services.executor.handlers import checksum, download, flaky, http_call, noop

    destinations = Destinations(allow_private=allow_private_urls)
    registry = HandlerRegistry()
    registry.register("noop", noop.run)
    registry.register("checksum", checksum.run)
    demo = flaky.Flaky(allow_crash=allow_crash)
    registry.register("flaky", demo.run, dependency_of=flaky.dependency_of, check_params=demo.check_params)
    max_bytes = download.DEFAULT_MAX_BYTES if max_download_bytes is None else max_download_bytes
    registry.register("download", partial(download.run, destinations=destinations, max_bytes=max_bytes),
                      dependency_of=download.dependency_of, file_needs=download.file_needs,
                      check_params=partial(download.check_params, destinations=destinations))
    registry.register("http_call", partial(http_call.run, destinations=destinations),
                      dependency_of=http_call.dependency_of,
                      check_params=partial(http_call.check_params, destinations=destinations))
    return registry
