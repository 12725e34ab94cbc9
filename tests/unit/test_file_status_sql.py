"""The status filter of a run's page of files is written into its SQL as literals (so that
the partial index files_ended_without_success serves cached generic plans too): only the six
file statuses can ever get there, and the condition means what ``status = ANY(:s)`` meant."""

from __future__ import annotations

from typing import get_args

import pytest

from shared.messages import FileStatus, ServiceError
from services.coordinator.store import FILE_STATUSES, _status_in


def test_the_known_statuses_are_the_contracts_six():
    assert FILE_STATUSES == set(get_args(FileStatus)) == {"PENDING", "SUCCEEDED", "FAILED", "ERROR", "SKIPPED", "CANCELLED"}


@pytest.mark.parametrize("statuses, sql", [
    (["ERROR"], "status = 'ERROR'"),
    (["FAILED", "ERROR"], "status IN ('ERROR', 'FAILED')"),
    (["FAILED", "ERROR", "FAILED"], "status IN ('ERROR', 'FAILED')"),  # a repeat changes nothing
    (["PENDING", "PENDING"], "status = 'PENDING'"),
])
def test_one_status_is_an_equality_and_several_an_in_list(statuses, sql):
    assert _status_in(statuses) == sql


def test_every_status_can_be_asked_for():
    for status in get_args(FileStatus):
        assert _status_in([status]) == f"status = '{status}'"
    assert _status_in(list(get_args(FileStatus))).count("'") == 12


@pytest.mark.parametrize("bad", ["DONE", "failed", "FAILED'); DROP TABLE coordinator.files; --", "", "ERROR "])
def test_anything_else_is_refused_before_it_reaches_the_sql(bad):
    with pytest.raises(ServiceError) as refused:
        _status_in(["FAILED", bad])
    assert refused.value.code == "validation_error"
