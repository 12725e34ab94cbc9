"""A delivery learns at its checkpoint that another delivery of its job got there first."""

from services.executor.deliveries import delivery_name, same_message
from services.executor.progress import Progress, _merge, overtaken

A, B = delivery_name((7, 1), 1), delivery_name((7, 1), 2)  # two deliveries of one message


def test_the_two_deliveries_of_a_message_have_different_names():
    assert A != B and delivery_name((7, 1), 1) == A and delivery_name((8, 1), 1) != A


def test_a_checkpoint_at_or_behind_another_deliverys_is_overtaken():
    stored = Progress(step=2, writer=B)
    assert overtaken(stored, Progress(step=2, writer=A))
    assert overtaken(stored, Progress(step=1, writer=A))
    assert not overtaken(stored, Progress(step=3, writer=A))  # ahead: it is the one going on


def test_its_own_checkpoints_and_records_without_a_writer_never_overtake():
    assert not overtaken(Progress(step=2, writer=A), Progress(step=2, writer=A))
    assert not overtaken(Progress(step=2), Progress(step=2, writer=A))  # written before writers existed
    assert not overtaken(Progress(failures=3), Progress(step=0, writer=A))  # retries counted, no checkpoint


def test_the_writer_goes_with_its_checkpoint_when_records_merge():
    assert _merge(Progress(step=1, writer=B), Progress(step=2, writer=A)).writer == A
    assert _merge(Progress(step=2, writer=B), Progress(step=1, writer=A, failures=4)).writer == B
    # A retry count written by A after B checkpointed the same step keeps B's name on it.
    assert _merge(Progress(step=2, writer=B), Progress(step=2, writer=A, failures=1)).writer == B
    assert _merge(Progress(step=2), Progress(step=2, writer=A)).writer == A


def test_a_copy_of_the_job_is_told_apart_from_another_delivery_of_its_message():
    assert same_message(A, B)  # deliveries 1 and 2 of one message: overtaken, leave its ack to the other
    assert not same_message(A, delivery_name((9, 5), 1))  # a copy (recovery, refresh): superseded, ack ours


def test_a_stopped_deliverys_nameless_checkpoint_overtakes_nobody():
    # A run stopped while its job ran: the job records its step without a name (job_runner),
    # so the copy a Recover starts, checkpointing the same step next, goes on.
    stored = _merge(Progress(step=1, writer=A), Progress(step=2, writer=None))
    assert stored.step == 2 and stored.writer is None
    assert not overtaken(stored, Progress(step=2, writer=delivery_name((9, 5), 1)))
