"""The outage rule in a worker, on every broker: a job whose start cannot be written waits for the
state store, and a worker that stops meanwhile gives the message back (``epq.outage``)."""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
import pytest
import redis

import epq
from epq.testing import HandlerRegistry, backend
from tests.support.helpers import VALID, message_count, wait_for


def test_a_job_whose_start_cannot_be_written_goes_back_to_its_queue_when_the_worker_stops(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a state store whose records cannot be reached when a worker starts a job
    received = epq_handlers.record("register_job")
    svc = epq.QueueService(broker)
    job_id = svc.enqueue_register_job(VALID["register_job"]).job.id
    records = backend(broker).records
    tried = threading.Event()

    def start_down(*args: Any, **kwargs: Any) -> None:
        tried.set()
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(records, "start", start_down)
    monkeypatch.setattr(records, "start_many", start_down)  # (starts asked for together)
    if hasattr(broker, "start_record"):  # Redis with the records in the broker's server
        monkeypatch.setattr(broker, "start_record", start_down)
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    # When the worker stops while its thread waits for the store
    try:
        assert tried.wait(10)
    finally:
        worker.stop()
    monkeypatch.undo()
    # Then the job did not run, is not dead, counted no attempt, and waits in its queue again
    assert received == []
    assert wait_for(lambda: message_count(broker, "default") == 1)
    assert message_count(broker, "default.XQ") == 0
    record = svc.get_job(job_id)
    assert record is not None
    assert (record.state, record.attempt) == (epq.JobState.AVAILABLE, 0)
