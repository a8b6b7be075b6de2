"""What the tests share: valid requests of every kind, and broker-agnostic probes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage

import epq
from epq.testing import HandlerRegistry

ENDPOINT = "6f1d1c1e-4a5b-4c3d-9e8f-0a1b2c3d4e5f"

VALID: dict[str, dict[str, Any]] = {
    "index_endpoint": {"endpoint_id": ENDPOINT, "source": "API", "reason": "r", "source_data": {"k": [1, 2]}},
    "register_job": {"endpoint_id": ENDPOINT, "job_id": "job-1", "job_metadata": {"version": "1"}},
    "register_source": {"endpoint_id": ENDPOINT, "source_id": "src-1", "source_metadata": {"a": 1}},
    "register_dynamic_trigger": {"endpoint_id": ENDPOINT, "trigger_id": "t-1", "trigger_metadata": {}},
    "register_dynamic_schedule": {
        "endpoint_id": ENDPOINT,
        "schedule_id": "s-1",
        "schedule_metadata": {"cron": "* *"},
    },
}
FACADE = {
    "index_endpoint": "enqueue_index_endpoint",
    "register_job": "enqueue_register_job",
    "register_source": "enqueue_register_source",
    "register_dynamic_trigger": "enqueue_register_dynamic_trigger",
    "register_dynamic_schedule": "enqueue_register_dynamic_schedule",
}


def actor(kind: str) -> Any:
    """The epq actor of ``kind`` (``epq.actors`` sets epq up from the settings when first used)."""
    return getattr(epq.actors, kind)


#: The priority bar from DESIGN.md: a backlog of 1,000 priority-4 jobs of 10 ms, 8 busy threads.
BACKLOG = 1000
#: A priority-1 job enqueued after the backlog starts before at least 950 of it has started.
MAX_STARTED_BEFORE_URGENT = 50


def keyed_request(kind: str, n: int, priority: int | None) -> dict[str, Any]:
    """A valid request of ``kind`` with its own uniqueness key (``n``)."""
    fields = dict(VALID[kind])
    if kind == "index_endpoint":
        fields["endpoint_id"] = str(uuid.UUID(int=n + 1))
    else:
        id_field = {
            "register_job": "job_id",
            "register_source": "source_id",
            "register_dynamic_trigger": "trigger_id",
            "register_dynamic_schedule": "schedule_id",
        }[kind]
        fields[id_field] = f"{id_field}-{n}"
    if priority is not None:
        fields["priority"] = priority
    return fields


class StartLog:
    """Handlers (of every kind) that note which job started, in order, then work for ``work_s``."""

    def __init__(self, handlers: HandlerRegistry, work_s: float = 0.0) -> None:
        self.started: list[str] = []
        self.priorities: list[int] = []
        self.lock = threading.Lock()
        self.work_s = work_s
        for kind in VALID:
            handlers.register(kind, self)

    def __call__(self, request: Any) -> None:
        message = CurrentMessage.get_current_message()
        with self.lock:
            self.started.append(message.message_id)
            self.priorities.append(message.options.get("epq_priority"))
        if self.work_s:
            time.sleep(self.work_s)


def soon() -> str:
    """A ``run_at`` 100 ms from now."""
    return (datetime.now(timezone.utc) + timedelta(milliseconds=100)).isoformat()


def index_request(n: int, **extra: Any) -> epq.EnqueueIndexEndpointRequest:
    """An index_endpoint request with its own uniqueness key (``n``)."""
    return epq.EnqueueIndexEndpointRequest(endpoint_id=uuid.UUID(int=n + 1), source="API", **extra)


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
