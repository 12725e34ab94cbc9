"""What a refused recovery tells the user to do instead (commands/recover.py)."""

from __future__ import annotations

import pytest

from shared.messages import ServiceError
from services.coordinator.commands.recover import _check_recoverable


@pytest.mark.parametrize("status, hint", [("COMPLETED_WITH_ERRORS", True), ("CANCELLED", False)])
async def test_continue_is_suggested_only_where_it_can_be_pressed(status, hint):
    run = {"id": "r", "status": status, "pending": 0, "failed": 1}
    with pytest.raises(ServiceError) as refused:
        await _check_recoverable(None, None, run)  # refused before it asks the database
    assert refused.value.code == "run_not_recoverable"
    assert refused.value.message.startswith(f"a {status} run with 0 pending file(s) has nothing to recover")
    assert ("use Continue (retry-failed) for FAILED files" in refused.value.message) is hint
