"""``broker.join(queue)`` on every epq broker waits, as Dramatiq's own join does, for the queue's
messages in epq's schedule too (delays, retries), with Dramatiq's ``timeout``; on the stub broker
scheduled messages become due by ``epq_clock``. And a due message whose publish failed because the
broker was gone is given back to the schedule, due a second later, not when its claim's lease
ends (with a real RabbitMQ stopped and started again: ``tests/e2e/test_broker_outage.py``)."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import pytest
from dramatiq.errors import ConnectionClosed, QueueJoinTimeout

import epq
import epq.actors
from epq.backends.memory import FakeClock
from epq.schedule import CLAIM_LEASE_MS, RETRY_PUBLISH_MS, promote_due
from epq.testing import HandlerRegistry, backend
from tests.support.helpers import VALID, message_count, wait_for


def test_join_waits_for_a_plain_actor_sent_with_a_delay(
    broker: dramatiq.Broker, worker: dramatiq.Worker
) -> None:
    ran: list[int] = []

    @dramatiq.actor(broker=broker, queue_name="default")
    def later(x: int) -> None:
        ran.append(x)

    later.send_with_options(args=(1,), delay=300)
    broker.join("default", timeout=10_000)
    worker.join()
    assert ran == [1]


def test_join_waits_for_a_plain_actors_retries(broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
    attempts: list[float] = []

    @dramatiq.actor(broker=broker, queue_name="default", max_retries=3, min_backoff=50, max_backoff=100)
    def flaky() -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise RuntimeError("not yet")

    flaky.send()
    broker.join("default", timeout=20_000)
    worker.join()
    assert len(attempts) == 3


def test_join_waits_for_an_epq_job_scheduled_a_moment_ahead(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    received = epq_handlers.record("register_job")
    run_at = datetime.now(timezone.utc) + timedelta(milliseconds=500)
    result = epq.QueueService(broker).enqueue_register_job({**VALID["register_job"], "run_at": run_at})
    assert result.job.state is epq.JobState.SCHEDULED
    broker.join("default", timeout=10_000)
    worker.join()
    assert len(received) == 1


def test_join_times_out_while_a_message_of_the_queue_waits_in_the_schedule(
    broker: dramatiq.Broker, worker: dramatiq.Worker
) -> None:
    @dramatiq.actor(broker=broker, queue_name="default")
    def much_later() -> None:
        pass

    much_later.send_with_options(delay=3_600_000)
    started = time.monotonic()
    with pytest.raises(QueueJoinTimeout):
        broker.join("default", timeout=300)
    assert time.monotonic() - started < 5


def test_join_on_the_stub_follows_the_fake_clock(
    epq_broker: dramatiq.Broker, epq_worker: dramatiq.Worker, epq_clock: FakeClock
) -> None:
    # Given a plain actor's message delayed by a minute of the fake clock
    ran: list[str] = []

    @dramatiq.actor(broker=epq_broker, queue_name="default")
    def in_a_minute() -> None:
        ran.append("ran")

    in_a_minute.send_with_options(delay=60_000)
    # When the fake clock moves past it while the test joins the queue
    timer = threading.Timer(0.3, lambda: epq_clock.advance(61))
    timer.start()
    try:
        epq_broker.join("default", timeout=10_000)
    finally:
        timer.cancel()
    epq_worker.join()
    # Then the join returned once it ran, well before a real minute
    assert ran == ["ran"]


class GoneOnce:
    """``broker.enqueue`` failing as if the broker's connection were gone, ``times`` times."""

    def __init__(self, broker: dramatiq.Broker, times: int) -> None:
        self.broker = broker
        self.left = times
        self.real = broker.enqueue

    def __call__(self, message: Any, *, delay: int | None = None) -> Any:
        if self.left > 0:
            self.left -= 1
            # (as Dramatiq's brokers raise it)
            raise ConnectionClosed(ConnectionError("the broker went away"))
        return self.real(message, delay=delay)


def test_a_due_message_whose_publish_found_the_broker_gone_is_due_again_a_second_later(
    broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job due now in the schedule, and a broker gone for the first publish
    store = backend().state
    svc = epq.QueueService(broker)
    run_at = datetime.now(timezone.utc) + timedelta(milliseconds=200)
    job_id = svc.enqueue_register_job({**VALID["register_job"], "run_at": run_at}).job.id
    time.sleep(0.3)
    gone = GoneOnce(broker, times=1)
    monkeypatch.setattr(broker, "enqueue", gone)
    monkeypatch.setattr(broker, "promote_due", lambda now_ms, limit: None, raising=False)

    # When the promoter's publish fails on it
    with pytest.raises(ConnectionClosed):
        promote_due(broker, store)

    # Then it is not left claimed for the lease: it is waiting, due again in about a second
    assert store.schedule_claimed() == 0
    assert store.schedule_size() == 1
    assert store.schedule_due(store.now_ms() + RETRY_PUBLISH_MS + 50) == 1
    assert store.schedule_due(store.now_ms() + RETRY_PUBLISH_MS // 2) == 0
    assert RETRY_PUBLISH_MS * 10 < CLAIM_LEASE_MS
    # and once the broker is back it goes out then
    assert wait_for(lambda: promote_due(broker, store)[0] == 1, timeout=5)
    assert message_count(broker, "default") == 1
    assert svc.get_job(job_id) is not None


def test_join_on_the_stub_with_fail_fast_raises_a_dead_lettered_messages_error(
    epq_broker: dramatiq.Broker, epq_worker: dramatiq.Worker
) -> None:
    # Given a plain actor that fails for good (no retries left)
    @dramatiq.actor(broker=epq_broker, queue_name="default", max_retries=0)
    def fails() -> None:
        raise RuntimeError("the endpoint answered 500")

    fails.send()
    # Then a join with fail_fast raises its error, as Dramatiq's stub broker does
    with pytest.raises(RuntimeError, match="answered 500"):
        epq_broker.join("default", fail_fast=True, timeout=10_000)
