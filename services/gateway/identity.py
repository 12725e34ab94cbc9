"""Tenants and API keys. A key is a random token shown once (``rk_`` + 32 random bytes,
url-safe); only its sha256 is stored, looked up by hash and compared in constant time.

These functions take an engine and nothing else, so that the CLI (``redrive tenant
create``, ``redrive key create``) calls them directly, with no gateway running.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.requests import control_character

ROLES = ("member", "tenant_admin", "platform_admin")  # weakest first
KEY_PREFIX = "rk_"
_MAX_KEY_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    role: str
    user: str
    key_id: str

    def at_least(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    @property
    def actor(self) -> str:
        """How the timeline and the ledger name whoever acted."""
        return self.user or f"key:{self.key_id}"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_tenant(engine: AsyncEngine, name: str, tenant_id: str | None = None) -> str:
    """Create a tenant (or keep the existing one with that id) and return its id."""
    tenant_id = tenant_id or uuid.uuid4().hex[:16]
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO gateway.tenants (id, name) VALUES (:id, :name) ON CONFLICT (id) DO NOTHING"),
                           {"id": tenant_id, "name": name})
    return tenant_id


async def tenant_exists(engine: AsyncEngine, tenant_id: str) -> bool:
    async with engine.connect() as conn:
        found = await conn.execute(text("SELECT 1 FROM gateway.tenants WHERE id = :t"), {"t": tenant_id})
        return found.first() is not None


MAX_USER = 200  # characters


async def create_key(engine: AsyncEngine, tenant_id: str, role: str, user: str) -> str:
    """Make a key for ``user`` of ``tenant_id`` with ``role``; the plaintext is returned once."""
    return (await make_key(engine, tenant_id, role, user))[1]


def user_name_problem(user: str) -> str | None:
    """Why ``user`` cannot name a key's user, or None."""
    if not user.strip():
        return "the user name must not be empty or only spaces"
    if len(user) > MAX_USER:
        return f"the user name is {len(user)} characters long: at most {MAX_USER}"
    if (problem := control_character(user)) is not None:
        return f"the user name {problem}"  # listed one key a line, in operators' terminals
    return None


async def make_key(engine: AsyncEngine, tenant_id: str, role: str, user: str) -> tuple[str, str]:
    """:func:`create_key`, with the key's id (what ``redrive key revoke`` takes): (id, key)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if (problem := user_name_problem(user)) is not None:
        raise ValueError(problem)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    async with engine.begin() as conn:
        exists = (await conn.execute(text("SELECT 1 FROM gateway.tenants WHERE id = :t"), {"t": tenant_id})).first()
        if exists is None:
            raise ValueError(f"no tenant {tenant_id}")
        key_id = uuid.uuid4().hex[:12]
        await conn.execute(text("INSERT INTO gateway.api_keys (id, tenant_id, user_name, role, key_hash) "
                                "VALUES (:id, :t, :u, :r, :h)"),
                           {"id": key_id, "t": tenant_id, "u": user, "r": role, "h": key_hash(key)})
    return key_id, key


async def revoke_key(engine: AsyncEngine, key_id: str) -> bool:
    """Revoke a key by id. Every gateway refuses it as soon as this commits: a trigger on
    gateway.api_keys notifies them, and they evict it from their caches (key_revocations.py)."""
    async with engine.begin() as conn:
        done = await conn.execute(text("UPDATE gateway.api_keys SET revoked_at = now() "
                                       "WHERE id = :id AND revoked_at IS NULL RETURNING id"), {"id": key_id})
        return done.first() is not None


async def list_keys(engine: AsyncEngine, tenant_id: str | None = None) -> list[dict]:
    """Keys (never their secret: only its hash is kept), newest first; one tenant's or all."""
    sql = ("SELECT id, tenant_id, user_name AS user, role, created_at, revoked_at FROM gateway.api_keys"
           + (" WHERE tenant_id = :t" if tenant_id else "") + " ORDER BY created_at DESC, id")
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(text(sql), {"t": tenant_id})).mappings()]


async def key_id_of(engine: AsyncEngine, key: str) -> str | None:
    """The id of a key given in full (to revoke a key one holds without knowing its id)."""
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT id FROM gateway.api_keys WHERE key_hash = :h"),
                                  {"h": key_hash(key)})).first()
    return row[0] if row else None


class KeyCache:
    """Positive lookups, bounded (least recently used leave first), so the hot path does not
    ask PostgreSQL on every request.

    It answers only while revocations are being heard (key_revocations.py LISTENs for the
    gateway): :meth:`trust` once listening, :meth:`evict` for each key that changed,
    :meth:`distrust` as soon as the listening connection is lost, since a revocation may
    then go unheard. A new cache is distrusted: it serves nothing until someone listens for
    it. The TTL is only a backstop.
    """

    def __init__(self, ttl_s: float = 30.0, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._trusted = False
        self._generation = 0  # bumped by every eviction: see put()

    @property
    def generation(self) -> int:
        """Read it before a lookup and give it to :meth:`put`."""
        return self._generation

    def get(self, digest: str) -> Principal | None:
        if not self._trusted:
            return None
        hit = self._entries.get(digest)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return hit[1]

    def put(self, digest: str, principal: Principal, generation: int) -> None:
        """Keep the result of a lookup begun at ``generation``, unless anything was evicted
        since: a revocation heard while the lookup was on its way may be the one that makes
        its answer stale, and caching it would outlive the eviction."""
        if not self._trusted or generation != self._generation:
            return
        self._entries[digest] = (time.monotonic() + self.ttl_s, principal)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def evict(self, digest: str) -> None:
        self._generation += 1
        self._entries.pop(digest, None)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()

    def trust(self) -> None:
        """Revocations are heard from now on. What was kept before may have been revoked
        unheard, so it starts empty."""
        self.clear()
        self._trusted = True

    def distrust(self) -> None:
        """Revocations may go unheard: forget everything, answer nothing."""
        self.clear()
        self._trusted = False

    def __len__(self) -> int:
        return len(self._entries)


async def authenticate(engine: AsyncEngine, key: str, cache: KeyCache | None = None) -> Principal | None:
    """The principal of a live key, or None for a missing, malformed, unknown or revoked key."""
    # Ours are ASCII (url-safe base64); a header's non-UTF-8 bytes arrive as surrogates,
    # which cannot even be hashed.
    if not key.startswith(KEY_PREFIX) or len(key) > _MAX_KEY_LENGTH or not key.isascii():
        return None  # not one of ours: no need to ask the database
    digest = key_hash(key)
    if cache is not None and (hit := cache.get(digest)) is not None:
        return hit
    generation = cache.generation if cache is not None else 0  # before the lookup: see KeyCache.put
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT id, tenant_id, user_name, role, key_hash FROM gateway.api_keys "
                                       "WHERE key_hash = :h AND revoked_at IS NULL"), {"h": digest})).first()
    # The index finds the row; the constant-time comparison is the actual check.
    if row is None or not hmac.compare_digest(row.key_hash.encode(), digest.encode()):
        return None
    principal = Principal(row.tenant_id, row.role, row.user_name, row.id)
    if cache is not None:
        cache.put(digest, principal, generation)
    return principal
