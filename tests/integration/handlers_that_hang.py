"""REDRIVE_HANDLERS for a test of `redrive up`'s readiness timeout: the module loads in `up`
(which checks it before it starts anything) but hangs in the executor process, which then
never answers."""

from __future__ import annotations

import sys
import time


def register(registry) -> None:
    if sys.argv[1:3] == ["service", "executor"]:
        time.sleep(3600)
