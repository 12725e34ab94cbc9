"""Per-job progress that must survive a redelivery: failed attempts (each step's retry
budget), breaker deferrals (which must not spend it), and the last completed step with its
output (so a redelivered job resumes after its checkpoint instead of redoing steps).

Kept in a JetStream KV bucket and touched only off the fast path: a first delivery of a
single-step per_file job that succeeds never reads or writes it. (A batch job's delivery
claims the batch in it: one write per batch job.)"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from collections.abc import Callable
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyValueError, KeyWrongLastSequenceError

from shared.kv import ensure_kv
from shared.subjects import Names

_KEY_SAFE = re.compile(r"[^-/_=.a-zA-Z0-9]")
TTL_S = 8 * 24 * 3600  # longer than any job can live in the stream


@dataclass
class Progress:
    failures: int = 0  # every failed attempt of the job, all steps together
    deferrals: int = 0
    step: int | None = None  # last completed step
    output: dict[str, Any] | None = None
    # ``failures`` when ``step`` was checkpointed: the retry budget is per step, so the
    # current step's attempts count from here. A base rather than a count reset at each
    # checkpoint, because ``failures`` must stay whole: it also counts the deliveries we
    # caused (``explained``, ``offset``), and the store merges it by max. A record written
    # before this field loads with 0 (the whole job's failures count, as they used to).
    failures_before_step: int = 0
    done: bool = False  # batch mode: this file's terminal event was published
    # Set when the job message was re-published to reset its delivery count (see
    # job_runner): the explained deliveries up to then, and when it may run again.
    offset: int = 0
    not_before: float | None = None
    # The delivery that checkpointed ``step`` (job_runner's ``writer``): another delivery
    # finding a step this far written by someone else knows it was overtaken.
    writer: str | None = None
    # The delivery that finished the job (its terminal event stored), written when the job
    # had its progress read anyway (more than one step, or a redelivery): another delivery
    # of the same message (a lost ack, or one held by a frozen executor) acks it again
    # instead of running its last step a second time.
    finished_by: str | None = None

    @property
    def attempt(self) -> int:
        """The 1-based number of the current step's next attempt (retry_decision's ``attempt``)."""
        return self.failures - self.failures_before_step + 1

    @property
    def explained(self) -> int:
        """Deliveries of the current message that we caused (retries, deferrals)."""
        return self.failures + self.deferrals - self.offset


_FIELDS = set(Progress.__dataclass_fields__)


def progress_key(job_id: str, file_index: int) -> str:
    return _KEY_SAFE.sub("_", f"{job_id}.f{file_index}".replace(":", "."))


class ProgressStore:
    def __init__(self, js: JetStreamContext, names: Names, replicas: int = 1) -> None:
        self._js = js
        self._names = names
        self._replicas = replicas
        self._kv = None

    async def start(self) -> None:
        self._kv = await ensure_kv(
            self._js,
            KeyValueConfig(bucket=self._names.attempts_bucket, history=1, ttl=TTL_S, storage=StorageType.FILE,
                           replicas=self._replicas)
        )

    async def get(self, job_id: str, file_index: int) -> Progress:
        try:
            entry = await self._kv.get(progress_key(job_id, file_index))
        except KeyNotFoundError:
            return Progress()
        data = orjson.loads(entry.value)
        return Progress(**{k: v for k, v in data.items() if k in _FIELDS})

    async def put(self, job_id: str, file_index: int, progress: Progress, *,
                  unless_overtaken: bool = False) -> str | None:
        """Write ``progress``, merged with what is stored (compare-and-set on the entry's
        revision): two deliveries of one job may run at once (a late ack, a frozen executor
        whose job went elsewhere), and the slower one must not put back an older checkpoint
        or a smaller retry count. With ``unless_overtaken`` (a checkpoint), write nothing and
        return the name of the other writer that has checkpointed this step or a later one:
        the caller's delivery is stale and must stop before its next step. None: written."""
        key = progress_key(job_id, file_index)
        for _ in range(10):
            try:
                entry = await self._kv.get(key)
                current, revision = Progress(**{k: v for k, v in orjson.loads(entry.value).items() if k in _FIELDS}), entry.revision
            except KeyNotFoundError:
                current, revision = None, None
            if unless_overtaken and current and overtaken(current, progress):
                return current.writer
            merged = _merge(current, progress) if current else progress
            try:
                if revision is None:
                    await self._kv.create(key, orjson.dumps(asdict(merged)))
                else:
                    await self._kv.update(key, orjson.dumps(asdict(merged)), last=revision)
                return None
            except (KeyWrongLastSequenceError, KeyValueError):
                continue  # changed under us: merge again
        await self._kv.put(key, orjson.dumps(asdict(progress)))
        return None


    async def claim_batch(self, job_id: str, delivery: str, later: Callable[[str | None, str], bool]) -> bool:
        """Name ``delivery`` the one running this batch job now (a redelivery takes it over),
        unless a ``later`` delivery has claimed it already: then False, and this one is stale.
        Compare-and-set: a delivery that claims late must not take the batch back."""
        key = progress_key(job_id, -1)
        for _ in range(10):
            try:
                entry = await self._kv.get(key)
                current, revision = entry.value.decode(), entry.revision
            except KeyNotFoundError:
                current, revision = None, None
            if later(current, delivery):
                return False
            try:
                if revision is None:
                    await self._kv.create(key, delivery.encode())
                else:
                    await self._kv.update(key, delivery.encode(), last=revision)
                return True
            except (KeyWrongLastSequenceError, KeyValueError):
                continue  # claimed meanwhile: look again
        return True  # contended this long: run (at worst beside another, as before claims)

    async def batch_claimed_by(self, job_id: str) -> str | None:
        try:
            return (await self._kv.get(progress_key(job_id, -1))).value.decode()
        except KeyNotFoundError:
            return None


def overtaken(stored: Progress, new: Progress) -> bool:
    """Whether another delivery has checkpointed ``new.step`` or a later step already."""
    return (stored.step is not None and new.step is not None and stored.step >= new.step
            and stored.writer is not None and stored.writer != new.writer)


def _merge(stored: Progress, new: Progress) -> Progress:
    newer_step = new.step if (stored.step is None or (new.step is not None and new.step >= stored.step)) else stored.step
    output = new.output if newer_step == new.step else stored.output
    # The base belongs to its checkpoint: it goes with the newer step (the later of two at the same step).
    if new.step == stored.step:
        base = max(stored.failures_before_step, new.failures_before_step)
    else:
        base = new.failures_before_step if newer_step == new.step else stored.failures_before_step
    return Progress(
        failures=max(stored.failures, new.failures), deferrals=max(stored.deferrals, new.deferrals), step=newer_step,
        output=output, done=stored.done or new.done, offset=max(stored.offset, new.offset),
        not_before=new.not_before if new.offset >= stored.offset else stored.not_before,
        failures_before_step=base, finished_by=stored.finished_by or new.finished_by,
        # Goes with its checkpoint: the newer step's, or the one stored for the same step.
        writer=(new.writer if newer_step == new.step and (new.step != stored.step or stored.writer is None)
                else stored.writer),
    )
