"""Turning files that need work into job messages: as outbox rows, or (a run's first
publication) as one expansion row that the relay turns into jobs a page at a time.

Jobs are built as plain dicts and serialised once with orjson. tests/unit/test_wire.py
checks that what is built here parses as :class:`shared.messages.Job`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.bus import Outgoing, headers_for
from shared.tracing import run_trace_id
from shared.messages import RetryPolicy, StepSpec, job_id_for
from shared.subjects import Names
from services.coordinator import outbox

_FILE_FIELDS = ("url", "content_b64", "size", "sha256")


def file_spec(f: Mapping[str, Any]) -> dict[str, Any]:
    spec = {"index": f["idx"], "name": f["name"]}
    for field in _FILE_FIELDS:
        if f.get(field) is not None:
            spec[field] = f[field]
    checkpoint = f.get("checkpoint_step")
    # Resume after the last completed step, with its output: never redo a step.
    spec["start_step"] = 0 if checkpoint is None else checkpoint + 1
    if f.get("checkpoint_output") is not None:
        spec["previous_output"] = f["checkpoint_output"]
    return spec


def job_messages(
    names: Names,
    run: Mapping[str, Any],
    template: Mapping[str, Any],
    files: Iterable[Mapping[str, Any]],
    policy: RetryPolicy,
    *,
    msg_suffix: str = "",
) -> list[Outgoing]:
    """Job messages for the given files of ``run`` in its current round.

    ``msg_suffix`` is empty for a round's first publication (so a repeated publish is
    deduped by JetStream); recovery adds one because the original message may be long gone
    (acked or terminated) while the dedupe window still remembers its id.
    """
    files = list(files)
    specs = [file_spec(f) for f in files]
    if not specs:
        return []
    common = {
        "v": 1, "run_id": run["id"], "tenant_id": run["tenant_id"], "template_id": run["template_id"],
        "mode": run["mode"], "round": run["round"], "generation": run.get("generation", 0),
        "steps": [StepSpec.model_validate(s).model_dump(exclude_none=True) for s in template["steps"]],
        "retry": policy.model_dump(),
    }
    subject = names.job(run["tenant_id"])
    trace_id = run_trace_id(run["id"], run.get("trace_id"))
    if run["mode"] == "batch":
        job_id = job_id_for(run["id"], None, run["round"])
        body = orjson.dumps({**common, "job_id": job_id, "start_step": 0, "files": specs, "idempotency_key": job_id})
        return [Outgoing(subject, body, job_id + msg_suffix, headers_for(job_id, run["tenant_id"], run["id"], trace_id))]
    # The run's part of every job is serialised once: a job is that head and its own fields
    # (one JSON object, keys disjoint), which costs a third of building each whole.
    # A file's job carries the file's own round, not the run's: a single-file retry or restore
    # moves the run to a new round while other files are still PENDING in an earlier one, and
    # a re-published job of such a file must match its round or its results are ignored.
    heads = {run["round"]: orjson.dumps(common)[:-1] + b","}
    messages = []
    for f, spec in zip(files, specs):
        round_ = f.get("round", run["round"])
        if round_ not in heads:
            heads[round_] = orjson.dumps({**common, "round": round_})[:-1] + b","
        head = heads[round_]
        job_id = job_id_for(run["id"], spec["index"], round_)
        own = orjson.dumps({"job_id": job_id, "file_index": spec["index"], "start_step": spec["start_step"],
                            "file": spec, "idempotency_key": job_id})
        messages.append(Outgoing(subject, head + own[1:], job_id + msg_suffix,
                                 headers_for(job_id, run["tenant_id"], run["id"], trace_id)))
    return messages


def job_rows(names: Names, run: Mapping[str, Any], template: Mapping[str, Any], files: Iterable[Mapping[str, Any]],
             policy: RetryPolicy, *, msg_suffix: str = "") -> list[dict]:
    """:func:`job_messages` as outbox rows, written in the caller's transaction."""
    return [outbox.row(m.subject, m.msg_id, m.data, m.headers)
            for m in job_messages(names, run, template, files, policy, msg_suffix=msg_suffix)]


# ---- expansions: an outbox row that stands for all of a round's jobs -------------------------

def expansion_row(names: Names, run: Mapping[str, Any], policy: RetryPolicy, *, count: int,
                  rounds: tuple[int, int] | None = None, msg_suffix: str = "") -> dict:
    """One outbox row for the ``count`` PENDING files of ``run`` (per_file mode) in its
    current round, or in ``rounds`` (first, last): the relay builds their jobs a page at a
    time (:func:`expand_page`). ``msg_suffix`` as for :func:`job_messages`."""
    first, last = rounds if rounds is not None else (run["round"], run["round"])
    spec = {"run_id": run["id"], "round": last, "first_round": first, "policy": policy.model_dump(), "after_idx": -1,
            "published": 0, "count": count, "msg_suffix": msg_suffix}
    row = outbox.row(names.job(run["tenant_id"]), f"{run['id']}:jobs:r{last}{msg_suffix}", b"")
    row["expand"] = orjson.dumps(spec).decode()
    return row


def pending_rows(names: Names, run: Mapping[str, Any], template: Mapping[str, Any], files: list[Mapping[str, Any]],
                 policy: RetryPolicy, *, rounds: tuple[int, int], msg_suffix: str) -> list[dict]:
    """Jobs for ``files``, the PENDING files of ``run`` in ``rounds``: those Continue reopened,
    or those whose jobs may be lost or were stopped (recovery, a FAILED run reopened).
    per_file, one expansion row, so that they go out within the tenant's window (a stuck run
    of 100,000 files re-published at once would bury every other tenant's jobs); batch,
    the one job."""
    if run["mode"] == "batch" or not files:
        return job_rows(names, run, template, files, policy, msg_suffix=msg_suffix)
    return [expansion_row(names, run, policy, count=len(files), rounds=rounds, msg_suffix=msg_suffix)]


class Page(NamedTuple):
    """An expansion's next jobs, and its spec to go on with (None: the expansion is done).
    ``waiting``: nothing built, because the run's tenant has its window of jobs out already
    (see :func:`room`); the expansion stays as it was."""

    messages: list[Outgoing]
    next_spec: dict[str, Any] | None
    waiting: bool = False


def _published(spec: Mapping[str, Any]) -> int:
    # Rows from before ``published`` was kept: the index reached stands in (indexes run 0..n-1).
    return spec.get("published", spec["after_idx"] + 1)


# A tenant's jobs out (published, not yet SUCCEEDED, FAILED or ERROR), estimated from below:
# the pending files of its RUNNING per_file runs (a batch run's files are one job), less
# those its expansions have not published yet (``count − published`` each; rows from
# before those were kept: the run's total and the index reached). Files an operator
# skipped or cancelled before their job went out make it an underestimate, never an
# overestimate: the window can let a few too many out, but it never waits for jobs that do
# not exist.
# Runs flagged ``breaker_open`` do not count: their jobs out wait for a dependency, deferred
# by the executors (nak'd with a delay, not at the head of the queue), and counted they held
# the window until the breaker closed, so that none of the tenant's other runs started
# (a soak test: a 10-file run waited 4 minutes). Such a run publishes no more of its jobs
# until it progresses again (expand_page), which clears the flag.
_NOT_WAITING_ON_A_BREAKER = "attention_reason IS DISTINCT FROM 'breaker_open'"
_TENANT_OUT = text(
    "SELECT (SELECT coalesce(sum(pending), 0) FROM coordinator.runs "
    "        WHERE tenant_id = :t AND status = 'RUNNING' AND mode = 'per_file' AND " + _NOT_WAITING_ON_A_BREAKER + ") "
    " - (SELECT coalesce(sum(GREATEST(coalesce((o.expand->>'count')::int, r.total) "
    "        - coalesce((o.expand->>'published')::int, (o.expand->>'after_idx')::int + 1), 0)), 0) "
    "    FROM coordinator.outbox o JOIN coordinator.runs r ON r.id = o.expand->>'run_id' "
    "    WHERE o.expand IS NOT NULL AND r.tenant_id = :t AND r.status = 'RUNNING' AND r." + _NOT_WAITING_ON_A_BREAKER + ")"
)


async def room(conn: AsyncConnection, tenant_id: str, window: int) -> int:
    """How many more of this tenant's jobs may be published now: at most ``window`` of them
    out at once, whatever runs they belong to, so that neither a big run nor many runs of
    one tenant bury another tenant's jobs under theirs in the one FIFO consumer every
    executor shares."""
    return window - (await conn.execute(_TENANT_OUT, {"t": tenant_id})).scalar_one()


# ---- the window adapts to the executors' slots -----------------------------------------------

# A tenant's window is HEADROOM × the fleet's slots shared among the tenants with work waiting:
# a slot's worth running and three queued, so that no executor starves between a result
# and the next publication (results gathered and applied, then a page published: some
# 50 ms, in which one executor runs ~350 noop jobs). 2 cost the noop bench ~20% of its
# throughput, 4 about 5% (within its noise). A tenant alone can keep every slot busy; a
# newcomer waits behind at most ~3 slots' worth of another tenant's queued jobs each.
HEADROOM = 4
# However many tenants share the slots, each has at least this many jobs out.
MIN_WINDOW = 16
# The tenants with work waiting are counted at most this often (the relay asks before each
# page of each run it expands).
ACTIVE_TENANTS_TTL_S = 0.5

# Tenants with a RUNNING per_file run that has PENDING files: an index-only scan of the
# partial index on RUNNING runs (runs_running_by_tenant: tenant_id, INCLUDE mode, pending).
_ACTIVE_TENANTS = text(
    "SELECT count(DISTINCT tenant_id) FROM coordinator.runs "
    "WHERE status = 'RUNNING' AND mode = 'per_file' AND pending > 0"
)


def window_size(cap: int, slots: int | None, active_tenants: int) -> int:
    """A tenant's window: HEADROOM × the executors' ``slots`` shared among the
    ``active_tenants``, at least MIN_WINDOW, at most ``cap`` (REDRIVE_JOBS_IN_FLIGHT_PER_TENANT);
    the cap while the slots are unknown (no executor has announced them)."""
    if slots is None:
        return cap
    return min(cap, max(MIN_WINDOW, math.ceil(HEADROOM * slots / max(1, active_tenants))))


class Window:
    """Each tenant's window now (:func:`window_size`): ``slots`` gives the slots of the
    executors alive (None: unknown; OfferedHandlers.slots)."""

    def __init__(self, cap: int, slots: Callable[[], int | None], *, clock=time.monotonic) -> None:
        self.cap, self._slots, self._clock = cap, slots, clock
        self._active: tuple[int, float] | None = None  # (count, when counted)

    async def size(self, conn: AsyncConnection) -> int:
        slots = self._slots()
        if slots is None or self.cap <= MIN_WINDOW:
            return self.cap  # whatever the tenants: no need to count them
        return window_size(self.cap, slots, await self.active_tenants(conn))

    async def active_tenants(self, conn: AsyncConnection) -> int:
        now = self._clock()
        if self._active is None or now - self._active[1] >= ACTIVE_TENANTS_TTL_S:
            self._active = ((await conn.execute(_ACTIVE_TENANTS)).scalar_one(), now)
        return self._active[0]


_DROP_EXPANSIONS = text("DELETE FROM coordinator.outbox WHERE expand IS NOT NULL AND expand->>'run_id' = :run_id")


async def drop_expansions(conn: AsyncConnection, run_id: str) -> None:
    """Forget the run's expansions still in the outbox (waiting for room in its window),
    when every PENDING file of it is given a job at once (recovery): they would publish
    those files' jobs again."""
    await conn.execute(_DROP_EXPANSIONS, {"run_id": run_id})


_EXPAND_RUN = text(
    "SELECT r.id, r.tenant_id, r.template_id, r.mode, r.round, r.generation, r.status, r.trace_id, r.total, "
    "r.attention_reason, "
    "t.steps FROM coordinator.runs r JOIN coordinator.templates t ON t.id = r.template_id WHERE r.id = :run_id"
)
_FILE_COLUMNS = ("SELECT idx, round, name, url, content_b64, size, sha256, checkpoint_step, checkpoint_output "
                 "FROM coordinator.files WHERE run_id = :run_id AND round BETWEEN :first AND :last "
                 "AND status = 'PENDING' AND idx > :after")
# A page is read a span of indexes at a time (through the primary key: run_id, idx). Asked
# for "the next PENDING files after :after" alone, PostgreSQL judges from a table of mostly
# finished files that the run has few PENDING ones, and reads all of them to sort them (a
# 100,000-file run in a table of 20 million: 20-28 ms a page, instead of ~2).
_EXPAND_FILES_IN_SPAN = text(_FILE_COLUMNS + " AND idx <= :upto ORDER BY idx LIMIT :limit")
# Past the run's last index (indexes run 0..total-1): whatever is left, which is nothing
# unless a file was given an index beyond them; bounded by the primary key all the same.
_EXPAND_FILES_AFTER = text(_FILE_COLUMNS + " ORDER BY idx LIMIT :limit")
# Indexes per span at least: where PENDING files are few (a Continue of 10 failed files in
# 100,000), a page walks the run in spans of this many rows.
SPAN = 4096


async def _pending_files(conn: AsyncConnection, spec: Mapping[str, Any], total: int, limit: int) -> list[dict]:
    """Up to ``limit`` PENDING files of the expansion's round(s) after its ``after_idx``,
    in index order; fewer only when there are no more."""
    files: list[dict] = []
    params = {"run_id": spec["run_id"], "first": spec.get("first_round", spec["round"]), "last": spec["round"],
              "after": spec["after_idx"]}
    while len(files) < limit:
        wanted = limit - len(files)
        last_span = params["after"] >= total - 1
        if last_span:
            result = await conn.execute(_EXPAND_FILES_AFTER, {**params, "limit": wanted})
        else:
            upto = params["after"] + max(wanted, SPAN)
            result = await conn.execute(_EXPAND_FILES_IN_SPAN, {**params, "upto": upto, "limit": wanted})
        # Plain dicts: RowMapping lookups made up most of building a job (5 → 2 µs a file).
        columns = list(result.keys())
        found = [dict(zip(columns, row)) for row in result]
        files += found
        if last_span:
            break
        params["after"] = found[-1]["idx"] if len(found) == wanted else upto
    return files


async def expand_page(conn: AsyncConnection, spec: Mapping[str, Any], limit: int, *, names: Names,
                      window: int | Window | None = None) -> Page:
    """The next page of an expansion's jobs: at most ``limit``, and no more than its
    tenant's ``window`` allows (a fixed size, one that follows the executors' slots, or
    None: no window).

    Only files still PENDING in the expansion's round(s) of a RUNNING run are published: a
    run cancelled or stopped meanwhile publishes nothing more. A run that moved on to a later
    round meanwhile (a single-file retry or restore) still needs the jobs of the files left in
    this round: they are published with this round (the files' own, see job_messages).
    """
    run = (await conn.execute(_EXPAND_RUN, {"run_id": spec["run_id"]})).mappings().first()
    if run is None or run["status"] != "RUNNING":
        return Page([], None)
    if window is not None:
        if run["attention_reason"] == "breaker_open":  # not counted in the window: see _TENANT_OUT
            return Page([], dict(spec), waiting=True)
        size = window if isinstance(window, int) else await window.size(conn)
        limit = min(limit, await room(conn, run["tenant_id"], size))
        if limit <= 0:
            return Page([], dict(spec), waiting=True)
    files = await _pending_files(conn, spec, run["total"], limit)
    messages = job_messages(names, run, {"steps": run["steps"]}, files, RetryPolicy.model_validate(spec["policy"]),
                            msg_suffix=spec.get("msg_suffix", ""))
    if len(files) < limit:
        return Page(messages, None)
    return Page(messages, {**spec, "after_idx": files[-1]["idx"], "published": _published(spec) + len(messages)})
