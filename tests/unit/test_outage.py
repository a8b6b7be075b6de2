"""The outage rule in a worker: outcomes wait for an unreachable state store, and a worker that
stops meanwhile gives the message back (``epq.outage``)."""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
import pytest
import redis

import epq
import epq.actors
from epq import outage
from epq.testing import HandlerRegistry, backend
from tests.support.helpers import VALID, message_count, wait_for


def test_until_written_waits_while_unreachable_then_writes() -> None:
    tries: list[int] = []

    def write() -> str:
        tries.append(1)
        if len(tries) < 4:
            raise redis.ConnectionError("Connection refused")
        return "written"

    outage.worker_booting()
    assert outage.until_written(write, "testing") == "written"
    assert len(tries) == 4


def test_until_written_raises_other_errors_at_once() -> None:
    tries: list[int] = []

    def write() -> None:
        tries.append(1)
        raise redis.ResponseError("WRONGTYPE")

    outage.worker_booting()
    with pytest.raises(redis.ResponseError):
        outage.until_written(write, "testing")
    assert len(tries) == 1


def test_until_written_gives_up_when_the_worker_stops() -> None:
    def write() -> None:
        raise redis.ConnectionError("Connection refused")

    outage.worker_booting()
    timer = threading.Timer(0.3, outage.worker_stopping)
    timer.start()
    try:
        with pytest.raises(epq.StateUnavailable, match="worker is stopping"):
            outage.until_written(write, "testing")
    finally:
        timer.cancel()
        outage.worker_booting()


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
