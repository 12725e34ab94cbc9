"""What the executor remembers of the deliveries it lived through (services/executor/seen.py)."""

from __future__ import annotations

from types import SimpleNamespace

from services.executor.seen import SeenDeliveries, delivery_and_message


def msg(reply: str | None):
    return SimpleNamespace(reply=reply)


def test_the_ack_subject_names_the_delivery_and_the_message_in_both_formats():
    v1 = "$JS.ACK.JOBS.executor.3.41.97.1795984717604403616.12"
    v2 = "$JS.ACK.hub.ACCHASH.JOBS.executor.3.41.97.1795984717604403616.12.rnd"
    assert delivery_and_message(msg(v1)) == (3, (41, 1795984717604403616))
    assert delivery_and_message(msg(v2)) == (3, (41, 1795984717604403616))
    assert delivery_and_message(msg("_INBOX.x")) == (1, None)
    assert delivery_and_message(msg(None)) == (1, None)


def test_only_the_delivery_just_before_counts_and_finished_is_kept_for_that_delivery():
    seen = SeenDeliveries()
    m = (41, 1)
    assert seen.previous(m, 2) == (False, False)
    seen.saw(m, 1, finished=True)
    seen.saw(m, 1)  # the handler's finally, after the finish: still finished
    assert seen.previous(m, 2) == (True, True)
    assert seen.previous(m, 3) == (False, False)  # delivery 2 was not seen here: maybe it killed an executor
    assert seen.previous((41, 2), 2) == (False, False)  # another message (a stream made again)
    seen.saw(m, 2)
    assert seen.previous(m, 3) == (True, False)
    assert seen.previous(None, 2) == (False, False)


def test_the_oldest_are_forgotten_past_the_limit():
    seen = SeenDeliveries(limit=2)
    for sequence in (1, 2, 3):
        seen.saw((sequence, 0), 1, finished=True)
    assert [seen.previous((s, 0), 2)[0] for s in (1, 2, 3)] == [False, True, True]


def test_an_older_delivery_ending_after_a_newer_one_does_not_hide_it():
    # Delivery 2 ran here and finished while delivery 1 (overtaken, a frozen moment) was
    # still at its step; 1 ends after it. Delivery 3 must still find 2 finished: ack again.
    seen = SeenDeliveries()
    m = (41, 1)
    seen.saw(m, 2, finished=True)
    seen.saw(m, 1)
    assert seen.previous(m, 3) == (True, True)
