"""Priority 1-4 holds across a whole queue, on every broker.

The priority work queue is in ``tests/unit/test_priority_work_queue.py``, the lanes of Redis and
the queues of RabbitMQ in ``tests/redis/`` and ``tests/rabbitmq/``, and worker processes in
``tests/e2e/test_priority_processes.py``.
"""

from __future__ import annotations

from collections import Counter

import dramatiq

import epq
from epq.testing import HandlerRegistry
from tests.support.helpers import (
    BACKLOG,
    FACADE,
    MAX_STARTED_BEFORE_URGENT,
    VALID,
    StartLog,
    keyed_request,
    wait_for,
)


def test_a_queue_is_served_in_priority_order_across_kinds(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    # Given a queue holding jobs of every kind, with default and per-request priorities, mixed
    log = StartLog(epq_handlers)
    svc = epq.QueueService(broker)
    expected: list[tuple[int, int, str]] = []
    n = 0
    for priority in (4, None, 3, 1, 4, 2, None, 1, 3):
        for kind in VALID:
            job = getattr(svc, FACADE[kind])(keyed_request(kind, n, priority)).job
            assert job.priority == (priority or 2)  # the kind's default is 2
            expected.append((job.priority, n, job.id))
            n += 1
    # When one worker thread works through it
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        assert wait_for(lambda: len(log.started) == len(expected), timeout=30)
    finally:
        worker.stop()
    # Then every job ran by priority, FIFO within a priority, whatever its kind
    assert log.started == [job_id for _, _, job_id in sorted(expected)]


def test_a_new_priority_1_job_overtakes_a_backlog_of_1000(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    # Given a backlog of 1,000 priority-4 jobs of 10 ms
    log = StartLog(epq_handlers, work_s=0.01)
    svc = epq.QueueService(broker)
    backlog = [svc.enqueue_register_job(keyed_request("register_job", n, 4)).job.id for n in range(BACKLOG)]
    # and 8 worker threads busy with it
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=8)
    worker.start()
    try:
        assert wait_for(lambda: len(log.started) >= 8, timeout=10)
        # When a priority-1 job is enqueued
        urgent = svc.enqueue_register_job(keyed_request("register_job", BACKLOG, 1)).job.id
        # Then it starts before at least 950 of the backlog has started
        assert wait_for(lambda: urgent in log.started, timeout=30)
        started_before = log.started.index(urgent)
        print(f"\n{type(broker).__name__}: {started_before} of the backlog started before the priority-1 job")
        assert started_before <= MAX_STARTED_BEFORE_URGENT, started_before
        # and the rest of the backlog still runs, each job once
        assert wait_for(lambda: len(log.started) == BACKLOG + 1, timeout=60)
    finally:
        worker.stop()
    assert Counter(log.started) == Counter([*backlog, urgent])


def test_a_plain_actors_broker_priority_orders_it_among_epqs_four_on_every_broker(
    broker: dramatiq.Broker,
) -> None:
    # Given plain Dramatiq messages with RabbitMQ broker_priority values (higher first), some
    # past epq's four, and one without
    started: list[str] = []

    @dramatiq.actor(broker=broker, queue_name="default")
    def plain(name: str) -> None:
        started.append(name)

    sent = [("p0", 0), ("p9", 9), ("none", None), ("p2", 2), ("p4", 4), ("p1", 1), ("p3", 3)]
    for name, priority in sent:
        options = {} if priority is None else {"broker_priority": priority}
        plain.send_with_options(args=(name,), **options)
    # When one worker thread works through them
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        assert wait_for(lambda: len(started) == len(sent), timeout=30)
    finally:
        worker.stop()
    # Then 4 and above run first (lane 1, in the order sent), then 3 and those without one (lane 2,
    # the default), then 2 (lane 3), then 1 and below (lane 4), on every broker alike
    assert started == ["p9", "p4", "none", "p3", "p2", "p0", "p1"]
