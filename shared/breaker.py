"""Circuit breaker state machine (pure): closed → open after ``threshold`` consecutive
failures → half-open after ``reset_s`` (one probe) → closed on success, open on failure.

Where the state lives (a JetStream KV bucket shared by all executors) is the executor's
business; this module only decides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

State = Literal["closed", "open", "half_open"]

# How long a half-open probe may take before another executor may probe again.
PROBE_LEASE_S = 60.0


@dataclass(slots=True)
class BreakerState:
    state: State = "closed"
    failures: int = 0
    opened_at: float | None = None
    next_probe_at: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BreakerState":
        return cls(**{k: data.get(k) for k in ("state", "failures", "opened_at", "next_probe_at") if k in data})


@dataclass(frozen=True, slots=True)
class Admission:
    """``run``: go ahead; ``probe``: go ahead as the half-open probe (claim it first);
    ``defer``: do not call the dependency, come back after ``delay_s``."""

    verdict: Literal["run", "probe", "defer"]
    delay_s: float = 0.0
    opened_at: float | None = None  # of the open period a deferral belongs to


def admit(s: BreakerState, now: float) -> Admission:
    if s.state == "closed":
        return Admission("run")
    if s.next_probe_at is not None and now >= s.next_probe_at:
        return Admission("probe", opened_at=s.opened_at)
    return Admission("defer", max(0.05, (s.next_probe_at or now) - now), s.opened_at)


def shown_state(s: BreakerState, now: float) -> State:
    """The state as operators should see it: an open breaker whose reset time has passed is
    half-open (the next call is its probe), though nothing is written until a job claims
    the probe."""
    return "half_open" if s.state == "open" and s.next_probe_at is not None and now >= s.next_probe_at else s.state


def claim_probe(s: BreakerState, now: float) -> BreakerState:
    return BreakerState("half_open", s.failures, s.opened_at, now + PROBE_LEASE_S)


def renew_probe(s: BreakerState, now: float, opened_at: float | None) -> BreakerState | None:
    """The probe's lease, again from now, while it runs; None once it ended (closed, opened
    again), and for another open period's probe, which is not the caller's to keep."""
    if s.state != "half_open" or s.opened_at != opened_at:
        return None
    return BreakerState("half_open", s.failures, s.opened_at, now + PROBE_LEASE_S)


def release_probe(s: BreakerState, now: float, opened_at: float | None) -> BreakerState | None:
    """A probe that ended with no verdict (its run was stopped mid-step): the dependency
    told nothing, so the next job probes at once instead of after the lease. None when the
    probe is not the caller's to give back (as renew_probe)."""
    if s.state != "half_open" or s.opened_at != opened_at:
        return None
    return BreakerState("half_open", s.failures, s.opened_at, now)


def on_success(s: BreakerState) -> BreakerState | None:
    """The new state, or None when nothing changes (the common, write-free case)."""
    if s.state == "closed" and s.failures == 0:
        return None
    return BreakerState()


def on_failure(s: BreakerState, now: float, threshold: int, reset_s: float) -> BreakerState:
    failures = s.failures + 1
    if s.state == "half_open" or (s.state == "closed" and failures >= threshold):
        return BreakerState("open", failures, now, now + reset_s)
    if s.state == "open":
        return BreakerState("open", failures, s.opened_at, s.next_probe_at)
    return BreakerState("closed", failures, None, None)
