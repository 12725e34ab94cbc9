"""What a step handler is, and the context it is given.

A handler is ``async def handler(ctx: StepContext) -> dict``: it does one step for one
file and returns a JSON-serialisable output (the step's checkpoint output). It signals
failure by raising :class:`shared.errors.TransientError` (retry later, with
``retry_after_s`` when the dependency said so) or :class:`shared.errors.PermanentError`
(never retry). Timeouts and connection errors that escape are classified as transient by
:func:`shared.errors.classify`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol


@dataclass(frozen=True, slots=True)
class FileRef:
    name: str
    url: str | None = None
    content_b64: str | None = None
    size: int | None = None
    sha256: str | None = None


@dataclass(slots=True)
class StepContext:
    job_id: str
    run_id: str
    tenant_id: str
    file_index: int
    round: int
    attempt: int  # 1-based attempt of this step within this round (automatic retries are per step)
    step_index: int
    step_name: str
    params: dict[str, Any]
    file: FileRef
    previous_output: dict[str, Any] | None
    # The run's artifact directory; handlers use ``artifact_dir`` (below).
    artifact_root: Path
    # Tell the broker we are still alive (in-progress ack); cheap to call often.
    heartbeat: Callable[[], Awaitable[None]] = field(default=None)  # type: ignore[assignment]

    @property
    def artifact_dir(self) -> Path:
        """A directory private to this (run, file, step): survives retries and executor
        restarts on the same machine, so handlers can keep partial work (e.g. a download's
        bytes), which no other step of the file ever takes for its own (two ``download``
        steps fetch two files). A later step reads an earlier one's files by the path its
        output names. Not created until a handler does; built on use (a Path per job costs
        microseconds)."""
        return self.artifact_root / str(self.file_index) / str(self.step_index)


class Handler(Protocol):
    async def __call__(self, ctx: StepContext) -> dict[str, Any]: ...


# The FileRef fields (shared.requests.FILE_FIELDS: url, content_b64, size, sha256) a step
# with these params needs of every file.
FileNeeds = Callable[[dict[str, Any]], "tuple[str, ...]"]

# Which external dependency a step talks to (for circuit breakers), or None.
DependencyOf = Callable[[dict[str, Any], FileRef], "str | None"]


@dataclass(frozen=True, slots=True)
class RegisteredHandler:
    name: str
    run: Handler
    dependency_of: DependencyOf | None = None
    # Checks a step's params when a template is made (raises PermanentError saying what is
    # wrong): refused then, not after a run was charged and its files ended ERROR.
    check_params: Callable[[dict], None] | None = None
    # The fields every file of a run needs for a step with these params (e.g. download
    # without params.url: each file's ``url``): a run whose files lack one is refused when
    # submitted (422), before it is charged, rather than those files ending ERROR.
    file_needs: FileNeeds | None = None
