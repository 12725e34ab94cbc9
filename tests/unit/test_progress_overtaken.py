"""A delivery learns at its checkpoint that another delivery of its job got there first."""

from services.executor.deliveries import delivery_name
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
