"""A small synchronous client of the HTTP API for the CLI (stdlib only: no event loop)."""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from shared.settings import Settings


class ApiError(Exception):
    def __init__(self, status: int, body: dict, hint: str = "") -> None:
        err = body.get("error") if isinstance(body, dict) else None
        err = err if isinstance(err, dict) else {}  # a JSON answer, but not the API's error shape
        message = err.get("message", body)
        fields = (err.get("details") or {}).get("fields") if isinstance(err.get("details"), dict) else None
        if isinstance(fields, dict) and fields:  # 422: which field, and why
            message = f"{message}: " + "; ".join(f"{k}: {v}" for k, v in fields.items())
        # status 0: no HTTP answer at all (nothing listens, a bad URL): the message says it all.
        super().__init__((f"HTTP {status} {err.get('code', '')}: {message}" if status else str(message)) + hint)
        self.status, self.body = status, body
        self.code = err.get("code", "")

    @property
    def transient(self) -> bool:
        """The API is there but a service behind it is not, for now (restarting)."""
        return self.status == 503 and self.code in ("service_unavailable", "dependency_unavailable")

    @property
    def no_answer(self) -> bool:
        """Nothing answered (refused, dropped, timed out): a gateway restarting, or no API there."""
        return self.status == 0 and self.code == "unreachable"


# The tenant a command acts for (X-Tenant-Id), set while a command that has the --tenant
# option runs (redrive/cli_common.py): (the tenant or None, where it came from). None: the
# command has no such option (nor does code that is not a command).
TENANT_OPTION: ContextVar[tuple[str | None, str] | None] = ContextVar("redrive_tenant_option", default=None)


@dataclass
class Api:
    base_url: str
    key: str | None
    hint: str = ""  # said after "cannot reach": where the URL came from when nothing answers
    key_hint: str = ""  # said after a 401: where the key came from (or that none was found), how to give one
    tenant: str | None = None  # sent as X-Tenant-Id: the tenant a platform admin acts for (None: the key's own)
    tenant_hint: str = ""  # said after a 404 (and a 403 when a tenant was named): which tenant, or how to name one

    @classmethod
    def from_settings(cls, settings: Settings) -> "Api":
        url, hint = os.environ.get("REDRIVE_API_URL"), ""
        if not url:
            try:
                url = json.loads(settings.runtime_file.read_text())["api_url"]
            except FileNotFoundError:
                url = f"http://{settings.host}:{settings.port}"
                hint = (f" (no `redrive up` has run with the data dir {settings.data_dir}: start one, pass its "
                        "--data-dir, or set REDRIVE_API_URL)")
            except Exception:
                url = f"http://{settings.host}:{settings.port}"
                hint = f" ({settings.runtime_file} is unreadable: run `redrive up` again, or set REDRIVE_API_URL)"
        key, admin = os.environ.get("REDRIVE_API_KEY"), settings.data_dir / "admin.key"
        from_up = "REDRIVE_DATA_DIR=<dir> where `redrive up` wrote admin.key"
        if key:
            key_hint = f" (key from REDRIVE_API_KEY: correct it, or unset it and set {from_up})"
        elif admin.exists():
            key = admin.read_text().strip()
            key_hint = f" (key from {admin}: another system's? Set {from_up} for {url}, or REDRIVE_API_KEY)"
        else:
            key_hint = (f" (no API key found: REDRIVE_API_KEY is not set and there is no {admin}; set {from_up}, "
                        "or REDRIVE_API_KEY)")
        tenant, tenant_hint = None, ""
        if (option := TENANT_OPTION.get()) is not None:
            tenant, source = option
            tenant_hint = (f" (acting for tenant {tenant}, from {source})" if tenant is not None else
                           " (another tenant's? With a platform admin's key, name the tenant: --tenant ID or "
                           "REDRIVE_TENANT; `redrive attention` shows a run's tenant)")
        url = url.rstrip("/")
        if url.endswith("/api/v1"):  # the API's own prefix (the tour's $API): the calls add it
            url = url[: -len("/api/v1")]
        return cls(url, key, hint, key_hint, tenant, tenant_hint)

    def call(self, method: str, path: str, body: Any = None, *, idempotent: bool = False) -> Any:
        if not self.base_url.startswith(("http://", "https://")):
            raise _no_answer(f"REDRIVE_API_URL must be an http:// or https:// URL, got {self.base_url!r}", "bad_setting")
        if self.key is not None and (not self.key.isprintable() or " " in self.key or not self.key.isascii()):
            raise _no_answer("the API key (REDRIVE_API_KEY, or admin.key in the data dir) holds spaces or "
                             "characters a key never has", "bad_setting")
        if self.tenant is not None and (not self.tenant or not self.tenant.isprintable() or " " in self.tenant
                                        or not self.tenant.isascii()):
            raise _no_answer(f"the tenant (--tenant, or REDRIVE_TENANT) {self.tenant!r} is empty or holds spaces or "
                             "characters a tenant id never has", "bad_setting")
        data = None if body is None else json.dumps(body).encode()
        try:
            req = urllib.request.Request(self.base_url + "/api/v1" + path, data=data, method=method)
        except ValueError as exc:  # e.g. "http://[::1": not a URL at all
            raise _no_answer(f"REDRIVE_API_URL is not a valid URL ({self.base_url!r}): {exc}", "bad_setting") from None
        req.add_header("Content-Type", "application/json")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        if self.tenant is not None:
            req.add_header("X-Tenant-Id", self.tenant)
        if idempotent:
            req.add_header("Idempotency-Key", uuid.uuid4().hex)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = {"error": {"code": "http_error", "message": raw.decode(errors="replace")[:200]}}
            raise ApiError(exc.code, parsed, self._hint(exc.code)) from None
        except urllib.error.URLError as exc:
            raise _no_answer(f"cannot reach {self.base_url}: {exc.reason}{self.hint}") from None
        except (http.client.InvalidURL, ValueError) as exc:  # a URL urllib cannot use (bad port, bad host)
            raise _no_answer(f"REDRIVE_API_URL is not a valid URL ({self.base_url!r}): {exc}", "bad_setting") from None
        except (http.client.HTTPException, OSError) as exc:  # dropped connection, read timeout
            raise _no_answer(f"no answer from {self.base_url}: {str(exc) or type(exc).__name__}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise ApiError(status, {"error": {"code": "not_json", "message": f"{self.base_url} answered with something "
                                              "that is not JSON: is REDRIVE_API_URL a redrive API?"}}) from None

    def _hint(self, status: int) -> str:
        if status == 401:
            return self.key_hint
        if status == 404 or (status == 403 and self.tenant is not None):
            return self.tenant_hint
        return ""


def _no_answer(message: str, code: str = "unreachable") -> ApiError:
    """No HTTP answer: ``unreachable`` when nothing answered, ``bad_setting`` when the URL or the
    key could not even be sent."""
    return ApiError(0, {"error": {"code": code, "message": message}})
