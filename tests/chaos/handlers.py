"""A step handler for chaos tests: it records every start of every step (a side-effect
counter, like DBOS's recovery tests, with the pid of the executor process that ran it),
then works for ``sleep_ms``."""

from __future__ import annotations

import asyncio
import json
import os
import time


def register(registry) -> None:
    @registry.handler("chaos_step")
    async def chaos_step(ctx) -> dict:
        line = json.dumps({"run": ctx.run_id, "file": ctx.file_index, "step": ctx.step_index, "round": ctx.round,
                           "t": time.time(), "pid": os.getpid()}) + "\n"
        fd = os.open(ctx.params["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        await asyncio.sleep(ctx.params.get("sleep_ms", 0) / 1000)
        return {"step": ctx.step_index}
