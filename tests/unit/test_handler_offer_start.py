"""An executor's first handler offer survives a bucket that cannot answer for a moment (a
cluster electing its leader), and gives up after a bound (shared/handler_offers.py)."""

from __future__ import annotations

import pytest
from nats.js.errors import NoStreamResponseError

from shared.handler_offers import put_until_answered


class _Bucket:
    """Refuses the first ``unanswered`` puts as a stream without a leader does."""

    def __init__(self, unanswered: int) -> None:
        self.unanswered, self.puts, self.tries = unanswered, [], 0

    async def put(self, key: str, value: bytes) -> None:
        self.tries += 1
        if self.tries <= self.unanswered:
            raise NoStreamResponseError
        self.puts.append((key, value))


async def _offer(kv: _Bucket) -> None:
    await kv.put("6e6f6f70", b"noop")


async def test_the_put_is_tried_again_until_the_stream_answers():
    kv = _Bucket(unanswered=3)
    await put_until_answered(_offer, kv, delay_s=0)
    assert (kv.tries, kv.puts) == (4, [("6e6f6f70", b"noop")])


async def test_a_stream_that_never_answers_is_an_error_after_the_bound():
    kv = _Bucket(unanswered=100)
    with pytest.raises(NoStreamResponseError):
        await put_until_answered(_offer, kv, attempts=5, delay_s=0)
    assert (kv.tries, kv.puts) == (5, [])


async def test_other_errors_are_not_retried():
    class Broken(_Bucket):
        async def put(self, key, value):
            self.tries += 1
            raise ValueError("not a bucket problem")

    kv = Broken(unanswered=0)
    with pytest.raises(ValueError):
        await put_until_answered(_offer, kv, delay_s=0)
    assert kv.tries == 1
