"""A delivery the server has since given out again (it waited in a frozen or stalled
executor), or one of a job another delivery of the same message finished (its ack lost),
must not run the job's last step again: job_runner reads the progress store for it."""

from __future__ import annotations

from services.executor.deliveries import later_delivery
from services.executor.handlers.registry import HandlerRegistry
from services.executor.job_runner import JobRunner
from services.executor.keepalive import KeepAlive
from services.executor.progress import Progress, _merge
from services.executor.steps import StepRunner
from shared.messages import FileSpec, Job, StepSpec
from shared.subjects import Names

NAMES = Names("t")
SEQ = 41
TS = 1795984717604403616
MSG = f"{SEQ}-{TS}"  # a message's name in a delivery's


class Msg:
    """A job message as JetStream delivers it, for the ``delivered``-th time."""

    def __init__(self, job: Job, delivered: int) -> None:
        self.subject = NAMES.job(job.tenant_id)
        self.reply = f"$JS.ACK.T_JOBS.executor.{delivered}.{SEQ}.{SEQ}.{TS}.0"
        self.data = job.model_dump_json().encode()
        self.headers = {}
        self.said: list[str] = []

    async def ack(self) -> None:
        self.said.append("ack")

    async def term(self) -> None:
        self.said.append("term")

    async def nak(self, delay=None) -> None:
        self.said.append("nak")

    async def in_progress(self) -> None:
        pass


class Store:
    """The progress store, per file (the one-file tests read ``stored``: file 0's)."""

    def __init__(self, stored: Progress | None = None) -> None:
        self.files = {0: stored or Progress()}

    @property
    def stored(self) -> Progress:
        return self.files[0]

    async def get(self, job_id: str, file_index: int) -> Progress:
        return Progress(**vars(self.files.get(file_index, Progress())))

    async def put(self, job_id: str, file_index: int, progress: Progress, *, unless_overtaken: bool = False):
        self.files[file_index] = _merge(self.files.get(file_index, Progress()), progress)

    claimed: str | None = None

    async def claim_batch(self, job_id: str, delivery: str, later) -> bool:
        if later(self.claimed, delivery):
            return False
        self.claimed = delivery
        return True

    async def batch_claimed_by(self, job_id: str) -> str | None:
        return self.claimed


def runner(tmp_path, store: Store, ran: list[int]) -> JobRunner:
    registry = HandlerRegistry()

    async def step(ctx):
        ran.append(ctx.step_index)
        return {}

    registry.register("step", step)
    job_runner = JobRunner(None, NAMES, StepRunner(registry, None, tmp_path), store, KeepAlive(30))
    published: list[str] = []

    async def publish(job, file_index, outcome, attempt, kind=None):
        published.append(kind or outcome.kind)

    job_runner.files.publish = publish  # the events: not what is judged here
    job_runner.published = published
    return job_runner


def two_step_job() -> Job:
    return Job(job_id="r:file:0:r0", run_id="r", tenant_id="ten", template_id="tpl", round=0, idempotency_key="k",
               file_index=0, file=FileSpec(index=0, name="a.txt"),
               steps=[StepSpec(name="a", handler="step"), StepSpec(name="b", handler="step")])


async def test_a_delivery_the_server_gave_out_again_runs_nothing_and_leaves_the_ack_to_that_one(tmp_path):
    ran: list[int] = []
    # The second delivery (another executor) checkpointed step a; this first one waited.
    store = Store(Progress(step=0, output={}, writer=f"other/{MSG}/2"))
    msg = Msg(two_step_job(), delivered=1)
    await runner(tmp_path, store, ran).handle(msg)
    assert ran == [] and msg.said == []


async def test_a_job_a_delivery_of_its_message_finished_is_acked_again_not_run(tmp_path):
    ran: list[int] = []
    store = Store(Progress(step=0, output={}, writer=f"other/{MSG}/1", finished_by=f"other/{MSG}/1"))
    msg = Msg(two_step_job(), delivered=2)  # the first one's ack was lost
    await runner(tmp_path, store, ran).handle(msg)
    assert ran == [] and msg.said == ["ack"]


async def test_a_job_a_copy_finished_is_acked_when_its_original_comes_back_not_run(tmp_path):
    """An operator's Recover published a copy of the jobs a dead executor held; the copy ran
    the file to the end. When the ack wait brought the original back, it ran the last step
    again, after the file had SUCCEEDED."""
    ran: list[int] = []
    copy = f"x/{SEQ + 9}-{TS + 9}/1"
    store = Store(Progress(step=0, output={}, writer=copy, finished_by=copy))
    original = Msg(two_step_job(), delivered=2)
    await runner(tmp_path, store, ran).handle(original)
    assert ran == [] and original.said == ["ack"]


async def test_a_single_step_copy_says_it_finished_for_the_original_to_see(tmp_path):
    ran: list[int] = []
    store = Store()
    job = Job(job_id="r:file:0:r0", run_id="r", tenant_id="ten", template_id="tpl", round=0, idempotency_key="k",
              file_index=0, file=FileSpec(index=0, name="a.txt"), steps=[StepSpec(name="a", handler="step")])
    copy = Msg(job, delivered=1)
    copy.reply = f"$JS.ACK.T_JOBS.executor.1.{SEQ + 9}.{SEQ + 9}.{TS + 9}.0"
    copy.headers = {"Nats-Msg-Id": "r:file:0:r0:rec1"}
    await runner(tmp_path, store, ran).handle(copy)
    assert ran == [0] and copy.said == ["ack"] and store.stored.finished_by.endswith(f"/{SEQ + 9}-{TS + 9}/1")
    original = Msg(job, delivered=2)
    await runner(tmp_path, store, ran).handle(original)
    assert ran == [0] and original.said == ["ack"]


async def test_a_copy_runs_a_job_its_original_finished_its_result_may_have_been_lost(tmp_path):
    """The sweep re-publishes a job whose file is still PENDING: its result may have been
    lost after the original finished (a stream that lost an acknowledged write). A copy that
    acked it because the original had finished left the file PENDING for good."""
    ran: list[int] = []
    store = Store(Progress(step=0, output={}, writer=f"x/{MSG}/1", finished_by=f"x/{MSG}/1"))
    copy = Msg(two_step_job(), delivered=1)
    copy.reply = f"$JS.ACK.T_JOBS.executor.1.{SEQ + 9}.{SEQ + 9}.{TS + 9}.0"
    copy.headers = {"Nats-Msg-Id": "r:file:0:r0:rec1"}
    job_runner = runner(tmp_path, store, ran)
    await job_runner.handle(copy)
    assert ran == [1] and copy.said == ["ack"] and job_runner.published == ["succeeded"]


async def test_a_finished_multi_step_job_says_so_for_its_other_deliveries(tmp_path):
    ran: list[int] = []
    store = Store()
    msg = Msg(two_step_job(), delivered=1)
    job_runner = runner(tmp_path, store, ran)
    await job_runner.handle(msg)
    assert ran == [0, 1] and msg.said == ["ack"] and job_runner.published == ["checkpoint", "succeeded"]
    assert store.stored.finished_by is not None and store.stored.finished_by.endswith(f"/{MSG}/1")
    # A copy of the job (re-published by recovery: another message) is not judged by it.
    assert not later_delivery(store.stored.finished_by, f"x/{SEQ + 1}-{TS}/1")


def test_a_later_delivery_is_one_of_the_same_message_delivered_more_often():
    assert later_delivery(f"a/{MSG}/3", f"b/{MSG}/2")
    assert not later_delivery(f"a/{MSG}/2", f"b/{MSG}/2") and not later_delivery(f"a/{MSG}/1", f"b/{MSG}/2")
    assert not later_delivery(f"a/{SEQ + 1}-{TS}/3", f"b/{MSG}/2")  # another message: a copy
    # The same sequence in a stream made again (another timestamp): another message too.
    assert not later_delivery(f"a/{SEQ}-{TS + 1}/3", f"b/{MSG}/2")
    assert not later_delivery(None, f"b/{MSG}/2") and not later_delivery("a/-/3", "b/-/1")
    # A name written before names carried the timestamp: judged by the sequence.
    assert later_delivery(f"a/{SEQ}/3", f"b/{MSG}/2") and not later_delivery(f"a/{SEQ + 1}/3", f"b/{MSG}/2")


def batch_job(files: int) -> Job:
    return Job(job_id="r:batch:r0", run_id="r", tenant_id="ten", template_id="tpl", round=0, idempotency_key="k",
               mode="batch", files=[FileSpec(index=i, name=f"{i}.txt") for i in range(files)],
               steps=[StepSpec(name="a", handler="step")])


async def test_a_batch_redelivery_claims_the_batch_and_an_earlier_delivery_stops_at_its_next_file(tmp_path, monkeypatch):
    from services.executor import batch_runner

    monkeypatch.setattr(batch_runner, "BATCH_CLAIM_CHECK_S", 0.0)  # look before every file
    ran: list[int] = []
    store = Store()
    later = Msg(batch_job(3), delivered=2)
    await runner(tmp_path, store, ran).handle(later)
    assert store.claimed.endswith(f"/{MSG}/2") and later.said == ["ack"] and len(ran) == 3
    ran.clear()
    earlier = Msg(batch_job(3), delivered=1)  # thawed: the batch is the later one's now
    stale_store = Store()
    stale_store.claimed = store.claimed
    await runner(tmp_path, stale_store, ran).handle(earlier)
    assert ran == [] and earlier.said == []


async def test_a_delivery_that_claims_a_batch_after_a_later_one_runs_nothing_and_leaves_the_claim(tmp_path):
    ran: list[int] = []
    store = Store()
    store.claimed = f"other/{MSG}/3"
    late = Msg(batch_job(3), delivered=2)  # waited unstarted while delivery 3 took the batch
    await runner(tmp_path, store, ran).handle(late)
    assert ran == [] and late.said == [] and store.claimed == f"other/{MSG}/3"


class _Stops:
    def __init__(self) -> None:
        self.stopped_runs: set[str] = set()

    def stopped(self, run_id: str, generation: int) -> bool:
        return run_id in self.stopped_runs


async def test_a_long_step_whose_run_is_cancelled_stops_at_its_next_heartbeat(tmp_path):
    import asyncio

    from services.executor.handlers.registry import HandlerRegistry

    stops, beats = _Stops(), []
    registry = HandlerRegistry()

    async def long_step(ctx):
        for _ in range(500):  # 5 s, were it not stopped
            try:
                await ctx.heartbeat()
            except Exception:  # a handler's own catch-all must not take the stop for a failure
                raise AssertionError("the stop was caught as an Exception")
            beats.append(1)
            if len(beats) == 3:
                stops.stopped_runs.add(ctx.run_id)  # cancelled meanwhile (the stops map, from the coordinator)
            await asyncio.sleep(0.01)
        return {}

    registry.register("long", long_step)
    job_runner = JobRunner(None, NAMES, StepRunner(registry, None, tmp_path), Store(), KeepAlive(30), stops=stops)
    published: list[str] = []

    async def publish(job, file_index, outcome, attempt, kind=None):
        published.append(kind or outcome.kind)

    job_runner.files.publish = publish
    job = Job(job_id="r:file:0:r0", run_id="r", tenant_id="ten", template_id="tpl", round=0, idempotency_key="k",
              file_index=0, file=FileSpec(index=0, name="a.txt"), steps=[StepSpec(name="a", handler="long")])
    msg = Msg(job, delivered=1)
    await asyncio.wait_for(job_runner.handle(msg), 2)
    assert len(beats) == 3 and msg.said == ["ack"] and published == []  # stopped: no result, acked


def test_a_newer_copy_is_another_message_of_the_job_published_later():
    from services.executor.deliveries import batch_taken, newer_copy

    assert newer_copy(f"a/{SEQ + 5}-{TS + 5}/1", f"b/{MSG}/3")  # a recovery's copy, after this message
    assert not newer_copy(f"a/{SEQ - 5}-{TS - 5}/1", f"b/{MSG}/1")  # the original, before the copy
    assert not newer_copy(f"a/{MSG}/3", f"b/{MSG}/1")  # the same message: a later delivery, not a copy
    assert not newer_copy(None, f"b/{MSG}/1") and not newer_copy("a/-/1", f"b/{MSG}/1")
    assert batch_taken(f"a/{MSG}/3", f"b/{MSG}/1") and batch_taken(f"a/{SEQ + 5}-{TS + 5}/1", f"b/{MSG}/3")


async def test_a_batch_whose_copy_claimed_it_stops_and_acks_its_message_and_the_copy_skips_done_files(
        tmp_path, monkeypatch):
    """An operator's Recover published a copy of a batch whose executor was frozen: the
    copy, the thawed original and the original's redelivery all ran its files (three times
    each). The copy claims the batch; the original stops at its next file and acks its
    message (left, it came back until max deliver); the copy runs only the files not done."""
    from services.executor import batch_runner

    monkeypatch.setattr(batch_runner, "BATCH_CLAIM_CHECK_S", 0.0)
    ran: list[int] = []
    store = Store()
    store.files[0] = Progress(done=True)  # the original finished file 0 before it froze
    copy = Msg(batch_job(3), delivered=1)
    copy.reply = f"$JS.ACK.T_JOBS.executor.1.{SEQ + 9}.{SEQ + 9}.{TS + 9}.0"  # published after the original
    copy.headers = {"Nats-Msg-Id": "r:batch:r0:rec1"}
    steps_of: list[tuple[int, int]] = []

    async def step(ctx):
        steps_of.append((ctx.file_index, ctx.step_index))
        return {}

    job = runner(tmp_path, store, ran)
    job.files._steps._registry.register("step", step)
    await job.handle(copy)
    assert copy.said == ["ack"] and sorted(steps_of) == [(1, 0), (2, 0)]  # file 0 was done: not again
    original = Msg(batch_job(3), delivered=2)  # thawed, or the original's redelivery
    await runner(tmp_path, store, ran).handle(original)
    assert original.said == ["ack"] and store.claimed.endswith(f"/{SEQ + 9}-{TS + 9}/1")


async def test_a_copy_that_finds_the_original_ahead_in_a_file_leaves_it_that_file_and_runs_the_rest(
        tmp_path, monkeypatch):
    """The original is mid-way through a file when a Recover's copy claims the batch: the
    original checkpoints the file's step first, so the copy is superseded there. The copy
    left too, and the original stepped aside at its next file: files after it ran nowhere
    (the review). Now the copy goes on with the next files, the original finishes its file."""
    import asyncio

    from services.executor import batch_runner
    from services.executor.progress import overtaken

    monkeypatch.setattr(batch_runner, "BATCH_CLAIM_CHECK_S", 0.0)

    class OvertakingStore(Store):
        async def put(self, job_id, file_index, progress, *, unless_overtaken=False):
            stored = self.files.get(file_index, Progress())
            if unless_overtaken and overtaken(stored, progress):
                return stored.writer
            self.files[file_index] = _merge(stored, progress)
            return None

    store = OvertakingStore()
    job = Job(job_id="r:batch:r0", run_id="r", tenant_id="ten", template_id="tpl", round=0, idempotency_key="k",
              mode="batch", files=[FileSpec(index=i, name=f"{i}.txt") for i in range(3)],
              steps=[StepSpec(name="a", handler="slow"), StepSpec(name="b", handler="slow")])
    finished: list[tuple[str, int]] = []

    def make(who: str) -> JobRunner:
        registry = HandlerRegistry()

        async def slow(ctx):
            await asyncio.sleep(0.3 if ctx.step_index == 0 else 0.01)
            return {}

        registry.register("slow", slow)
        runner_ = JobRunner(None, NAMES, StepRunner(registry, None, tmp_path), store, KeepAlive(30))

        async def publish(job, file_index, outcome, attempt, kind=None):
            if (kind or outcome.kind) == "succeeded":
                finished.append((who, file_index))

        runner_.files.publish = publish
        return runner_

    original = Msg(job, delivered=1)
    copy = Msg(job, delivered=1)
    copy.reply = f"$JS.ACK.T_JOBS.executor.1.{SEQ + 9}.{SEQ + 9}.{TS + 9}.0"
    copy.headers = {"Nats-Msg-Id": "r:batch:r0:rec1"}

    async def late_copy():
        await asyncio.sleep(0.45)  # the original is in file 1's step a
        await make("copy").handle(copy)

    await asyncio.gather(make("original").handle(original), late_copy())
    assert sorted(index for _, index in finished) == [0, 1, 2], finished  # every file, once
    assert original.said == ["ack"] and copy.said == ["ack"]
