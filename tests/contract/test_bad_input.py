"""Bad input at the call site: text that is not UTF-8, deep nesting, long field names, and epq's
own enqueue hooks failing. Each is refused with a clear error and leaves nothing behind: no
message, no record, no uniqueness lock (single enqueue, the actors' ``send`` and bulk)."""

from __future__ import annotations

import os
from typing import Any

import dramatiq
import pytest

import epq
import epq.actors
from epq import options
from epq.errors import MAX_NESTING, EnqueueFailed
from epq.middleware.job_records import JobRecords
from epq.middleware.uniqueness import Uniqueness
from epq.testing import backend
from tests.support.helpers import VALID, total_waiting

# What os.fsdecode makes of a file name with a byte that is not UTF-8: a lone surrogate.
SURROGATE = os.fsdecode(b"report-\xff.csv")


def _nothing_left(broker: dramatiq.Broker) -> None:
    """No message waiting, no job record, and no lock held for VALID register_job."""
    assert total_waiting(broker) == 0
    assert sum(backend(broker).records.counters().values()) == 0
    # the same unique fields with valid metadata take their key: no lock was left behind
    result = epq.QueueService(broker).enqueue_register_job(VALID["register_job"])
    assert result.unique_skipped_as_duplicate is False


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({"name": SURROGATE}, "job_metadata.name"),
        ({"files": ["ok", {"path": SURROGATE}]}, "job_metadata.files.1.path"),
        ({SURROGATE: 1}, "job_metadata"),  # a key: the dict that holds it is named
    ],
)
def test_a_lone_surrogate_is_refused_naming_the_field_and_nothing_is_enqueued(
    broker: dramatiq.Broker, metadata: dict[str, Any], field: str
) -> None:
    request = {**VALID["register_job"], "job_metadata": metadata}
    svc = epq.QueueService(broker)
    # the same request twice, by the facade and by the actor: refused each time, never a job
    attempts = [
        lambda: svc.enqueue_register_job(request),
        lambda: svc.enqueue_register_job(request),
        lambda: epq.actors.register_job.send(**request),
    ]
    for enqueue in attempts:
        with pytest.raises(epq.InvalidRequest) as info:
            enqueue()
        assert info.value.fields == [field]
        assert "not valid UTF-8" in str(info.value)
        str(info.value).encode()  # the message itself can be printed and logged
    _nothing_left(broker)


def test_a_lone_surrogate_in_a_bulk_enqueue_names_the_request_and_enqueues_nothing(
    broker: dramatiq.Broker,
) -> None:
    bad = {**VALID["register_job"], "job_id": "other", "job_metadata": {"name": SURROGATE}}
    good = {**VALID["register_source"]}
    with pytest.raises(epq.InvalidRequest) as info:
        epq.QueueService(broker).enqueue_many([("register_source", good), ("register_job", bad)])
    assert info.value.fields == ["[1].job_metadata.name"]
    with pytest.raises(epq.InvalidRequest) as info:
        epq.actors.register_job.send_many([VALID["register_job"], bad])
    assert info.value.fields == ["[1].job_metadata.name"]
    _nothing_left(broker)


def test_a_surrogate_in_a_plain_field_is_refused_by_validation(epq_broker: dramatiq.Broker) -> None:
    with pytest.raises(epq.InvalidRequest) as info:
        epq.QueueService(epq_broker).enqueue_register_job({**VALID["register_job"], "job_id": SURROGATE})
    assert info.value.fields == ["job_id"]
    _nothing_left(epq_broker)


@pytest.mark.parametrize("levels", [MAX_NESTING + 1, 100, 300])
def test_metadata_nested_too_deeply_is_refused_with_a_short_field_name(
    broker: dramatiq.Broker, levels: int
) -> None:
    request = {**VALID["register_job"], "job_metadata": _deep(levels)}
    with pytest.raises(epq.InvalidRequest) as info:
        epq.QueueService(broker).enqueue_register_job(request)
    assert info.value.errors == [
        {"field": "job_metadata", "message": f"nested deeper than {MAX_NESTING} levels"}
    ]
    with pytest.raises(epq.InvalidRequest) as info:
        epq.QueueService(broker).enqueue_many([("register_job", request)])
    assert info.value.fields == ["[0].job_metadata"]
    _nothing_left(broker)


def test_metadata_at_the_nesting_limit_is_enqueued(epq_broker: dramatiq.Broker) -> None:
    request = {**VALID["register_job"], "job_metadata": _deep(MAX_NESTING)}
    assert epq.QueueService(epq_broker).enqueue_register_job(request).job.args["job_metadata"] == _deep(
        MAX_NESTING
    )


def test_field_names_in_errors_are_cut_short(epq_broker: dramatiq.Broker) -> None:
    # a wrong value 30 levels down: pydantic's path is long, the error's field is not
    metadata: dict[str, Any] = {"x": object()}
    for n in range(30):
        metadata = {f"level{n:02d}": metadata}
    with pytest.raises(epq.InvalidRequest) as info:
        epq.QueueService(epq_broker).enqueue_register_job({**VALID["register_job"], "job_metadata": metadata})
    (field,) = info.value.fields
    assert field.startswith("job_metadata.level29.")
    assert len(field) <= 80
    assert field.endswith("...")


@pytest.mark.parametrize("hook", [Uniqueness, JobRecords])
def test_an_unexpected_failure_in_an_enqueue_hook_stops_the_enqueue(
    broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch, hook: type[dramatiq.Middleware]
) -> None:
    # Dramatiq logs and ignores a hook's exception unless it is a MiddlewareError: the job
    # would be enqueued without its lock or its record. The hooks act on messages enqueued by
    # hand (epq.insert takes the lock and writes the record of what it inserts): JobRecords on a
    # new one, Uniqueness on one that has a record (a dead job run again, say)
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("simulated bug")

    method = "_take_lock" if hook is Uniqueness else "new_record"
    monkeypatch.setattr(hook, method, broken)
    message = epq.actors.register_job.message(**VALID["register_job"])
    if hook is Uniqueness:
        message.options[options.RECORDED] = 1
    with pytest.raises(EnqueueFailed, match="simulated bug") as info:
        broker.enqueue(message)
    assert isinstance(info.value, epq.EpqError)
    monkeypatch.undo()
    _nothing_left(broker)


def test_a_message_built_by_hand_with_a_surrogate_is_not_enqueued_without_its_lock(
    epq_broker: dramatiq.Broker,
) -> None:
    # a message that never went through the actor's validation: the lock step cannot encode it
    message = dramatiq.Message(
        queue_name="default",
        actor_name="register_job",
        args=(),
        kwargs={**VALID["register_job"], "job_metadata": {"name": SURROGATE}},
        options={},
    )
    with pytest.raises(EnqueueFailed, match=r"lock and writing the job record failed .* not enqueued"):
        epq_broker.enqueue(message)
    _nothing_left(epq_broker)
