"""Does nothing, fast: the benchmark's handler."""

from services.executor.handlers.base import StepContext


async def run(ctx: StepContext) -> dict:
    return {}
