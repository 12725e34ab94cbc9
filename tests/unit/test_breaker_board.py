"""The breaker board's local rules, without NATS: bounded keys, a bounded listing with the
most relevant breakers first, and a local copy that forgets what the bucket let go."""

from __future__ import annotations

import time

import orjson

from services.executor.breakers import BreakerBoard, _key
from shared.breaker import BreakerState
from shared.subjects import Names


def board(**kw) -> BreakerBoard:
    return BreakerBoard(object(), Names(), **kw)  # the rules here read only the local copy


def hold(b: BreakerBoard, tenant: str, dependency: str, state: BreakerState, written: float | None = None) -> None:
    key = _key(tenant, dependency)
    b._local[key] = (state, tenant, dependency)
    b._written[key] = (1, time.time() if written is None else written)


def test_a_key_is_bounded_whatever_the_dependency_is_called_and_long_names_stay_apart():
    assert _key("t", "api.example.com") == "t/api.example.com"  # short keys are as they were
    assert _key("t", "a b") == "t/a_b"
    long_a, long_b = _key("t", "a" * 100_000), _key("t", "a" * 99_999 + "b")
    assert len(long_a) <= 2 + 128 and len(long_b) <= 2 + 128 and long_a != long_b


def test_the_listing_puts_open_and_half_open_first_then_most_failures_and_counts_the_rest():
    b, now = board(max_listed=3), time.time()
    hold(b, "t", "quiet", BreakerState())
    hold(b, "t", "few", BreakerState("closed", 1))
    hold(b, "t", "many", BreakerState("closed", 4))
    hold(b, "t", "due", BreakerState("open", 2, now - 60, now - 1))  # shown half-open
    hold(b, "t", "down", BreakerState("open", 9, now, now + 30))
    hold(b, "u", "theirs", BreakerState("open", 1, now, now + 30))
    listed = b.snapshot("t")
    assert [(x["dependency"], x["state"]) for x in listed] == [("down", "open"), ("due", "half_open"),
                                                              ("many", "closed")]
    assert {x["not_listed"] for x in listed} == {2}
    assert len(b.snapshot()) == 3 and {x["not_listed"] for x in b.snapshot()} == {3}
    assert [x["not_listed"] for x in b.snapshot("u")] == [0]
    assert board().snapshot() == []


def test_the_listing_stays_within_its_byte_budget():
    b = board(max_reply_bytes=10_000)
    for i in range(200):
        hold(b, "t", f"{i:03d}-" + "h" * 300, BreakerState("closed", i))
    listed = b.snapshot()
    assert 0 < len(listed) < 200 and len(orjson.dumps(listed)) <= 10_000
    assert {x["not_listed"] for x in listed} == {200 - len(listed)}


def test_the_local_copy_forgets_a_breaker_the_bucket_has_let_go():
    b, now = board(idle_ttl_s=60), time.time()
    hold(b, "t", "old", BreakerState("open", 5, now - 120, now + 30), written=now - 61)
    hold(b, "t", "new", BreakerState("open", 5, now, now + 30), written=now)
    assert b.admit("t", "old").verdict == "run" and b.admit("t", "new").verdict == "defer"
    assert [x["dependency"] for x in b.snapshot()] == ["new"]
    assert _key("t", "old") not in b._local
