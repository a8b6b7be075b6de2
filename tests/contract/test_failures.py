"""Error paths: the state store failing, retries that cannot be scheduled, odd messages.

Those of Redis alone are in ``tests/redis/test_redis_failures.py``.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import pytest
import redis

import epq
import epq.actors
from epq.backends.memory import FakeClock
from epq.backends.redis.connections import ScriptStream
from epq.testing import HandlerRegistry, backend, drain
from tests.support.helpers import VALID, message_count, total_waiting, wait_for


def state() -> Any:
    return backend().state


def test_a_state_store_failure_at_enqueue_is_an_error_and_publishes_nothing(
    broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*args: Any, **kwargs: Any) -> None:
        raise redis.TimeoutError("state store timed out")

    stores = backend(broker)
    monkeypatch.setattr(stores.state, "acquire_unique", down)
    monkeypatch.setattr(stores.records, "create", down)
    # on Redis the state lives in the broker's server, and one script writes the record and the
    # message together: a failure there is the broker's
    fused = stores.fused
    if fused:
        monkeypatch.setattr(ScriptStream, "_send", down)  # the script call never reaches Redis
    with pytest.raises(epq.BrokerUnavailable, match="could not enqueue" if fused else "state store"):
        epq.QueueService(broker).enqueue_index_endpoint(VALID["index_endpoint"])
    with pytest.raises(epq.BrokerUnavailable if fused else epq.StateUnavailable):
        epq.actors.index_endpoint.send(**VALID["index_endpoint"])
    assert total_waiting(broker) == 0


def _handler_fails(request: Any) -> None:
    raise RuntimeError("handler failed")


def test_a_retry_waits_for_an_unreachable_state_store_and_is_scheduled_once_it_is_back(
    broker: dramatiq.Broker,
    worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a failing handler, and a state store whose schedule is unreachable for a while
    store = state()
    real_add, tries = store.schedule_add, []

    def schedule_blinks(*args: Any, **kwargs: Any) -> Any:
        tries.append(1)
        if len(tries) <= 4:
            raise redis.ConnectionError("schedule unavailable")
        return real_add(*args, **kwargs)

    epq_handlers.register("register_job", _handler_fails)
    monkeypatch.setattr(store, "schedule_add", schedule_blinks)
    # When the job fails
    message = epq.actors.register_job.send(**VALID["register_job"])
    # Then its retry is scheduled once the store answers again; nothing is dead-lettered
    assert wait_for(lambda: store.schedule_size() == 1, timeout=10)
    assert len(tries) == 5
    record = epq.QueueService(broker).get_job(message.message_id)
    assert record is not None
    assert record.state is epq.JobState.RETRYABLE
    assert message_count(broker, "default.XQ") == 0


def test_a_retry_that_cannot_be_scheduled_for_another_reason_is_dead_lettered_not_lost(
    broker: dramatiq.Broker,
    worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def schedule_broken(*args: Any, **kwargs: Any) -> None:
        raise redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    epq_handlers.register("register_job", _handler_fails)
    monkeypatch.setattr(state(), "schedule_add", schedule_broken)
    message = epq.actors.register_job.send(**VALID["register_job"])

    assert wait_for(lambda: message_count(broker, "default.XQ") == 1, timeout=10)
    record = epq.QueueService(broker).get_job(message.message_id)
    assert record is not None
    assert record.state is epq.JobState.DISCARDED


def test_positional_arguments_on_the_wire_are_dead_lettered_at_once(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    received = epq_handlers.record("register_job")
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="default", actor_name="register_job", args=(1, 2), kwargs={}, options={"backoff_ms": [1]}
    )
    broker.enqueue(message)
    assert wait_for(lambda: message_count(broker, "default.XQ") == 1, timeout=10)
    record = epq.QueueService(broker).get_job(message.message_id)
    assert record is not None
    assert (record.state, record.attempt, record.errors[-1].error_type) == (
        epq.JobState.DISCARDED,
        1,
        "InvalidPayload",
    )
    assert received == []


def test_a_duplicate_reports_the_existing_jobs_real_record(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    epq_handlers.record("index_endpoint")
    svc = epq.QueueService(broker)
    first = svc.enqueue_index_endpoint({**VALID["index_endpoint"], "reason": "first"})
    drain(broker, worker)

    again = svc.enqueue_index_endpoint({**VALID["index_endpoint"], "reason": "second"})

    assert again.unique_skipped_as_duplicate
    assert again.job.id == first.job.id
    assert again.job.state is epq.JobState.COMPLETED
    assert again.job.attempt == 1
    assert again.job.args["reason"] == "first"


def test_a_job_cancelled_days_ahead_is_still_skipped_when_due(
    epq_broker: dramatiq.Broker,
    epq_worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
    epq_clock: FakeClock,
) -> None:
    received = epq_handlers.record("register_dynamic_schedule")
    svc = epq.QueueService()
    run_at = datetime.fromtimestamp(epq_clock(), tz=timezone.utc) + timedelta(days=2)
    result = svc.enqueue_register_dynamic_schedule({**VALID["register_dynamic_schedule"], "run_at": run_at})
    svc.cancel_job(result.job.id)

    epq_clock.advance(2 * 24 * 3600 + 1)  # longer than the 24 h a finished record is kept
    drain(epq_broker, epq_worker)

    assert received == []
    record = svc.get_job(result.job.id)
    assert record is not None
    assert record.state is epq.JobState.CANCELLED


def test_a_job_skipped_by_another_middleware_is_discarded_with_its_payload_and_frees_its_key(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    # Given a job whose max_age (Dramatiq's AgeLimit) has passed by the time a worker fetches it
    received = epq_handlers.record("register_job")
    message = epq.actors.register_job.send_with_options(kwargs=VALID["register_job"], max_age=1)
    time.sleep(0.05)
    # When a worker fetches it
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    svc = epq.QueueService(broker)
    try:
        # Then it does not run, its record says discarded (with its payload), and its key is free again
        assert wait_for(lambda: svc.get_job(message.message_id).state is epq.JobState.DISCARDED)  # type: ignore[union-attr]
    finally:
        worker.stop()
    assert received == []
    assert svc.get_job(message.message_id).args == VALID["register_job"]  # type: ignore[union-attr]
    assert svc.enqueue_register_job(VALID["register_job"]).unique_skipped_as_duplicate is False
