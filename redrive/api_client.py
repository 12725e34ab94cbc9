"""A small synchronous client of the HTTP API for the CLI (stdlib only: no event loop)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

from shared.settings import Settings


class ApiError(Exception):
    def __init__(self, status: int, body: dict) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"HTTP {status} {err.get('code', '')}: {err.get('message', body)}")
        self.status, self.body = status, body


@dataclass
class Api:
    base_url: str
    key: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> "Api":
        url = os.environ.get("REDRIVE_API_URL")
        if not url:
            try:
                url = json.loads(settings.runtime_file.read_text())["api_url"]
            except Exception:
                url = f"http://{settings.host}:{settings.port}"
        key = os.environ.get("REDRIVE_API_KEY")
        if not key:
            admin = settings.data_dir / "admin.key"
            key = admin.read_text().strip() if admin.exists() else None
        return cls(url.rstrip("/"), key)

    def call(self, method: str, path: str, body: Any = None, *, idempotent: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + "/api/v1" + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        if idempotent:
            req.add_header("Idempotency-Key", uuid.uuid4().hex)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = {"error": {"code": "http_error", "message": raw.decode(errors="replace")[:200]}}
            raise ApiError(exc.code, parsed) from None
        except urllib.error.URLError as exc:
            raise ApiError(0, {"error": {"code": "unreachable", "message": f"cannot reach {self.base_url}: {exc.reason}"}}) from None
