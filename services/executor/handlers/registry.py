"""Handler registry: the built-ins plus application handlers from REDRIVE_HANDLERS."""

from __future__ import annotations

import importlib

from shared.errors import PermanentError
from services.executor.handlers.base import DependencyOf, Handler, RegisteredHandler


class HandlerRegistry:
    def __init__(self) -> None:
        self._handlers: dict[str, RegisteredHandler] = {}

    def register(self, name: str, run: Handler, *, dependency_of: DependencyOf | None = None) -> None:
        self._handlers[name] = RegisteredHandler(name, run, dependency_of)

    def handler(self, name: str, dependency_of: DependencyOf | None = None):
        """Decorator form: ``@registry.handler("ocr")``."""

        def decorate(fn: Handler) -> Handler:
            self.register(name, fn, dependency_of=dependency_of)
            return fn

        return decorate

    def get(self, name: str) -> RegisteredHandler:
        try:
            return self._handlers[name]
        except KeyError:
            raise PermanentError(f"unknown handler {name!r}") from None

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def load_modules(self, spec: str) -> None:
        """Import each module of the comma-separated ``spec`` and call its ``register(registry)``."""
        for module_name in (m.strip() for m in spec.split(",")):
            if not module_name:
                continue
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise ValueError(f"REDRIVE_HANDLERS: cannot import {module_name!r}: {exc}") from exc
            register = getattr(module, "register", None)
            if not callable(register):
                raise ValueError(f"REDRIVE_HANDLERS: module {module_name!r} has no register(registry) function")
            register(self)


def builtin_registry() -> HandlerRegistry:
    from services.executor.handlers import checksum, download, flaky, http_call, noop

    registry = HandlerRegistry()
    registry.register("noop", noop.run)
    registry.register("checksum", checksum.run)
    registry.register("flaky", flaky.run, dependency_of=flaky.dependency_of)
    registry.register("download", download.run, dependency_of=download.dependency_of)
    registry.register("http_call", http_call.run, dependency_of=http_call.dependency_of)
    return registry
