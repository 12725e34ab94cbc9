"""API keys: the positive cache is short-lived and bounded, and answers only while
revocations are heard; keys that are not ours never reach the database."""

import time

from services.gateway.identity import KeyCache, Principal, authenticate, key_hash

P = Principal("t", "member", "u", "k1")


def test_a_cached_key_expires_after_its_ttl(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    cache = KeyCache(ttl_s=30)
    cache.trust()
    cache.put("h", P, cache.generation)
    assert cache.get("h") == P
    now[0] += 31
    assert cache.get("h") is None and len(cache) == 0


def test_the_cache_is_bounded_and_keeps_the_recently_used():
    cache = KeyCache(max_entries=2)
    cache.trust()
    cache.put("a", P, cache.generation)
    cache.put("b", P, cache.generation)
    cache.get("a")
    cache.put("c", P, cache.generation)
    assert len(cache) == 2 and cache.get("a") == P and cache.get("b") is None


async def test_a_key_that_is_not_ours_is_refused_without_the_database():
    # engine=None: touching the database would raise.
    assert await authenticate(None, "not-a-redrive-key") is None
    assert await authenticate(None, "rk_" + "x" * 300) is None


async def test_a_cached_key_is_answered_without_the_database():
    cache = KeyCache()
    cache.trust()
    cache.put(key_hash("rk_abc"), P, cache.generation)
    assert await authenticate(None, "rk_abc", cache) == P


def test_a_cache_nobody_listens_for_answers_nothing_and_keeps_nothing():
    cache = KeyCache()
    cache.put("h", P, cache.generation)
    assert cache.get("h") is None and len(cache) == 0
    cache.trust()
    cache.put("h", P, cache.generation)
    cache.distrust()  # the listening connection is lost: a revocation may go unheard
    assert cache.get("h") is None and len(cache) == 0
    cache.trust()  # listening again: what was kept before is gone
    assert cache.get("h") is None


def test_an_evicted_key_is_gone_and_a_lookup_begun_before_an_eviction_is_not_kept():
    cache = KeyCache()
    cache.trust()
    cache.put("a", P, cache.generation)
    cache.put("b", P, cache.generation)
    cache.evict("a")
    assert cache.get("a") is None and cache.get("b") == P
    began = cache.generation  # a lookup of "c" starts, finds the key live...
    cache.evict("c")  # ...and its revocation is heard before the lookup returns
    cache.put("c", P, began)
    assert cache.get("c") is None
    cache.clear()
    assert len(cache) == 0


def test_roles_are_ordered():
    admin = Principal("t", "tenant_admin", "u", "k")
    assert admin.at_least("member") and admin.at_least("tenant_admin") and not admin.at_least("platform_admin")
    assert Principal("t", "member", "", "k9").actor == "key:k9"
