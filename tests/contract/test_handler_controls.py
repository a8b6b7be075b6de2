"""What a handler raises to steer its job, on every broker: ``epq.Snooze`` and ``epq.Discard``."""

from __future__ import annotations

import time
from typing import Any

import dramatiq
import pytest

import epq
import epq.actors
from epq.testing import HandlerRegistry
from tests.support.helpers import VALID, wait_for

S = epq.JobState


def record(broker: dramatiq.Broker, job_id: str) -> epq.JobRecord:
    found = epq.QueueService(broker).get_job(job_id)
    assert found is not None
    return found


def test_a_snoozed_job_keeps_its_attempts_and_its_key_and_runs_again_after_the_snooze(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a register_job handler (3 attempts) that fails once, then snoozes five times (the
    # first for 1 s, then briefly), then succeeds: seven runs, more than the job's attempts
    runs: list[float] = []

    def handler(request: Any) -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RuntimeError("endpoint down")
        if len(runs) == 2:
            raise epq.Snooze(1)
        if len(runs) <= 6:
            raise epq.Snooze(0.05)

    epq_handlers.register("register_job", handler)
    service = epq.QueueService(broker)
    job_id = epq.actors.register_job.send_with_options(
        kwargs=VALID["register_job"], backoff_ms=[50]
    ).message_id

    # When it snoozes the first time, its record shows it scheduled, its one spent attempt kept
    assert wait_for(lambda: record(broker, job_id).snoozes == 1, timeout=10)
    snoozed = record(broker, job_id)
    assert (snoozed.state, snoozed.attempt, snoozed.max_attempts) == (S.SCHEDULED, 1, 3)
    assert 0.5 < (snoozed.scheduled_at - snoozed.attempted_at).total_seconds() <= 1.5  # type: ignore[operator]
    assert [e.error_type for e in snoozed.errors] == ["RuntimeError"]  # a snooze is not an error
    # and it keeps its uniqueness lock while it waits
    assert service.enqueue_register_job(VALID["register_job"]).unique_skipped_as_duplicate is True

    # Then it runs again after the snooze, snoozes four more times, and completes on attempt 2
    assert wait_for(lambda: record(broker, job_id).state is S.COMPLETED, timeout=15)
    done = record(broker, job_id)
    assert (done.attempt, done.snoozes, len(runs)) == (2, 5, 7)
    assert runs[2] - runs[1] >= 0.9
    assert [e.attempt for e in done.errors] == [1]


def test_a_snooze_is_not_a_retry_a_job_may_snooze_past_its_attempts(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a handler that always snoozes
    runs: list[int] = []

    def handler(request: Any) -> None:
        runs.append(1)
        raise epq.Snooze(0.02)

    epq_handlers.register("register_source", handler)
    job_id = epq.actors.register_source.send(**VALID["register_source"]).message_id
    # Then it runs far more often than its 3 attempts, and never spends one past the run it is in
    assert wait_for(lambda: len(runs) >= 8, timeout=15)
    snoozing = record(broker, job_id)
    assert snoozing.state in (S.SCHEDULED, S.AVAILABLE, S.RUNNING)
    assert snoozing.attempt <= 1
    assert snoozing.errors == []
    assert snoozing.snoozes >= 7
    assert epq.QueueService(broker).list_dead() == []


def test_a_discarded_job_is_dead_at_once_with_its_reason_and_its_key_is_free(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a handler that knows its job can never succeed
    runs: list[int] = []

    def handler(request: Any) -> None:
        runs.append(1)
        raise epq.Discard("the endpoint was deleted")

    epq_handlers.register("register_job", handler)
    service = epq.QueueService(broker)
    job_id = service.enqueue_register_job(VALID["register_job"]).job.id

    # Then it is dead after one run, with the reason as its error
    assert wait_for(lambda: record(broker, job_id).state is S.DISCARDED, timeout=10)
    dead = record(broker, job_id)
    assert (dead.attempt, len(runs)) == (1, 1)
    assert [(e.error_type, e.message) for e in dead.errors] == [("Discard", "the endpoint was deleted")]
    assert dead.finalized_at is not None
    assert [r.id for r in service.list_dead()] == [job_id]
    # and its unique key is freed (by the dead-lettering, which the worker's consumer does just
    # after the record): the same request is enqueued again
    assert wait_for(
        lambda: not service.enqueue_register_job(VALID["register_job"]).unique_skipped_as_duplicate, timeout=5
    )


def test_snooze_takes_a_number_of_seconds() -> None:
    assert epq.Snooze(2.5).delay == 2500


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "5"])
def test_snooze_refuses_anything_but_a_number_of_seconds(bad: Any) -> None:
    with pytest.raises(ValueError, match="seconds"):
        epq.Snooze(bad)
