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


def test_a_handler_an_executor_lacks_is_offered_by_another_alive_or_within_the_week_or_nowhere():
    """Where a job whose handler this executor lacks should go: to another executor alive
    that has it (at once), to one that offered it within the week (a pool scaled to zero, or
    deployed without it: the job waits for it rather than ending ERROR), or nowhere."""
    view, now = _view()
    for name in ("noop", "ocr"):  # the week's names
        view._apply(_entry(name.encode().hex(), name.encode()))
    view._apply(_entry("executors.me", orjson.dumps({"slots": 8, "handlers": ["noop"]})))
    assert view.where_offered("ocr", "executors.me") == "week"
    assert view.unknown(["noop", "ocr"]) == {}  # work for it is admitted: it waits
    view._apply(_entry("executors.gpu", orjson.dumps({"slots": 8, "handlers": ["noop", "ocr"]})))
    assert view.where_offered("ocr", "executors.me") == "alive"
    assert view.where_offered("ocr", "executors.gpu") == "week"  # not itself
    now[0] += LIVE_S + 1  # the gpu pool fell silent (scaled to zero)
    view._apply(_entry("executors.me", orjson.dumps({"slots": 8, "handlers": ["noop"]})))
    assert view.where_offered("ocr", "executors.me") == "week"
    assert view.where_offered("pdf", "executors.me") is None and list(view.unknown(["pdf"])) == [0]
