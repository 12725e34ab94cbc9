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


class Msg:
    """A job message as JetStream delivers it, for the ``delivered``-th time."""

    def __init__(self, job: Job, delivered: int) -> None:
        self.subject = NAMES.job(job.tenant_id)
        self.reply = f"$JS.ACK.T_JOBS.executor.{delivered}.{SEQ}.{SEQ}.1795984717604403616.0"
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
    def __init__(self, stored: Progress | None = None) -> None:
        self.stored = stored or Progress()

    async def get(self, job_id: str, file_index: int) -> Progress:
        return Progress(**vars(self.stored))

    async def put(self, job_id: str, file_index: int, progress: Progress, *, unless_overtaken: bool = False):
        self.stored = _merge(self.stored, progress)


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

    job_runner._publish = publish  # the events: not what is judged here
    job_runner.published = published
    return job_runner


def two_step_job() -> Job:
    return Job(job_id="r:file:0:r0", run_id="r", tenant_id="ten", template_id="tpl", round=0, idempotency_key="k",
               file_index=0, file=FileSpec(index=0, name="a.txt"),
               steps=[StepSpec(name="a", handler="step"), StepSpec(name="b", handler="step")])


async def test_a_delivery_the_server_gave_out_again_runs_nothing_and_leaves_the_ack_to_that_one(tmp_path):
    ran: list[int] = []
    # The second delivery (another executor) checkpointed step a; this first one waited.
    store = Store(Progress(step=0, output={}, writer=f"other/{SEQ}/2"))
    msg = Msg(two_step_job(), delivered=1)
    await runner(tmp_path, store, ran).handle(msg)
    assert ran == [] and msg.said == []


async def test_a_job_a_delivery_of_its_message_finished_is_acked_again_not_run(tmp_path):
    ran: list[int] = []
    store = Store(Progress(step=0, output={}, writer=f"other/{SEQ}/1", finished_by=f"other/{SEQ}/1"))
    msg = Msg(two_step_job(), delivered=2)  # the first one's ack was lost
    await runner(tmp_path, store, ran).handle(msg)
    assert ran == [] and msg.said == ["ack"]


async def test_a_finished_multi_step_job_says_so_for_its_other_deliveries(tmp_path):
    ran: list[int] = []
    store = Store()
    msg = Msg(two_step_job(), delivered=1)
    job_runner = runner(tmp_path, store, ran)
    await job_runner.handle(msg)
    assert ran == [0, 1] and msg.said == ["ack"] and job_runner.published == ["checkpoint", "succeeded"]
    assert store.stored.finished_by is not None and store.stored.finished_by.endswith(f"/{SEQ}/1")
    # A copy of the job (re-published by recovery: another message) is not judged by it.
    assert not later_delivery(store.stored.finished_by, f"x/{SEQ + 1}/1")


def test_a_later_delivery_is_one_of_the_same_message_delivered_more_often():
    assert later_delivery(f"a/{SEQ}/3", f"b/{SEQ}/2")
    assert not later_delivery(f"a/{SEQ}/2", f"b/{SEQ}/2") and not later_delivery(f"a/{SEQ}/1", f"b/{SEQ}/2")
    assert not later_delivery(f"a/{SEQ + 1}/3", f"b/{SEQ}/2")  # another message: a copy
    assert not later_delivery(None, f"b/{SEQ}/2") and not later_delivery("a/-/3", "b/-/1")
