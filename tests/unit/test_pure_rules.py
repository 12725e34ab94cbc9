"""Pure rules: backoff bounds, breaker state machine, error classification, credit splits."""

import random

from services.billing.rules import split_charge, split_refund
from shared import breaker
from shared.backoff import RETRY_AFTER_CEILING_S, backoff_delay_ms, parse_retry_after
from shared.errors import PermanentError, TransientError, classify


def test_backoff_is_full_jitter_within_exponential_bounds():
    rng = random.Random(1)
    for attempt in range(1, 8):
        ceiling = min(30_000, 500 * 2 ** (attempt - 1))
        delays = [backoff_delay_ms(attempt, base_ms=500, max_ms=30_000, rng=rng) for _ in range(200)]
        assert 0 <= min(delays) and max(delays) <= ceiling and max(delays) > ceiling / 2


def test_retry_after_wins_when_longer_even_past_the_tenants_maximum_up_to_an_hour():
    assert backoff_delay_ms(1, base_ms=10, max_ms=5000, jitter=False, retry_after_s=3) == 3000
    # The dependency knows when it will be ready: retrying at max_ms would only meet another 429.
    assert backoff_delay_ms(1, base_ms=10, max_ms=5000, jitter=False, retry_after_s=45) == 45_000
    assert backoff_delay_ms(1, base_ms=10, max_ms=5000, retry_after_s=86_400) == RETRY_AFTER_CEILING_S * 1000
    # Shorter than our own schedule: ours stands.
    assert backoff_delay_ms(4, base_ms=1000, max_ms=60_000, jitter=False, retry_after_s=1) == 8000


def test_retry_after_is_read_in_seconds_or_as_an_http_date():
    now = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after("120") == 120.0 and parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:29:30 GMT", now=now) == 90.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now=now) == 0.0  # past: at once
    assert parse_retry_after("Wed Oct 21 07:29:30 2015", now=now) == 90.0  # asctime form: GMT too
    assert parse_retry_after("Wed, 21 Oct 2015 07:29:30 -0000", now=now) == 90.0
    for unusable in (None, "", "  ", "nan", "inf", "-1", "soon", "Wed, 99 Foo 2015"):
        assert parse_retry_after(unusable, now=now) is None, unusable


def test_breaker_opens_after_threshold_half_opens_and_closes():
    s = breaker.BreakerState()
    for _ in range(2):
        s = breaker.on_failure(s, now=100, threshold=3, reset_s=10)
    assert s.state == "closed" and breaker.admit(s, 100).verdict == "run"
    s = breaker.on_failure(s, now=100, threshold=3, reset_s=10)
    assert s.state == "open" and breaker.admit(s, 105).verdict == "defer"
    assert breaker.admit(s, 105).delay_s == 5
    # Shown to operators as half-open once its reset time has passed, before any probe.
    assert (breaker.shown_state(s, 105), breaker.shown_state(s, 110)) == ("open", "half_open")
    assert breaker.admit(s, 110).verdict == "probe"
    probing = breaker.claim_probe(s, 110)
    assert probing.state == "half_open" and breaker.admit(probing, 111).verdict == "defer"
    assert breaker.on_failure(probing, now=111, threshold=3, reset_s=10).state == "open"
    assert breaker.on_success(probing).state == "closed"
    assert breaker.on_success(breaker.BreakerState()) is None


def test_classification():
    assert classify(TransientError("x")).transient
    assert not classify(PermanentError("x")).transient
    assert classify(TimeoutError()).transient and classify(ConnectionResetError()).transient
    assert not classify(ValueError("bug")).transient

    class Http(Exception):
        def __init__(self, status):
            self.status = status

    assert classify(Http(429)).transient and classify(Http(503)).transient
    assert not classify(Http(404)).transient

    class Pg(Exception):
        def __init__(self, sqlstate):
            self.sqlstate = sqlstate

    assert classify(Pg("40001")).transient and classify(Pg("08006")).transient and classify(Pg("57P01")).transient
    assert not classify(Pg("23505")).transient


def test_credit_splits():
    assert split_charge(5, 3, 10) == (3, 2)
    assert split_charge(14, 3, 10) is None
    assert split_refund(4, charged_monthly=3, charged_purchased=2, refunded_monthly=0, refunded_purchased=0) == (2, 2)
    assert split_refund(99, 3, 2, 1, 2) == (2, 0)


def test_an_expansion_sends_a_small_first_page_then_full_pages():
    from services.coordinator.outbox import FIRST_PAGE, page_size

    assert page_size({"after_idx": -1}, 2000) == FIRST_PAGE < 2000  # a new round's first jobs go out at once
    assert page_size({"after_idx": FIRST_PAGE - 1}, 2000) == 2000
    assert page_size({"after_idx": -1}, 40) == 40  # never more than a page


def test_a_probe_lease_is_renewed_only_for_its_own_open_period_while_half_open():
    probing = breaker.BreakerState("half_open", 3, opened_at=100.0, next_probe_at=160.0)
    assert breaker.renew_probe(probing, 150.0, opened_at=100.0).next_probe_at == 150.0 + breaker.PROBE_LEASE_S
    # Another period's probe (opened again, then claimed by another executor): not ours to keep.
    assert breaker.renew_probe(probing, 150.0, opened_at=90.0) is None
    assert breaker.renew_probe(breaker.BreakerState("open", 3, 100.0, 200.0), 150.0, opened_at=100.0) is None
    assert breaker.renew_probe(breaker.BreakerState(), 150.0, opened_at=100.0) is None  # closed


def test_a_probe_given_back_unanswered_lets_the_next_job_probe_at_once():
    probing = breaker.claim_probe(breaker.BreakerState("open", 3, 100.0, 130.0), 140.0)
    released = breaker.release_probe(probing, 150.0, opened_at=100.0)
    assert released.state == "half_open" and breaker.admit(released, 150.0).verdict == "probe"
    assert breaker.release_probe(probing, 150.0, opened_at=90.0) is None  # another open period's probe
    assert breaker.release_probe(breaker.BreakerState(), 150.0, opened_at=100.0) is None  # closed meanwhile
