"""The coordinator's request/reply verbs (``<prefix>.svc.coordinator.<verb>``): each one
parses its payload into a command and calls the plain handler."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from pydantic import BaseModel

from services.coordinator.commands import (
    cancel, create_run, file_actions, queries, recover, retry_failed, settings, staged_files, templates,
)
from services.coordinator.context import Deps
from services.coordinator.schemas import (
    Caller, CreateRun, CreateTemplate, FileRef, GetRun, ListRuns, ListTemplates, PutSettings, Restore, RetryFailed,
    CancelRun, RetryFile, RunRef, StageFiles, TemplateRef, TimelinePage,
)

ROUTES: dict[str, tuple[type[BaseModel], Callable[[Deps, Any], Awaitable[Any]]]] = {
    "create_template": (CreateTemplate, templates.create_template),
    "list_templates": (ListTemplates, templates.list_templates),
    "get_template": (TemplateRef, templates.get_template),
    "archive_template": (TemplateRef, templates.archive_template),
    "stage_files": (StageFiles, staged_files.stage_files),
    "create_run": (CreateRun, create_run.create_run),
    "get_run": (GetRun, queries.get_run),
    "list_runs": (ListRuns, queries.list_runs),
    "timeline": (TimelinePage, queries.get_timeline),
    "attention": (ListRuns, queries.attention),
    "retry_failed": (RetryFailed, retry_failed.retry_failed),
    "recover": (RunRef, recover.recover),
    "restore": (Restore, recover.restore),
    "retry_file": (RetryFile, file_actions.retry_file),
    "skip_file": (FileRef, file_actions.skip_file),
    "cancel": (CancelRun, cancel.cancel),
    "get_settings": (Caller, settings.get_settings),
    "put_settings": (PutSettings, settings.put_settings),
}


def verbs(deps: Deps) -> dict[str, Callable[[dict], Awaitable[Any]]]:
    def bind(model: type[BaseModel], fn):
        async def verb(payload: dict) -> Any:
            return await fn(deps, model.model_validate(payload))

        return verb

    return {name: bind(model, fn) for name, (model, fn) in ROUTES.items()}
