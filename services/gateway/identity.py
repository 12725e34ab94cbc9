"""Tenants and API keys. Keys are random tokens shown once; only their sha256 is stored,
looked up by hash and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

ROLES = ("member", "tenant_admin", "platform_admin")


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    role: str
    user: str
    key_id: str

    def at_least(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_tenant(engine: AsyncEngine, name: str, tenant_id: str | None = None) -> str:
    tenant_id = tenant_id or uuid.uuid4().hex[:16]
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO gateway.tenants (id, name) VALUES (:id, :name) ON CONFLICT (id) DO NOTHING"),
                           {"id": tenant_id, "name": name})
    return tenant_id


async def create_key(engine: AsyncEngine, tenant_id: str, role: str, user: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    key = "rk_" + secrets.token_urlsafe(32)
    async with engine.begin() as conn:
        exists = (await conn.execute(text("SELECT 1 FROM gateway.tenants WHERE id = :t"), {"t": tenant_id})).first()
        if exists is None:
            raise ValueError(f"no tenant {tenant_id}")
        await conn.execute(text("INSERT INTO gateway.api_keys (id, tenant_id, user_name, role, key_hash) "
                                "VALUES (:id, :t, :u, :r, :h)"),
                           {"id": uuid.uuid4().hex[:12], "t": tenant_id, "u": user, "r": role, "h": _hash(key)})
    return key


class KeyStore:
    """Authenticates bearer keys, caching positive answers briefly (hot path)."""

    def __init__(self, engine: AsyncEngine, ttl_s: float = 30.0) -> None:
        self._engine = engine
        self._ttl = ttl_s
        self._cache: dict[str, tuple[float, Principal]] = {}

    async def authenticate(self, key: str) -> Principal | None:
        digest = _hash(key)
        hit = self._cache.get(digest)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        async with self._engine.connect() as conn:
            row = (await conn.execute(text("SELECT id, tenant_id, user_name, role, key_hash FROM gateway.api_keys "
                                           "WHERE key_hash = :h AND revoked_at IS NULL"), {"h": digest})).first()
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return None
        principal = Principal(row.tenant_id, row.role, row.user_name, row.id)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (time.monotonic() + self._ttl, principal)
        return principal
