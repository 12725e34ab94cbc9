"""Crash points for fault tests: `REDRIVE_CRASH_AT_<POINT>=<marker file>` makes the process
exit at once (like kill -9: no cleanup runs) the first time it reaches <point> while the
marker exists; the marker is removed first, so a restarted process goes on normally.
Without the variable, a crash point costs one dict lookup."""

from __future__ import annotations

import os


def crash_point(point: str) -> None:
    marker = os.environ.get(f"REDRIVE_CRASH_AT_{point.upper()}")
    if marker and os.path.exists(marker):
        try:
            os.remove(marker)
        except FileNotFoundError:  # another process took it
            return
        os._exit(137)
