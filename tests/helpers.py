"""Broker-agnostic probes used by the contract tests."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker


def served_queues(broker: dramatiq.Broker) -> list[str]:
    return sorted(q for q in broker.get_declared_queues() if not q.endswith((".DQ", ".XQ")))


def message_count(broker: dramatiq.Broker, queue: str) -> int:
    """Messages waiting in ``queue`` (a plain, ``.DQ`` or ``.XQ`` name) on any broker."""
    if isinstance(broker, StubBroker):
        if queue.endswith(".XQ"):
            return len(broker.dead_letters_by_queue[queue[: -len(".XQ")]])
        return broker.queues[queue].qsize()
    if isinstance(broker, RedisBroker):
        key = f"{broker.namespace}:{queue}"
        if queue.endswith(".XQ"):
            return int(broker.client.zcard(key))
        if queue.endswith(".DQ"):
            return int(broker.client.llen(key))
        return int(broker.waiting(queue))  # type: ignore[attr-defined]  # every priority lane
    if isinstance(broker, RabbitmqBroker):
        frame = broker.channel.queue_declare(queue, passive=True)
        return int(frame.method.message_count)
    raise TypeError(f"unknown broker {broker!r}")


def push_raw(broker: dramatiq.Broker, queue: str, data: bytes, rid: str | None = None) -> None:
    """Put ``data`` on ``queue`` as it is, as a foreign producer (or a corrupted message) would."""
    if isinstance(broker, StubBroker):
        broker.queues[queue].put(data)
    elif isinstance(broker, RedisBroker):
        rid = rid or str(uuid.uuid4())
        broker.client.hset(f"{broker.namespace}:{queue}.msgs", rid, data)
        broker.client.rpush(f"{broker.namespace}:{queue}.P2", rid)
    elif isinstance(broker, RabbitmqBroker):
        broker.channel.basic_publish("", queue, data, pika.BasicProperties(delivery_mode=2))
    else:
        raise TypeError(f"unknown broker {broker!r}")


def total_waiting(broker: dramatiq.Broker) -> int:
    """Messages waiting anywhere: every served queue and its delay and dead-letter queues."""
    total = 0
    for queue in served_queues(broker):
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            total += message_count(broker, name)
    return total


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def run_until_drained(broker: dramatiq.Broker, threads: int = 2) -> None:
    """Start a worker, let it run every waiting job (see ``epq.testing.drain``), stop it."""
    from epq.testing import drain

    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=threads)
    worker.start()
    try:
        drain(broker, worker)
    finally:
        worker.stop()
