"""API keys: the positive cache is short-lived and bounded; keys that are not ours never
reach the database."""

import time

from services.gateway.identity import KeyCache, Principal, authenticate, key_hash

P = Principal("t", "member", "u", "k1")


def test_a_cached_key_expires_after_its_ttl(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    cache = KeyCache(ttl_s=30)
    cache.put("h", P)
    assert cache.get("h") == P
    now[0] += 31
    assert cache.get("h") is None and len(cache) == 0


def test_the_cache_is_bounded_and_keeps_the_recently_used():
    cache = KeyCache(max_entries=2)
    cache.put("a", P)
    cache.put("b", P)
    cache.get("a")
    cache.put("c", P)
    assert len(cache) == 2 and cache.get("a") == P and cache.get("b") is None


async def test_a_key_that_is_not_ours_is_refused_without_the_database():
    # engine=None: touching the database would raise.
    assert await authenticate(None, "not-a-redrive-key") is None
    assert await authenticate(None, "rk_" + "x" * 300) is None


async def test_a_cached_key_is_answered_without_the_database():
    cache = KeyCache()
    cache.put(key_hash("rk_abc"), P)
    assert await authenticate(None, "rk_abc", cache) == P


def test_roles_are_ordered():
    admin = Principal("t", "tenant_admin", "u", "k")
    assert admin.at_least("member") and admin.at_least("tenant_admin") and not admin.at_least("platform_admin")
    assert Principal("t", "member", "", "k9").actor == "key:k9"
