"""HTTP bodies that only the gateway sees (the rest are in shared/requests.py), and the
shape of a 422's field errors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GrantBody(_Body):
    purchased: int = Field(ge=1, le=100_000_000)


class WebhookBody(_Body):
    url: str = Field(pattern=r"^https?://", max_length=2000)
    secret: str = Field(min_length=16, max_length=200)


def field_errors(exc) -> dict[str, Any]:
    return {"fields": {".".join(str(p) for p in e["loc"]) or "body": e["msg"] for e in exc.errors()}}
