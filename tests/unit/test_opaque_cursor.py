"""shared/opaque_cursor.py: a cursor carries an id that only the key's holder can read, and
nothing else passes for one."""

from __future__ import annotations

import base64
import re

import pytest

from shared.messages import ServiceError
from shared.opaque_cursor import LARGEST, TOKEN_LENGTH, TOKEN_PATTERN, hide, reveal, reveal_or_refuse

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SCOPE = ("billing.ledger", "ten-1")


@pytest.mark.parametrize("n", [0, 1, 2, 11, 19, 2**31, 2**32 + 7, LARGEST - 1, LARGEST])
def test_a_token_reveals_its_id_under_the_same_key_and_scope(n):
    token = hide(KEY, n, *SCOPE)
    assert len(token) == TOKEN_LENGTH and re.fullmatch(TOKEN_PATTERN, token)
    assert reveal(KEY, token, *SCOPE) == n == reveal_or_refuse(KEY, token, *SCOPE)
    assert hide(KEY, n, *SCOPE) == token  # one position, one cursor


def test_consecutive_ids_give_tokens_that_neither_count_nor_order():
    tokens = [hide(KEY, n, *SCOPE) for n in range(1000, 1200)]
    assert len(set(tokens)) == len(tokens)
    assert not any(t.isdigit() for t in tokens)
    # Ordered tokens would tell the order of ids (and so roughly the gaps): about half of
    # the neighbours must go down, as for random strings.
    ups = sum(a < b for a, b in zip(tokens, tokens[1:]))
    assert 60 < ups < 140, ups
    # Nor does the number under the encoding follow the id.
    numbers = [int.from_bytes(base64.urlsafe_b64decode(t + "=="), "big") for t in tokens]
    assert len({b - a for a, b in zip(numbers, numbers[1:])}) == len(numbers) - 1


def test_another_key_or_scope_gives_an_unrelated_token_and_reads_none():
    n = 12345
    token = hide(KEY, n, *SCOPE)
    others = (hide(OTHER_KEY, n, *SCOPE), hide(KEY, n, "billing.ledger", "ten-2"),
              hide(KEY, n, "coordinator.timeline", "ten-1"))
    for other in others:
        assert other != token
        # Unrelated: about half the bits differ, not a few.
        a, b = (int.from_bytes(base64.urlsafe_b64decode(t + "=="), "big") for t in (token, other))
        assert 32 < bin(a ^ b).count("1") < 96
    assert reveal(OTHER_KEY, token, *SCOPE) is None
    assert reveal(KEY, token, "billing.ledger", "ten-2") is None
    # Scope parts are kept apart: ("a:b", "c") is not ("a", "b:c").
    assert reveal(KEY, hide(KEY, n, "a:b", "c"), "a", "b:c") is None


def test_anything_that_is_no_token_of_ours_reads_none():
    token = hide(KEY, 42, *SCOPE)
    malformed = ["", "42", "0" * 18, "garbage", "A" * TOKEN_LENGTH, token + "A", token[:-1], token + "\n",
                 token.replace(token[3], "+" if token[3] != "+" else "/"), " " + token[1:], "é" * TOKEN_LENGTH,
                 "=" * TOKEN_LENGTH, None, 42, b"x" * TOKEN_LENGTH]
    # Every one-character edit of a real token is refused: 64 bits of it must decipher to zero.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    edited = [token[:i] + c + token[i + 1:] for i in range(TOKEN_LENGTH) for c in alphabet if c != token[i]]
    for bad in malformed + edited:
        assert reveal(KEY, bad, *SCOPE) is None, bad
    with pytest.raises(ServiceError) as refused:
        reveal_or_refuse(KEY, "garbage", *SCOPE)
    assert refused.value.code == "validation_error" and "cursor" in refused.value.details["fields"]


@pytest.mark.parametrize("n", [-1, LARGEST + 1])
def test_only_bigint_ids_are_hidden(n):
    with pytest.raises(ValueError):
        hide(KEY, n, *SCOPE)


async def test_the_stored_key_is_read_once_per_engine():
    from shared.opaque_cursor import StoredKey

    class Engine:  # what StoredKey needs of a connection: its engine, and a query
        pass

    class Conn:
        def __init__(self, engine, key):
            self.engine, self.key, self.reads = engine, key, 0

        async def execute(self, statement):
            assert str(statement) == "SELECT key FROM svc.cursor_key"
            self.reads += 1
            return type("Result", (), {"scalar_one": lambda _: self.key})()

    stored = StoredKey("svc.cursor_key")
    one, other = Conn(Engine(), KEY), Conn(Engine(), OTHER_KEY)
    assert [await stored.get(one) for _ in range(3)] == [KEY] * 3 and one.reads == 1
    assert await stored.get(other) == OTHER_KEY and other.reads == 1  # another database, its own key
