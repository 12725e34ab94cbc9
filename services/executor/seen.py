"""Deliveries this executor process saw through, so that it can tell a job that comes back
because an ack was lost from one that may have killed an executor.

A job redelivered for no reason the progress store knows was in flight when an executor
died; at the second such delivery it is a suspect (job_runner): it runs alone
(isolation.py), and the worker fetches nothing beside it. That is right after crashes, and
wrong after a NATS node failover or a dropped connection, when every job in flight comes
back although this process ran each of them and lived: the acks were lost, not the
executor. So, when the delivery before this one was seen through here:

* it is no suspect;
* if it finished (its terminal event published and its PubAck received before the ack
  was sent), the result is stored: ack again and run nothing.

Keyed by the message's stream sequence and timestamp (the executor reads one stream; the
timestamp tells a message apart from one of a stream made again, whose sequences start
over), not by the job id: a copy re-published by recovery is another message, with
deliveries of its own. Bounded, oldest forgotten first: a forgotten one is judged on its
unexplained deliveries (maybe a suspect), which costs time, never a result.
"""

from __future__ import annotations

from collections import OrderedDict

from nats.aio.msg import Msg

Message = tuple[int, int]  # (stream sequence, stream timestamp in ns)

# ~200 bytes each. Enough for the jobs in flight when a connection drops to still be
# known when they come back after the ack wait, unless they are fast ones (then running
# them one at a time costs little).
LIMIT = 20_000


def delivery_and_message(msg: Msg) -> tuple[int, Message | None]:
    """How many times JetStream has delivered this message, and which message it is, read
    straight from the ack subject (``msg.metadata`` parses it all into objects, per job):
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (9 tokens), or
    with a domain and account hash after ACK on newer servers (and maybe a token at the
    end). (1, None) when not from JetStream."""
    if not msg.reply or not msg.reply.startswith("$JS.ACK."):
        return 1, None
    tokens = msg.reply.split(".")
    first = 4 if len(tokens) == 9 else 6
    return int(tokens[first]), (int(tokens[first + 1]), int(tokens[first + 3]))


class SeenDeliveries:
    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        # message -> 2 × the latest delivery seen through here, + 1 if it finished
        self._seen: OrderedDict[Message, int] = OrderedDict()

    def previous(self, message: Message | None, delivered: int) -> tuple[bool, bool]:
        """(seen, finished): whether the delivery just before ``delivered`` was seen through
        here, and whether it finished."""
        seen = self._seen.get(message) if message is not None else None
        if seen is None or seen >> 1 != delivered - 1:
            return False, False
        return True, bool(seen & 1)

    def saw(self, message: Message | None, delivered: int, *, finished: bool = False) -> None:
        """This process came through ``delivered`` alive (``finished``: its result stored)."""
        if message is None:
            return
        known = self._seen.get(message)
        if known is not None and known >> 1 > delivered:
            return  # a later delivery finished first (this one was overtaken): it is what counts
        if known is not None and known >> 1 == delivered:
            if known & 1 or not finished:
                return  # already known as much (the handler's finally, after the finish)
            finished = True
        self._seen.pop(message, None)  # to the end: the newest are kept
        self._seen[message] = delivered << 1 | finished
        if len(self._seen) > self._limit:
            self._seen.popitem(last=False)
