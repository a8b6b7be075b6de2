"""Per-kind time limits on every broker, with a real worker: a handler past its kind's limit is
interrupted, recorded as a failed attempt saying so, and retried by its kind's rules."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest

import epq
import epq.actors
from epq.settings import reset_settings
from epq.testing import HandlerRegistry, reset
from tests.support.helpers import VALID, wait_for

S = epq.JobState


def test_each_kind_gets_its_time_limit_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    epq.setup("stub://")
    assert epq.actors.index_endpoint.options["time_limit"] == 120_000  # River's: 2 min, 1 min
    assert {
        epq.actors.register_job.options["time_limit"],
        epq.actors.register_source.options["time_limit"],
    } == {60_000}
    reset()
    monkeypatch.setenv("EPQ_INDEX_TIME_LIMIT", "5")
    monkeypatch.setenv("EPQ_REGISTER_TIME_LIMIT", "PT1.5S")
    reset_settings()
    epq.setup("stub://")
    assert epq.actors.index_endpoint.options["time_limit"] == 5_000
    assert epq.actors.register_dynamic_trigger.options["time_limit"] == 1_500


@pytest.fixture
def one_second_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """register_* kinds limited to 1 s (set before ``broker`` builds the broker)."""
    monkeypatch.setenv("EPQ_REGISTER_TIME_LIMIT", "1")


@pytest.fixture
def booted_worker(broker: dramatiq.Broker) -> Iterator[dramatiq.Worker]:
    """A worker whose process has booted as ``dramatiq``/``epq worker`` boot one: Dramatiq's
    ``TimeLimit`` starts watching the worker threads then."""
    broker.emit_after("process_boot")
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    yield worker
    worker.stop()


def test_a_handler_past_its_time_limit_is_stopped_near_it_recorded_and_retried(
    one_second_limit: None,
    broker: dramatiq.Broker,
    booted_worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
) -> None:
    # Given a register_job handler (limit 1 s) that would run for a minute the first time
    runs: list[tuple[float, float]] = []

    def handler(request: Any) -> None:
        started = time.monotonic()
        try:
            if not runs:
                for _ in range(600):  # Python code between the sleeps: interruptible
                    time.sleep(0.1)
        finally:
            runs.append((started, time.monotonic()))

    epq_handlers.register("register_job", handler)
    job_id = epq.actors.register_job.send_with_options(
        kwargs=VALID["register_job"], backoff_ms=[50]
    ).message_id

    # Then the first run is stopped near the limit (Dramatiq checks once a second), the attempt
    # is recorded as failed with a clear error, and the retry completes
    assert wait_for(lambda: epq.QueueService(broker).get_job(job_id).state is S.COMPLETED, timeout=20)  # type: ignore[union-attr]
    first_started, first_stopped = runs[0]
    assert 0.9 <= first_stopped - first_started < 2.5
    record = epq.QueueService(broker).get_job(job_id)
    assert record is not None
    assert record.attempt == 2
    assert [(e.attempt, e.error_type) for e in record.errors] == [(1, "TimeLimitExceeded")]
    assert record.errors[0].message == "interrupted: the handler ran past its time limit of 1 s"


def test_a_handler_always_past_its_limit_spends_its_attempts_and_is_dead(
    one_second_limit: None,
    broker: dramatiq.Broker,
    booted_worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
) -> None:
    def handler(request: Any) -> None:
        while True:
            time.sleep(0.05)

    epq_handlers.register("register_source", handler)
    job_id = epq.actors.register_source.send_with_options(
        kwargs=VALID["register_source"], backoff_ms=[50]
    ).message_id
    assert wait_for(lambda: epq.QueueService(broker).get_job(job_id).state is S.DISCARDED, timeout=20)  # type: ignore[union-attr]
    record = epq.QueueService(broker).get_job(job_id)
    assert record is not None
    assert record.attempt == 3
    assert [e.error_type for e in record.errors] == ["TimeLimitExceeded"] * 3
