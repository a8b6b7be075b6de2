"""On RabbitMQ a consumer that releases serial keys with its batch of acks publishes the next
jobs itself, on a connection of its own, taking RabbitMQ's confirms as they come
(``epq.backends.rabbitmq.broker.HandOverPublisher``): the next jobs' records are made available
before they are published, the claims of confirmed messages are forgotten with the next flush, a
message RabbitMQ returns goes through the broker's ``enqueue`` instead, and a consumer that
closes settles what it published."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pika.exceptions
import pytest

import epq
from epq.middleware.common import find_middleware
from epq.schedule import CLAIM_LEASE_MS
from epq.serial import SerialKeys
from epq.testing import HandlerRegistry, backend
from tests.support.helpers import ENDPOINT, VALID, message_count, wait_for

pytestmark = pytest.mark.rabbitmq

HAND_OVER_THREAD = "epq-serial-handover"


def _enqueue(broker: dramatiq.Broker, n: int) -> list[str]:
    """``n`` registrations of one endpoint (one serial key), in order."""
    svc = epq.QueueService(broker)
    requests = [("register_job", {**VALID["register_job"], "job_id": f"hand-over-{i}"}) for i in range(n)]
    return [r.job.id for r in svc.enqueue_many(requests)]


def _hand_over_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == HAND_OVER_THREAD and t.is_alive()}


def _run(broker: dramatiq.Broker, ids: list[str]) -> set[threading.Thread]:
    """Run the jobs ``ids`` with a worker of two threads, until they all completed; the hand-over
    threads alive then, before the worker stops (and stops them)."""
    svc = epq.QueueService(broker)
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        assert wait_for(lambda: {svc.get_job(i).state for i in ids} == {epq.JobState.COMPLETED}, timeout=30)  # type: ignore[union-attr]
        return _hand_over_threads()
    finally:
        worker.stop()


def test_the_consumer_publishes_each_next_job_and_forgets_its_claim_once_confirmed(
    serial_keys_on: None, rabbitmq_broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    # Given five jobs of one endpoint
    received = epq_handlers.record("register_job")
    ids = _enqueue(rabbitmq_broker, 5)
    threads_before = _hand_over_threads()
    # When a worker runs them
    threads_then = _run(rabbitmq_broker, ids)
    # Then they ran one by one, in order, each next one published by the consumer that acked the
    # one before (no hand-over thread was needed), and no claim is left to be published again
    assert [r.job_id for r in received] == [f"hand-over-{i}" for i in range(5)]
    assert threads_then <= threads_before
    state = backend(rabbitmq_broker).state
    assert state.schedule_claimed() == 0
    assert state.schedule_size() == 0
    assert message_count(rabbitmq_broker, "default") == 0


class _SeesEnqueues(dramatiq.Middleware):
    """An application's middleware that listens to enqueues."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        self.seen.append(message.message_id)


def test_an_applications_middleware_that_listens_to_enqueues_sees_every_hand_over(
    serial_keys_on: None, rabbitmq_broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    # Given a middleware of the application's that listens to enqueues, and three jobs of one
    # endpoint
    sees = _SeesEnqueues()
    rabbitmq_broker.add_middleware(sees)
    epq_handlers.record("register_job")
    ids = _enqueue(rabbitmq_broker, 3)
    sees.seen.clear()
    # When a worker runs them
    _run(rabbitmq_broker, ids)
    # Then each of them went to its queue through the broker's enqueue (the first promoted from
    # the schedule, the others handed over), so the middleware saw it
    assert set(ids) <= set(sees.seen)
    assert backend(rabbitmq_broker).state.schedule_claimed() == 0


@pytest.fixture
def claimed_next(
    serial_keys_on: None, rabbitmq_broker: dramatiq.Broker
) -> Iterator[tuple[str, tuple[str, bytes]]]:
    """Two jobs of one endpoint enqueued, the first released as if it had run: the second's id
    and its message, claimed for its publish. The hand-over threads are stopped afterwards."""
    first, second = _enqueue(rabbitmq_broker, 2)
    released = backend(rabbitmq_broker).state.serial_release(ENDPOINT, first, lease_ms=CLAIM_LEASE_MS)
    assert released.claimed is not None
    yield second, released.claimed
    keys = find_middleware(rabbitmq_broker, SerialKeys)
    assert keys is not None
    keys.stop_hand_overs()


def _queued_ids(broker: dramatiq.Broker, queue: str) -> list[str]:
    """The ids of the messages waiting in ``queue`` (read and left there; none when the queue does
    not exist)."""
    channel = broker.connection.channel()  # type: ignore[attr-defined]
    ids: list[str] = []
    try:
        while True:
            method, _properties, body = channel.basic_get(queue)
            if method is None:
                return ids
            ids.append(dramatiq.Message.decode(body).message_id)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 404:
            raise
        return ids
    finally:
        if channel.is_open:
            channel.close()  # (what it read goes back to the queue)


def test_a_consumer_that_closes_waits_for_the_confirms_of_its_hand_overs_and_forgets_their_claims(
    claimed_next: tuple[str, tuple[str, bytes]], rabbitmq_broker: dramatiq.Broker
) -> None:
    # Given a consumer that publishes the next job of a released key
    job_id, claimed = claimed_next
    consumer = rabbitmq_broker.consume("default")
    assert consumer.hand_overs.accept(claimed)
    consumer.hand_overs.publish_accepted()
    # When it closes at once (before RabbitMQ's confirm has been read)
    consumer.close()
    # Then the message is on its queue and its claim is forgotten (no promoter publishes it
    # again when the lease ends)
    assert backend(rabbitmq_broker).state.schedule_claimed() == 0
    assert job_id in _queued_ids(rabbitmq_broker, "default")


def test_a_hand_over_returned_as_unroutable_is_published_through_enqueue_which_declares_its_queue(
    claimed_next: tuple[str, tuple[str, bytes]], rabbitmq_broker: dramatiq.Broker
) -> None:
    # Given a claimed next job whose queue does not exist on RabbitMQ (deleted since)
    job_id, (entry, data) = claimed_next
    gone = f"serial-gone-{job_id[:8]}"
    message = dramatiq.Message.decode(data).copy(queue_name=gone)
    consumer = rabbitmq_broker.consume("default")
    try:
        # When the consumer publishes it
        assert consumer.hand_overs.accept((entry, message.encode()))
        consumer.hand_overs.publish_accepted()
        consumer.close()
        # Then RabbitMQ returns it, and the hand-over threads publish it through the broker's
        # enqueue, which declares the queue: the job is not lost, and its claim is forgotten
        assert wait_for(lambda: job_id in _queued_ids(rabbitmq_broker, gone), timeout=10)
        assert wait_for(lambda: backend(rabbitmq_broker).state.schedule_claimed() == 0, timeout=10)
    finally:
        for queue in (gone, f"{gone}.DQ", f"{gone}.XQ"):
            channel = rabbitmq_broker.connection.channel()  # type: ignore[attr-defined]
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):  # (not declared)
                channel.queue_delete(queue)
            if channel.is_open:
                channel.close()


def test_a_handed_over_job_that_failed_at_once_keeps_its_record_waiting_for_its_retry(
    serial_keys_on: None, rabbitmq_broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    # Given two jobs of one endpoint, the second failing at once (its retry waits 10 s)
    def handler(request: Any) -> None:
        if request.job_id == "hand-over-1":
            raise ValueError("the endpoint answered 500")

    epq_handlers.register("register_job", handler)
    first, second = _enqueue(rabbitmq_broker, 2)
    svc = epq.QueueService(rabbitmq_broker)
    worker = dramatiq.Worker(rabbitmq_broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        # When the first has run and handed its key over, and the second has failed
        assert wait_for(lambda: svc.get_job(second).state is epq.JobState.RETRYABLE, timeout=30)  # type: ignore[union-attr]
        # Then its record keeps saying it waits for its retry (the hand-over made it available
        # before it was published, not after: a late move would undo the failure's)
        time.sleep(0.5)
        assert svc.get_job(second).state is epq.JobState.RETRYABLE  # type: ignore[union-attr]
        assert svc.get_job(first).state is epq.JobState.COMPLETED  # type: ignore[union-attr]
    finally:
        worker.stop()
