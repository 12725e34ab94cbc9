from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shared.messages import Credits  # amounts are PostgreSQL bigints: larger is a validation error
from shared.opaque_cursor import TOKEN_PATTERN


class _Cmd(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tenant_id: str = Field(min_length=1, max_length=64)  # as the coordinator's Caller


class OpenAccount(_Cmd):
    monthly_allowance: Credits = 0
    purchased: Credits = 0


class Reserve(_Cmd):
    amount: Credits
    idempotency_key: str = Field(min_length=1, max_length=300)
    run_id: str | None = None
    actor: str | None = None


class Refund(_Cmd):
    idempotency_key: str = Field(min_length=1, max_length=300)
    of_key: str = Field(min_length=1, max_length=300)
    amount: Credits | None = None
    run_id: str | None = None
    actor: str | None = None


class Balance(_Cmd):
    pass


class Ledger(_Cmd):
    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = Field(default=None, pattern=TOKEN_PATTERN)  # opaque: handlers.ledger


class Grant(_Cmd):
    purchased: int = Field(ge=1, le=100_000_000)
    idempotency_key: str | None = Field(default=None, max_length=300)
    actor: str | None = None
