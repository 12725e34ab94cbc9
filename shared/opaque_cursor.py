"""Page cursors that carry a row's id without showing it.

Some lists are read in the order of a ``bigserial`` that every tenant shares (billing's
ledger, a run's timeline). Handed out as is, that id told a tenant how much the others did
between two of its own rows: the gap. Here the id is enciphered under a key of the
deployment, so the keyset query stays as it was (``id < :after``, one index, no OFFSET) and
the caller sees a fixed-length token that neither counts nor orders anything.

The cipher is AES-256 on one 16-byte block (the ``cryptography`` package): half of the
block is the id, the other half 64 zero bits, so a token that is not one we made (edited,
made up, another list's) deciphers to something else there, and is refused, but for a
chance of 2⁻⁶⁴. ``scope`` names the list (and whose it is): its key is derived from the
deployment's key and the scope, so the same id in another scope is another, unrelated
token, and a token of one list is no cursor of another.

The key is a per-deployment secret kept in one row of the service's own schema, drawn by
its migration, so every replica reads the same one (:class:`StoredKey`).
"""

from __future__ import annotations

import base64
import hmac
import re
from weakref import WeakKeyDictionary

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.messages import ServiceError

_HALF = 8  # bytes: half of the block, the id's (a bigint's) width
_CHECK = bytes(_HALF)  # the half that is always zero in a token we made
LARGEST = 2**63 - 1  # a PostgreSQL bigint; ids are never negative

TOKEN_LENGTH = 22  # 16 bytes in unpadded base64
# For request schemas: what a token looks like (anything else is refused before any work).
TOKEN_PATTERN = rf"^[A-Za-z0-9_-]{{{TOKEN_LENGTH}}}$"
_TOKEN = re.compile(TOKEN_PATTERN)


def hide(key: bytes, n: int, *scope: str) -> str:
    """The token of id ``n`` in the list ``scope``: 22 URL-safe characters."""
    if not 0 <= n <= LARGEST:
        raise ValueError(f"{n} is not an id a cursor carries")
    encryptor = _cipher(key, scope).encryptor()
    return _text(encryptor.update(n.to_bytes(_HALF, "big") + _CHECK) + encryptor.finalize())


def reveal(key: bytes, token: object, *scope: str) -> int | None:
    """The id that ``hide`` put in ``token`` for this ``scope``; None for anything else."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        return None
    block = base64.urlsafe_b64decode(token + "==")
    if _text(block) != token:  # the last character's unused bits set: not a token we wrote
        return None
    decryptor = _cipher(key, scope).decryptor()
    plain = decryptor.update(block) + decryptor.finalize()
    if not hmac.compare_digest(plain[_HALF:], _CHECK):
        return None
    n = int.from_bytes(plain[:_HALF], "big")
    return n if n <= LARGEST else None


def reveal_or_refuse(key: bytes, token: str, *scope: str) -> int:
    """``reveal``, with the caller's error (422 naming ``cursor``) for a token that is not ours."""
    n = reveal(key, token, *scope)
    if n is None:
        raise ServiceError("validation_error", "invalid cursor: pass next_cursor from the previous page",
                           {"fields": {"cursor": "not a cursor of this list"}})
    return n


class StoredKey:
    """The key of a service's cursors: the one row of ``table`` in its own schema (created
    with its random key by the service's migration). Read on first use, then kept for the
    engine it came through: one database, one key, and no query per page."""

    def __init__(self, table: str) -> None:
        self._select = text(f"SELECT key FROM {table}")
        self._by_engine: WeakKeyDictionary[AsyncEngine, bytes] = WeakKeyDictionary()

    async def get(self, conn: AsyncConnection) -> bytes:
        key = self._by_engine.get(conn.engine)
        if key is None:
            key = bytes((await conn.execute(self._select)).scalar_one())
            self._by_engine[conn.engine] = key
        return key


def _cipher(key: bytes, scope: tuple[str, ...]) -> Cipher:
    # One block, one key: ECB is AES itself, a pseudo-random permutation of the block. Each
    # scope part is length-prefixed, so ("a:b", "c") and ("a", "b:c") are different scopes.
    label = b"".join(len(p).to_bytes(4, "big") + p for p in (part.encode() for part in scope))
    return Cipher(algorithms.AES256(hmac.digest(key, b"redrive cursor\x00" + label, "sha256")), modes.ECB())


def _text(block: bytes) -> str:
    return base64.urlsafe_b64encode(block).rstrip(b"=").decode()
