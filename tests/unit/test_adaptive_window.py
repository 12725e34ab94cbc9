"""A tenant's window from the executors' slots (services/coordinator/jobs.py) and the
coordinator's count of the slots of the executors alive (shared/handler_offers.py)."""

from __future__ import annotations

import datetime
from types import SimpleNamespace

import orjson

from services.coordinator.window import HEADROOM, MIN_WINDOW, Window, window_size
from shared.handler_offers import DEFAULT_SLOTS, LIVE_S, OfferedHandlers
from shared.subjects import Names


def test_a_tenant_alone_gets_headroom_times_the_fleets_slots_and_two_share_them():
    assert window_size(4096, 256, 1) == HEADROOM * 256 == 1024
    assert window_size(4096, 256, 2) == 512
    assert window_size(4096, 2560, 1) == 4096  # ten executors: the cap
    assert window_size(4096, 256, 1000) == MIN_WINDOW
    assert window_size(8, 256, 1) == 8  # never above the cap
    assert window_size(4096, 256, 0) == 1024  # counted as one


def test_unknown_slots_leave_the_configured_cap():
    assert window_size(4096, None, 3) == 4096


async def test_the_tenants_are_not_counted_when_the_cap_is_below_the_floor():
    class NoConn:
        async def execute(self, *_):
            raise AssertionError("counted the tenants")

    assert await Window(8, lambda: 256).size(NoConn()) == 8
    assert await Window(4096, lambda: None).size(NoConn()) == 4096


def _entry(key: str, value: bytes, created: datetime.datetime | None = None):
    return SimpleNamespace(key=key, value=value, created=created, operation=None if value else "DEL")


def _view():
    now = [1000.0]
    view = OfferedHandlers(None, Names("t"), clock=lambda: now[0])
    return view, now


def test_the_slots_of_the_executors_alive_are_summed_and_a_silent_one_stops_counting():
    view, now = _view()
    assert view.slots() is None  # no executor announced: unknown
    view._apply(_entry("executors.a", orjson.dumps({"slots": 256})))
    view._apply(_entry("executors.b", orjson.dumps({"slots": 64})))
    assert view.slots() == 320
    now[0] += LIVE_S / 2
    view._apply(_entry("executors.a", orjson.dumps({"slots": 256})))  # a's heartbeat; b is silent
    now[0] += LIVE_S / 2 + 1
    assert view.slots() == 256
    view._apply(_entry("executors.a", b""))  # a stopped
    assert view.slots() is None


def test_an_entry_without_slots_counts_as_the_default_concurrency_and_is_no_handler():
    view, _ = _view()
    view._apply(_entry("executors.old", b"{}"))
    view._apply(_entry("executors.odd", b"not json"))
    assert view.slots() == 2 * DEFAULT_SLOTS
    view._apply(_entry("6e6f6f70", b"noop"))
    assert view.unknown(["noop", "executors.old"]) == {1: view.unknown(["executors.old"])[0]}


def test_an_entry_put_long_before_the_coordinator_started_is_an_executor_gone():
    view, _ = _view()
    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    view._apply(_entry("executors.gone", orjson.dumps({"slots": 256}), created=long_ago))
    assert view.slots() is None


def test_a_handler_last_offered_more_than_a_week_ago_is_unknown_to_a_long_lived_coordinator():
    """The bucket's TTL forgets such a name, but a watcher is not told: a coordinator up
    since kept admitting it, and its files ended ERROR ("unknown handler")."""
    from shared.handler_offers import TTL_S

    view, _ = _view()
    now = datetime.datetime.now(datetime.timezone.utc)
    view._apply(_entry("noop".encode().hex(), b"noop", created=now))
    view._apply(_entry("ocr".encode().hex(), b"ocr", created=now - datetime.timedelta(seconds=TTL_S + 60)))
    assert list(view.unknown(["noop", "ocr"])) == [1]
