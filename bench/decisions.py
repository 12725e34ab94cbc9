"""Retry decision and breaker check latency (issue targets: p99 < 1 ms and < 50 µs).

    python -m bench.decisions
"""

from __future__ import annotations

import time

from shared.breaker import BreakerState
from shared.errors import TransientError, classify
from shared.messages import FileSpec, Job, RetryPolicy, StepSpec
from services.executor.steps import retry_decision

N = 200_000


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    samples_ns.sort()
    return samples_ns[len(samples_ns) // 2] / 1000, samples_ns[int(len(samples_ns) * 0.99)] / 1000


def bench_retry_decision() -> tuple[float, float]:
    job = Job(job_id="r:file:0:r0", run_id="r", tenant_id="t", template_id="x", round=0, file_index=0,
              files=[FileSpec(index=0, name="a")], steps=[StepSpec(name="s", handler="noop")],
              retry=RetryPolicy(auto_retries=5), idempotency_key="k")
    error = TransientError("HTTP 503", retry_after_s=None)
    samples = []
    clock = time.perf_counter_ns
    for i in range(N):
        t = clock()
        retry_decision(classify(error), i % 7 + 1, job, 0)  # classification included
        samples.append(clock() - t)
    return _percentiles(samples)


def bench_breaker_check() -> tuple[float, float]:
    class _NoKV:  # the check reads only the local copy the KV watcher keeps fresh
        pass

    from services.executor.breakers import BreakerBoard, _key
    from shared.subjects import Names

    board = BreakerBoard(_NoKV(), Names())
    board._local[_key("t", "api.example.com")] = (BreakerState("open", 5, time.time(), time.time() + 30), "t",
                                                  "api.example.com")
    samples = []
    clock = time.perf_counter_ns
    for i in range(N):
        dependency = "api.example.com" if i % 2 else "other.example.com"
        t = clock()
        board.admit("t", dependency)
        samples.append(clock() - t)
    return _percentiles(samples)


def main() -> None:
    p50, p99 = bench_retry_decision()
    print(f"retry decision (classify + backoff): p50 {p50:.2f} us, p99 {p99:.2f} us   (target p99 < 1000 us)")
    p50, p99 = bench_breaker_check()
    print(f"breaker check:                       p50 {p50:.2f} us, p99 {p99:.2f} us   (target p99 < 50 us)")


if __name__ == "__main__":
    main()
