"""Webhook signatures: ``X-Redrive-Signature: t=<unix seconds>,v1=<hex hmac-sha256(secret, "<t>.<body>")>``.

The timestamp is part of what is signed, so a receiver that also checks it is recent
(``tolerance_s``) cannot be fooled by a replayed old delivery. A receiver verifies with::

    from services.notifier.signing import verify
    ok = verify(secret, raw_request_body, request.headers["X-Redrive-Signature"])
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-Redrive-Signature"


def _mac(secret: str, body: bytes, t: int) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, t: int | None = None) -> str:
    """The header value for ``body`` signed at unix time ``t`` (now by default)."""
    t = int(time.time()) if t is None else int(t)
    return f"t={t},v1={_mac(secret, body, t)}"


def verify(secret: str, body: bytes, header: str, tolerance_s: float = 300, now: float | None = None) -> bool:
    """True when ``header`` signs exactly ``body`` with ``secret`` and its timestamp is within
    ``tolerance_s`` of now. Constant-time comparison; never raises on a malformed header."""
    try:
        fields = [part.strip().split("=", 1) for part in header.split(",")]
        t = int(next(value for key, value in fields if key == "t"))
        signatures = [value for key, value in fields if key == "v1"]
    except (ValueError, StopIteration, AttributeError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = _mac(secret, body, t).encode()
    # Several v1 values are allowed (a sender rotating secrets); any one matching is enough.
    return any(hmac.compare_digest(expected, sig.encode("utf-8", "replace")) for sig in signatures)
