"""One delivery of a job message: how many times JetStream has delivered it, its name
across executors, and how many unexplained deliveries make it a suspect.

Suspects: a delivery we cannot explain (not a retry or deferral of ours, nor after a
delivery this process lived through: seen.py) means the job was in flight when an executor
died. One such delivery is the common crash (a deploy's kill, an OOM, a node lost): every
job in flight comes back once, and they run again side by side. A job in flight at a second
death (``SUSPECT_AFTER``) is a suspect: maybe it is what kills them. It runs alone
(isolation.py) and the worker fetches nothing beside it (worker.py), so a poison job costs
the jobs beside it at most two deliveries (one per death) and then dies alone until max
deliver fails it.
"""

from __future__ import annotations

import uuid

from nats.aio.msg import Msg

from services.executor.seen import Message, delivery_and_message

# Unexplained deliveries (deaths it was in flight at) that make a job a suspect.
SUSPECT_AFTER = 2
# This process, in the name of each delivery that writes a checkpoint (Progress.writer).
_PROCESS = uuid.uuid4().hex[:12]


def delivery_name(message: Message | None, delivered: int) -> str:
    """Names one delivery of one message, across executors: a checkpoint found written by
    another name for this step or a later one means this delivery was overtaken."""
    # The message by its stream sequence and timestamp (seen.py: a stream made again starts
    # its sequences over), so that a name never matches another message's.
    return f"{_PROCESS}/{f'{message[0]}-{message[1]}' if message else '-'}/{delivered}"


def same_message(name: str, other: str) -> bool:
    """Whether two delivery names are of one message (else one is a copy: re-published by
    a recovery or to reset its delivery count, carrying the same job)."""
    return _one_message(name.split("/")[1], other.split("/")[1])


def _one_message(a: str, b: str) -> bool:
    """Two names' message parts name one message: ``<seq>-<ts>`` each, or, with a name
    written before names carried the timestamp (``<seq>``: progress records live 8 days),
    the same sequence."""
    if a == "-" or b == "-":
        return False
    if "-" in a and "-" in b:
        return a == b
    return a.split("-")[0] == b.split("-")[0]


def later_delivery(name: str | None, mine: str) -> bool:
    """Whether ``name`` is a later delivery of the same message as ``mine``: the server gave
    the message out again after this delivery (its ack wait passed while it waited in a
    frozen or stalled process), so this one is stale and the job is that one's.

    (A consumer whose state the server lost, or that an operator made again, counts
    deliveries from 1 again: its deliveries up to the one named are then taken for stale,
    and run once the ack wait has brought the message back that often. Slower, never twice.)"""
    if not name:
        return False
    _, message, delivered = name.split("/")
    _, my_message, my_delivered = mine.split("/")
    return _one_message(message, my_message) and int(delivered) > int(my_delivered)


def newer_copy(name: str | None, mine: str) -> bool:
    """Whether ``name`` is a delivery of another message carrying the same job, published
    after ``mine``'s (a recovery's or a restore's copy): the job is that copy's now, and
    ``mine``'s message is done with. Judged by the messages' timestamps (by the sequence for
    a name written before names carried one)."""
    if not name:
        return False
    message, my_message = name.split("/")[1], mine.split("/")[1]
    if message == "-" or my_message == "-" or _one_message(message, my_message):
        return False
    if "-" in message and "-" in my_message:
        return int(message.split("-")[1]) > int(my_message.split("-")[1])
    return int(message.split("-")[0]) > int(my_message.split("-")[0])


def batch_taken(name: str | None, mine: str) -> bool:
    """Whether the batch claimed by ``name`` is not ``mine``'s to run: a later delivery of
    my message has it (it acks), or a newer copy of the job does (then I ack mine)."""
    return later_delivery(name, mine) or newer_copy(name, mine)


def suspect_after(max_deliver: int) -> int:
    """SUSPECT_AFTER, but below max deliver: with a max deliver of 2 the second delivery is
    the last, and the jobs beside a poison job would spend it with it."""
    return max(1, min(SUSPECT_AFTER, max_deliver - 1))


def deliveries(msg: Msg) -> int:
    """How many times JetStream has delivered this message (1 when not from JetStream)."""
    return delivery_and_message(msg)[0]
