"""Payloads across a rolling deploy, on every broker: a worker drops (and names, once) the fields
a newer producer added, and fills in the optional fields an older producer did not send; a kind
in ``EPQ_STRICT_PAYLOAD_KINDS`` dead-letters such payloads instead."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import dramatiq
import pytest

import epq
from epq.testing import HandlerRegistry, drain
from tests.support.helpers import VALID, wait_for

JOBS = 100


def send_raw(broker: dramatiq.Broker, kind: str, payload: dict[str, Any]) -> str:
    """Enqueue a payload as another producer's epq would send it (its own models)."""
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="default", actor_name=kind, args=(), kwargs=payload, options={}
    )
    broker.enqueue(message)
    return message.message_id


def unknown_field_warnings(caplog: pytest.LogCaptureFixture, field: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and repr(field) in r.getMessage()
    ]


def test_a_newer_producers_extra_field_is_dropped_and_named_once(
    broker: dramatiq.Broker,
    worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a producer whose RegisterJobRequest has one more optional field than this worker's
    # (a field name of this test's own: the worker names each field once per process)
    field = f"retry_policy_{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.WARNING, logger="epq")
    received = epq_handlers.record("register_job")
    ids = [
        send_raw(broker, "register_job", {**VALID["register_job"], "job_id": f"job-{n}", field: "fast"})
        for n in range(JOBS)
    ]
    # Then every job runs, none is dead-lettered, and one warning names the field
    drain(broker, worker)
    assert len(received) == JOBS
    assert {r.job_id for r in received} == {f"job-{n}" for n in range(JOBS)}
    service = epq.QueueService(broker)
    assert {service.get_job(i).state for i in ids} == {epq.JobState.COMPLETED}  # type: ignore[union-attr]
    assert service.list_dead() == []
    warnings = unknown_field_warnings(caplog, field)
    assert len(warnings) == 1
    assert "register_job" in warnings[0]


def test_an_older_producers_payload_gets_the_optional_fields_it_did_not_send(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a producer whose EnqueueIndexEndpointRequest had no reason, source_data, queue_name,
    # run_at nor priority yet (only the required fields)
    received = epq_handlers.record("index_endpoint")
    ids = [
        send_raw(
            broker, "index_endpoint", {"endpoint_id": f"00000000-0000-4000-8000-{n:012d}", "source": "API"}
        )
        for n in range(JOBS)
    ]
    drain(broker, worker)
    # Then every job runs with the defaults of the fields it lacked
    assert len(received) == JOBS
    assert all((r.reason, r.source_data) == ("", {}) for r in received)
    assert epq.QueueService(broker).list_dead() == []
    assert len(ids) == JOBS


@pytest.fixture
def strict_register_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """register_job strict (set before ``broker`` builds the broker)."""
    monkeypatch.setenv("EPQ_STRICT_PAYLOAD_KINDS", "register_job")


def test_a_strict_kind_dead_letters_a_payload_with_an_unknown_field(
    strict_register_job: None, broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    received = epq_handlers.record("register_job")
    job_id = send_raw(broker, "register_job", {**VALID["register_job"], "retry_policy": "fast"})
    service = epq.QueueService(broker)
    assert wait_for(lambda: service.get_job(job_id).state is epq.JobState.DISCARDED, timeout=10)  # type: ignore[union-attr]
    record = service.get_job(job_id)
    assert record is not None
    assert record.errors[-1].error_type == "InvalidPayload"
    assert "retry_policy" in record.errors[-1].message
    assert received == []
