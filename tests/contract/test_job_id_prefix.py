"""Looking a job up by the first characters of its id (``epq jobs show|cancel ID-PREFIX``):
the record stores' ``find_ids`` on memory and Redis, and the command's answers."""

from __future__ import annotations

import pytest

import epq
import epq.testing
from epq.backends.base import NewRecord, RecordStore

TWINS = ("0123abcd-1111-4000-8000-000000000001", "0123abcd-2222-4000-8000-000000000002")
OTHER = "0123abce-3333-4000-8000-000000000003"
FIELDS = {"state": "available", "queue": "default", "priority": "2"}


@pytest.fixture(params=["stub", pytest.param("redis", marks=pytest.mark.redis)])
def records(request: pytest.FixtureRequest) -> RecordStore:
    """The record store of a stub or Redis broker, holding TWINS and OTHER."""
    request.getfixturevalue("epq_broker" if request.param == "stub" else "redis_broker")
    records = epq.testing.backend().records
    for job_id in (*TWINS, OTHER):
        records.create(NewRecord(job_id, FIELDS, 60_000))
    return records


def test_find_ids_returns_every_record_with_the_prefix(records: RecordStore) -> None:
    assert sorted(records.find_ids("0123abcd", 10)) == list(TWINS)
    assert records.find_ids("0123abce", 10) == [OTHER]
    assert records.find_ids("0123abcd-2", 10) == [TWINS[1]]
    assert records.find_ids("99999999", 10) == []


def test_find_ids_stops_at_the_limit(records: RecordStore) -> None:
    assert len(records.find_ids("0123abc", 2)) == 2


@pytest.mark.parametrize("prefix", ["0123abc*", "0123abc?", "0123abc[d]", "0123\\abcd", ""])
def test_find_ids_refuses_glob_characters(records: RecordStore, prefix: str) -> None:
    with pytest.raises(ValueError, match="job id prefix"):
        records.find_ids(prefix, 10)


def test_a_deleted_record_is_not_found(records: RecordStore) -> None:
    records.delete(TWINS[0])
    assert records.find_ids("0123abcd", 10) == [TWINS[1]]


def test_the_service_finds_ids_on_the_broker_it_uses(epq_broker: object) -> None:
    svc = epq.QueueService()
    job = svc.enqueue_register_job(
        {"endpoint_id": "6f1d1c1e-4a5b-4c3d-9e8f-0a1b2c3d4e5f", "job_id": "j", "job_metadata": {}}
    ).job
    assert svc.find_job_ids(job.id[:8]) == [job.id]
