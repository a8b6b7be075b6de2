"""Durable delayed execution on every broker: run_at, delay, retries, the promoter."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq

import epq
import epq.actors
from epq.backends.memory import FakeClock
from epq.schedule import promote_due
from epq.testing import HandlerRegistry, backend, drain
from tests.support.helpers import VALID, message_count, total_waiting, wait_for


class StartTimes:
    """A handler that notes when each job started (wall clock)."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.lock = threading.Lock()

    def __call__(self, request: Any) -> None:
        message = dramatiq.middleware.CurrentMessage.get_current_message()
        with self.lock:
            self.started[message.message_id] = time.time()


def store() -> Any:
    return backend().state


def unacked_in_worker(worker: dramatiq.Worker) -> int:
    """Messages a worker holds in memory waiting for their time (Dramatiq's delay queue)."""
    return sum(c.delay_queue.qsize() for c in worker.consumers.values())


def test_run_at_two_seconds_ahead_starts_between_2_and_3_seconds_later(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    starts = StartTimes()
    epq_handlers.register("register_job", starts)
    time.sleep(0.3)  # let the worker settle into idle polling

    sent_at = time.time()
    run_at = datetime.fromtimestamp(sent_at, tz=timezone.utc) + timedelta(seconds=2)
    result = epq.QueueService(broker).enqueue_register_job({**VALID["register_job"], "run_at": run_at})

    assert result.job.state is epq.JobState.SCHEDULED
    assert result.job.scheduled_at == run_at
    assert wait_for(lambda: result.job.id in starts.started, timeout=5)
    waited = starts.started[result.job.id] - sent_at
    assert 2.0 <= waited <= 3.0, f"started {waited:.3f} s after enqueue"


def test_a_past_run_at_runs_at_once(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    starts = StartTimes()
    epq_handlers.register("register_source", starts)
    sent_at = time.time()
    past = datetime.now(timezone.utc) - timedelta(days=1)
    result = epq.QueueService(broker).enqueue_register_source({**VALID["register_source"], "run_at": past})

    assert result.job.state is epq.JobState.AVAILABLE
    assert wait_for(lambda: result.job.id in starts.started, timeout=5)
    assert starts.started[result.job.id] - sent_at < 1.0
    assert store().schedule_size() == 0


def test_scheduled_jobs_wait_in_the_state_store_not_in_the_broker_or_a_worker(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    received = epq_handlers.record("index_endpoint")
    in_an_hour = datetime.now(timezone.utc) + timedelta(hours=1)
    svc = epq.QueueService(broker)
    for i in range(50):
        fields = {**VALID["index_endpoint"], "endpoint_id": f"00000000-0000-4000-8000-{i:012d}"}
        assert (
            svc.enqueue_index_endpoint({**fields, "run_at": in_an_hour}).job.state is epq.JobState.SCHEDULED
        )
    time.sleep(0.5)  # give the worker every chance to pick something up

    assert store().schedule_size() == 50
    assert total_waiting(broker) == 0  # nothing on any queue, delay queues included
    assert unacked_in_worker(worker) == 0
    assert received == []


def test_send_with_a_delay_uses_the_schedule(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    received = epq_handlers.record("register_dynamic_trigger")
    epq.actors.register_dynamic_trigger.send_with_options(kwargs=VALID["register_dynamic_trigger"], delay=300)
    assert store().schedule_size() == 1
    assert message_count(broker, "default.DQ") == 0
    assert wait_for(lambda: len(received) == 1, timeout=5)
    assert wait_for(lambda: store().schedule_size() == 0)


def test_retry_backoff_goes_through_the_schedule(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    calls: list[float] = []

    def fails_once(request: Any) -> None:
        calls.append(time.time())
        if len(calls) == 1:
            raise RuntimeError("first attempt fails")

    epq_handlers.register("register_job", fails_once)
    epq.actors.register_job.send_with_options(kwargs=VALID["register_job"], backoff_ms=[800])

    assert wait_for(lambda: len(calls) == 1)
    assert wait_for(lambda: store().schedule_size() == 1)
    assert message_count(broker, "default.DQ") == 0
    assert unacked_in_worker(worker) == 0
    assert wait_for(lambda: len(calls) == 2, timeout=5)
    assert 0.8 * 0.75 <= calls[1] - calls[0] <= 0.8 * 1.25 + 0.6


def test_the_stub_schedule_follows_the_fake_clock(
    epq_broker: dramatiq.Broker,
    epq_worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
    epq_clock: FakeClock,
) -> None:
    # Given a job due in an hour by the fake clock
    received = epq_handlers.record("register_dynamic_schedule")
    run_at = datetime.fromtimestamp(epq_clock(), tz=timezone.utc) + timedelta(hours=1)
    result = epq.QueueService().enqueue_register_dynamic_schedule(
        {**VALID["register_dynamic_schedule"], "run_at": run_at}
    )
    assert result.job.state is epq.JobState.SCHEDULED
    # When 59 minutes pass nothing runs; when the hour is up, it runs
    epq_clock.advance(59 * 60)
    drain(epq_broker, epq_worker)
    assert received == []
    epq_clock.advance(61)
    assert wait_for(lambda: len(received) == 1, timeout=5)
    drain(epq_broker, epq_worker)
    assert len(received) == 1


def test_retries_on_the_stub_follow_the_fake_clock(
    epq_broker: dramatiq.Broker,
    epq_worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
    epq_clock: FakeClock,
) -> None:
    calls: list[int] = []

    def fails_once(request: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first attempt fails")

    epq_handlers.register("register_job", fails_once)
    epq.actors.register_job.send(**VALID["register_job"])  # the real backoff: 10 s ±25 %
    assert wait_for(lambda: len(calls) == 1)
    drain(epq_broker, epq_worker, fail_fast=False)  # the retry is left waiting, on purpose
    assert len(calls) == 1
    epq_clock.advance(7)  # less than 10 s - 25 %
    drain(epq_broker, epq_worker)
    assert len(calls) == 1
    epq_clock.advance(6)  # past 10 s + 25 %
    drain(epq_broker, epq_worker)
    assert len(calls) == 2


def test_promote_due_moves_only_due_messages(broker: dramatiq.Broker) -> None:
    svc = epq.QueueService(broker)
    now = datetime.now(timezone.utc)
    for i, offset in enumerate((-5, -1, 3600)):
        fields = {**VALID["register_job"], "job_id": f"j{i}", "run_at": now + timedelta(seconds=offset)}
        svc.enqueue_register_job(fields)
    # the first two were due at enqueue time, so they never waited
    assert message_count(broker, "default") == 2
    assert store().schedule_size() == 1
    moved, next_due = promote_due(broker, store())
    assert moved == 0
    assert next_due is not None
    assert next_due > store().now_ms() + 3500 * 1000
