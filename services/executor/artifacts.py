"""How long a run's artifacts are kept, and removing them after.

Steps keep files under ``DATA_DIR/artifacts/<tenant>/<run>/<file_index>/<step_index>/`` (a
download's bytes, what the next step reads); kept forever, they fill the executor's disk. A run
directory in which nothing was modified for ``REDRIVE_EXECUTOR_ARTIFACT_RETENTION_HOURS``
(default 168; 0 keeps everything) is removed whole. Its age is the newest mtime in it, not
the run directory's own: a download still being resumed deep inside keeps its run. A file
retried later from a step that reads such an artifact finds it gone (the step errors), so
keep artifacts longer than runs are retried.

Symlinks are never followed: not to find run directories, not to judge their age, not when
removing (``shutil.rmtree`` removes a link, never what it points at). A link planted in the
tree cannot make a sweep read or delete anything outside it.

Executors sharing one artifacts volume each sweep it: a directory another one is removing
is skipped, and what is left of it goes at the next sweep.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

HOUR_S = 3600.0
SWEEP_EVERY_S = HOUR_S
LOGGED_NAMES = 20  # run directories named in a sweep's log line; the count says the rest


def sweep(root: Path, older_than_s: float, *, now: float | None = None) -> tuple[list[str], list[str]]:
    """Remove each ``<tenant>/<run>`` directory under ``root`` in which nothing was modified
    for ``older_than_s`` seconds. Returns (the removed ones, what could not be done and why);
    one that fails does not stop the others."""
    cutoff = (time.time() if now is None else now) - older_than_s
    removed: list[str] = []
    failed: list[str] = []
    for tenant in _real_dirs(root):
        try:
            runs = _real_dirs(tenant)
        except OSError as exc:
            failed.append(f"{tenant.name}: {exc}")
            continue
        for run in runs:
            name = f"{tenant.name}/{run.name}"
            try:
                if _modified_since(run, cutoff):
                    continue
                shutil.rmtree(run)
            except FileNotFoundError:  # another executor's sweep is removing it
                continue
            except OSError as exc:
                failed.append(f"{name}: {exc}")
                continue
            removed.append(name)
    return removed, failed


def _real_dirs(path: Path) -> list[Path]:
    """The directories in ``path``, links to one left out; none when ``path`` is gone."""
    try:
        with os.scandir(path) as entries:
            return [Path(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _modified_since(path: Path, cutoff: float) -> bool:
    """Whether anything in the tree at ``path``, itself included, has an mtime after
    ``cutoff``. A link counts by its own mtime and is not followed. Stops at the first."""
    try:
        if path.lstat().st_mtime > cutoff:
            return True
        pending = [path]
        while pending:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                        return True
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
    except FileNotFoundError:  # something in it was renamed or removed just now: in use
        return True
    return False


class ArtifactSweeper:
    """Sweeps ``root`` at start, then every ``every_s``; does nothing when the retention is 0."""

    def __init__(self, root: Path, *, retention_hours: float, every_s: float = SWEEP_EVERY_S) -> None:
        self._root = root
        self._older_than_s = retention_hours * HOUR_S
        self._every_s = every_s
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.passes = 0

    def start(self) -> None:
        if self._older_than_s > 0:  # 0: artifacts are kept forever
            self._task = asyncio.create_task(self._run(), name="artifact-retention")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task  # a sweep in progress runs to its end: a thread cannot be cancelled

    async def sweep_once(self) -> list[str]:
        """One sweep, logged in one line; returns the run directories removed. Never raises:
        a sweep that fails is told in the log and tried again at the next."""
        if self._older_than_s <= 0:
            return []
        try:
            # In a thread: walking a large tree must not stall the loop (and every job's heartbeats).
            removed, failed = await asyncio.to_thread(sweep, self._root, self._older_than_s)
        except Exception as exc:
            log.warning("artifacts.sweep_failed", root=str(self._root), error=repr(exc)[:500])
            return []
        report = log.warning if failed else log.info
        report("artifacts.swept", root=str(self._root), removed=len(removed), runs=removed[:LOGGED_NAMES],
               older_than_h=self._older_than_s / HOUR_S, failed=len(failed), errors=failed[:5])
        return removed

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self.sweep_once()
            self.passes += 1
            try:
                await asyncio.wait_for(self._stopping.wait(), self._every_s)
            except asyncio.TimeoutError:
                pass
