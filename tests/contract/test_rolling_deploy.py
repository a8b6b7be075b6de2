"""Payloads across a rolling deploy, on every broker: a worker drops (and names, once) the fields
a newer producer added, fills in the optional fields an older producer did not send, and turns an
older producer's payloads into today's shape with the kind's payload upgrades (sent one by one or
in bulk); an upgrade that fails dead-letters its job with the payload as sent, to be retried once
fixed; a kind in ``EPQ_STRICT_PAYLOAD_KINDS`` dead-letters payloads with unknown fields."""

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


def test_a_newer_worker_fills_in_the_optional_fields_an_older_producer_did_not_send(
    broker: dramatiq.Broker,
    worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a producer whose EnqueueIndexEndpointRequest had no reason, source_data, queue_name,
    # run_at nor priority yet (only the required fields): this worker's model has more
    caplog.set_level(logging.WARNING, logger="epq")
    received = epq_handlers.record("index_endpoint")
    ids = [
        send_raw(
            broker, "index_endpoint", {"endpoint_id": f"00000000-0000-4000-8000-{n:012d}", "source": "API"}
        )
        for n in range(JOBS)
    ]
    drain(broker, worker)
    # Then every job runs with the defaults of the fields it lacked: 0 of 100 dead-lettered
    assert len(received) == JOBS
    assert all((r.reason, r.source_data) == ("", {}) for r in received)
    service = epq.QueueService(broker)
    assert {service.get_job(i).state for i in ids} == {epq.JobState.COMPLETED}  # type: ignore[union-attr]
    assert service.list_dead() == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def declare_register_job_upgrades() -> None:
    """The upgrades of a worker whose RegisterJobRequest changed since an older producer's: its
    ``meta`` is now ``job_metadata`` (renamed), its ``job_id`` was a number (type changed), its
    top-level ``version`` is now inside the metadata (moved; needs the rename first)."""

    @epq.payload_upgrade("register_job")
    def metadata_was_meta(payload: dict[str, Any]) -> dict[str, Any]:
        if "meta" in payload:
            payload["job_metadata"] = payload.pop("meta")
        return payload

    @epq.payload_upgrade("register_job")
    def job_id_was_a_number(payload: dict[str, Any]) -> dict[str, Any]:
        if isinstance(payload.get("job_id"), int):
            payload["job_id"] = f"job-{payload['job_id']}"
        return payload

    @epq.payload_upgrade("register_job")
    def version_moved_into_metadata(payload: dict[str, Any]) -> dict[str, Any]:
        if "version" in payload:
            payload["job_metadata"] = {**payload["job_metadata"], "version": payload.pop("version")}
        return payload


def test_an_older_producers_payloads_are_upgraded_before_validation(
    broker: dramatiq.Broker,
    worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a worker with payload upgrades for register_job, and 100 jobs: half from an older
    # producer (the old shape), half from one of today (the current shape)
    declare_register_job_upgrades()
    caplog.set_level(logging.WARNING, logger="epq")
    received = epq_handlers.record("register_job")
    old = {"endpoint_id": VALID["register_job"]["endpoint_id"], "meta": {"k": "v"}, "version": "3"}
    ids = [send_raw(broker, "register_job", {**old, "job_id": n}) for n in range(JOBS // 2)]
    ids += [
        send_raw(broker, "register_job", {**VALID["register_job"], "job_id": f"job-{n}"})
        for n in range(JOBS // 2, JOBS)
    ]
    drain(broker, worker)
    # Then every job runs with today's request: 0 of 100 dead-lettered, no field named unknown
    assert sorted(r.job_id for r in received) == sorted(f"job-{n}" for n in range(JOBS))
    by_id = {r.job_id: r.job_metadata for r in received}
    assert by_id["job-0"] == {"k": "v", "version": "3"}
    assert by_id[f"job-{JOBS - 1}"] == VALID["register_job"]["job_metadata"]
    service = epq.QueueService(broker)
    assert {service.get_job(i).state for i in ids} == {epq.JobState.COMPLETED}  # type: ignore[union-attr]
    assert service.list_dead() == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_upgrades_apply_to_jobs_enqueued_in_bulk(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a worker whose handler reads the retry count under job_metadata["policy"], and an
    # upgrade for producers that still put it at the top of the metadata
    @epq.payload_upgrade("register_job")
    def retries_moved_into_policy(payload: dict[str, Any]) -> dict[str, Any]:
        metadata = payload.get("job_metadata", {})
        if "retries" in metadata:
            payload["job_metadata"] = {**metadata, "policy": {"retries": metadata.pop("retries")}}
        return payload

    received = epq_handlers.record("register_job")
    # When such a producer enqueues 100 jobs in bulk: through the facade and the actor
    endpoint = VALID["register_job"]["endpoint_id"]

    def request(n: int) -> dict[str, Any]:
        return {"endpoint_id": endpoint, "job_id": f"job-{n}", "job_metadata": {"retries": n}}

    service = epq.QueueService(broker)
    results = service.enqueue_many([("register_job", request(n)) for n in range(JOBS // 2)])
    results += epq.actors.register_job.send_many([request(n) for n in range(JOBS // 2, JOBS)])
    drain(broker, worker)
    # Then every job ran with the metadata in today's shape
    assert not any(r.unique_skipped_as_duplicate for r in results)
    upgraded = sorted((r.job_id, r.job_metadata["policy"]["retries"]) for r in received)
    assert upgraded == [(f"job-{n}", n) for n in sorted(range(JOBS), key=lambda n: f"job-{n}")]
    assert {service.get_job(r.job.id).state for r in results} == {epq.JobState.COMPLETED}  # type: ignore[union-attr]
    assert service.list_dead() == []


def test_a_failing_upgrade_dead_letters_its_job_with_the_payload_as_sent(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given an upgrade that fails on one shape of payload (until it is fixed)
    fixed = False

    @epq.payload_upgrade("register_job")
    def metadata_was_meta(payload: dict[str, Any]) -> dict[str, Any]:
        if "job_metadata" not in payload or not fixed:
            payload["job_metadata"] = payload.pop("meta")  # (a KeyError without "meta")
        return payload

    received = epq_handlers.record("register_job")
    sent = {
        "endpoint_id": VALID["register_job"]["endpoint_id"],
        "job_id": "job-bad",
        "job_metadata": {"a": 1},
    }
    bad = send_raw(broker, "register_job", sent)
    good = send_raw(broker, "register_job", {**sent, "job_id": "job-good", "meta": {"b": 2}})
    drain(broker, worker, fail_fast=False)
    # Then the job it fails on is dead at once, its error naming the kind and the upgrade, its
    # payload kept as it was sent; the other job ran
    service = epq.QueueService(broker)
    dead = service.get_job(bad)
    assert dead is not None
    assert dead.state is epq.JobState.DISCARDED
    assert dead.attempt == 1
    error = dead.errors[-1]
    assert error.error_type == "PayloadUpgradeFailed"
    assert error.message.startswith("register_job payload upgrade ")
    assert "metadata_was_meta (1 of 1) failed: KeyError: 'meta'" in error.message
    assert dead.args == sent
    assert [r.job_id for r in received] == ["job-good"]
    assert service.get_job(good).state is epq.JobState.COMPLETED  # type: ignore[union-attr]
    # When the upgrade is fixed and the dead job retried, it runs
    fixed = True
    service.retry_dead(bad)
    drain(broker, worker)
    assert service.get_job(bad).state is epq.JobState.COMPLETED  # type: ignore[union-attr]
    assert [r.job_id for r in received] == ["job-good", "job-bad"]


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
