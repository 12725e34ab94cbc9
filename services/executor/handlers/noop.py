"""Does nothing, fast: the 10,000-files/s benchmark's handler (keep it that way)."""

from services.executor.handlers.base import StepContext


async def run(ctx: StepContext) -> dict:
    """Return an empty output."""
    return {}
