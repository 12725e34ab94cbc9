"""The credentials of the embedded servers (shared/embedded/): generated once per data
directory, kept there in files only their owner can read."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path


def load_secret(path: Path) -> str | None:
    """The secret kept in ``path``, or None when there is none yet."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def new_secret() -> str:
    # URL-safe alphabet: it goes into URLs as is (and into an Alembic config, where "%" is special).
    return secrets.token_urlsafe(32)


def save_secret(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path``, readable by its owner only, whole or not at all."""
    part = path.with_name(f".{path.name}.part")
    part.unlink(missing_ok=True)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    os.replace(part, path)


def scram_sha256_verifier(password: str, iterations: int = 4096) -> str:
    """What PostgreSQL stores for ``password`` (RFC 5802/7677, as its own
    ``pg_be_scram_build_secret``): ``ALTER ROLE … PASSWORD '<this>'`` sets the password
    without the password itself reaching the server, its logs or its statement errors."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}"


# A pg_hba.conf record (not a comment) whose method is trust, the method being its last field.
_TRUST_RECORD = re.compile(r"^(\s*(?:local|host\w*)\s[^#\n]*\s)trust(?=\s*(?:#.*)?$)", re.MULTILINE)


def password_required(pg_hba: str) -> str:
    """``pg_hba`` with each trust record asking for a SCRAM password instead."""
    return _TRUST_RECORD.sub(r"\1scram-sha-256", pg_hba)
