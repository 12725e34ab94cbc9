"""What both embedded servers share: their error, a free port, a log's tail, start and stop
as a context manager and off the event loop."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(log: Path, chars: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


class _Managed:
    """Context-manager and async plumbing shared by both servers (which define start/stop)."""

    def restart(self):
        self.stop()
        return self.start()

    async def astart(self):
        # Start-up blocks (PostgreSQL ~1 s): keep the event loop free.
        return await asyncio.to_thread(self.start)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
