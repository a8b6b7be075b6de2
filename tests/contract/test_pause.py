"""Pausing and resuming a queue, on every broker, with a real worker (``epq.pausing``): a paused
queue's jobs wait, not started (those a worker fetched already included), while other queues
run; once resumed, each runs once, highest priority first. ``QueueService.queues`` reports it."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import pytest
from dramatiq.middleware import CurrentMessage

import epq
from epq.testing import HandlerRegistry, drain
from tests.support.helpers import keyed_request, wait_for

S = epq.JobState
#: The longest a pause may take to reach a worker process (the contract: within a second).
PAUSE_LANDS_S = 1.0


class Starts:
    """A handler for register_job and register_source that notes each start (job id, queue,
    priority, in order); a job whose ``job_id`` is in ``blocking`` waits for ``release``."""

    def __init__(self, handlers: HandlerRegistry, blocking: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.lock = threading.Lock()
        self.order: list[tuple[str, str, int]] = []
        self.count: Counter[str] = Counter()
        self.blocking = blocking
        self.release = threading.Event()
        for kind in ("register_job", "register_source"):
            handlers.register(kind, self)

    def __call__(self, request: Any) -> None:
        message = CurrentMessage.get_current_message()
        with self.lock:
            self.order.append((message.message_id, message.queue_name, message.options["epq_priority"]))
            self.count[message.message_id] += 1
        if getattr(request, "job_id", None) in self.blocking:
            assert self.release.wait(10)

    def started(self, job_ids: list[str]) -> list[str]:
        with self.lock:
            return [j for j in job_ids if self.count[j]]


@pytest.fixture
def one_thread(broker: dramatiq.Broker) -> Iterator[dramatiq.Worker]:
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    yield worker
    worker.stop()


def _enqueue(service: epq.QueueService, n: int, priority: int, queue: str = "default") -> str:
    kind = "register_job" if queue == "default" else "register_source"
    request = {**keyed_request(kind, n, priority), "queue_name": queue}
    return service.enqueue(kind, request).job.id


def test_a_worker_started_while_a_queue_is_paused_starts_none_of_its_jobs_until_it_is_resumed(
    broker: dramatiq.Broker, one_thread: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given the default queue paused, and jobs of every priority waiting there and in events, and
    # one due there in a moment (promoted from the schedule into the paused queue)
    starts = Starts(epq_handlers)
    service = epq.QueueService(broker)
    assert service.pause_queue("default") is True
    paused = [_enqueue(service, n, priority) for n, priority in enumerate((4, 3, 1, 2, 4, 1))]
    soon = datetime.now(timezone.utc) + timedelta(milliseconds=200)
    request = {**keyed_request("register_job", 50, 4), "run_at": soon}
    paused.append(service.enqueue_register_job(request).job.id)
    others = [_enqueue(service, 100 + n, 2, "events") for n in range(3)]

    # When a worker starts
    one_thread.start()

    # Then the other queue's jobs run, and none of the paused queue's starts
    assert wait_for(lambda: len(starts.started(others)) == 3, timeout=10)
    time.sleep(PAUSE_LANDS_S)
    assert starts.started(paused) == []
    for job_id in paused:
        record = service.get_job(job_id)
        assert record is not None
        assert record.state is S.AVAILABLE  # (the delayed one too: promoted, waiting)
        assert record.attempt == 0
    assert next(info for info in service.queues() if info.name == "default").depth[4] == 3

    # When the queue is resumed
    assert service.resume_queue("default") is True

    # Then each of its jobs runs once, highest priority first
    assert wait_for(lambda: len(starts.started(paused)) == len(paused), timeout=10)
    assert wait_for(lambda: all(service.get_job(j).state is S.COMPLETED for j in paused), timeout=10)  # type: ignore[union-attr]
    assert all(starts.count[j] == 1 for j in paused + others)
    priorities = [p for job_id, _, p in starts.order if job_id in paused]
    assert priorities == sorted(priorities)


def test_jobs_a_worker_fetched_before_the_pause_do_not_start_and_run_once_when_resumed(
    broker: dramatiq.Broker, one_thread: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a worker of one thread busy with a job of the default queue, and more jobs there,
    # fetched by the worker (its prefetch) while the thread is busy
    starts = Starts(epq_handlers, blocking={"job_id-0"})
    service = epq.QueueService(broker)
    one_thread.start()
    blocker = _enqueue(service, 0, 2)
    assert wait_for(lambda: starts.started([blocker]) == [blocker], timeout=10)
    waiting = [_enqueue(service, n, 2) for n in (1, 2, 3)]
    time.sleep(0.3)  # (the consumer fetches what its prefetch allows)

    # When the queue is paused and, once the pause has landed, the running job ends
    service.pause_queue("default")
    time.sleep(PAUSE_LANDS_S)
    starts.release.set()
    assert wait_for(lambda: service.get_job(blocker).state is S.COMPLETED, timeout=10)  # type: ignore[union-attr]

    # Then no other job of the queue starts, their attempts unspent, and enqueues still succeed
    time.sleep(PAUSE_LANDS_S)
    assert starts.started(waiting) == []
    late = _enqueue(service, 9, 1)
    time.sleep(0.3)
    assert starts.started([late]) == []
    assert all(service.get_job(j).attempt == 0 for j in [*waiting, late])  # type: ignore[union-attr]

    # When it is resumed, each runs once
    service.resume_queue("default")
    assert wait_for(lambda: len(starts.started([*waiting, late])) == 4, timeout=10)
    assert wait_for(lambda: all(service.get_job(j).state is S.COMPLETED for j in waiting), timeout=10)  # type: ignore[union-attr]
    time.sleep(0.3)
    assert all(starts.count[j] == 1 for j in [blocker, *waiting, late])
    assert starts.order[1][0] == late  # (priority 1 first)


def test_queues_lists_each_queue_with_its_pause_depth_per_priority_lag_and_schedule(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    service = epq.QueueService(broker)
    service.pause_queue("events")
    for n, priority in enumerate((1, 3, 3)):
        _enqueue(service, n, priority)
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    service.enqueue_register_job({**keyed_request("register_job", 50, None), "run_at": later})
    time.sleep(0.05)

    by_name = {info.name: info for info in service.queues()}

    assert set(by_name) == {"default", "events", "execution", "maintenance"}
    default = by_name["default"]
    assert default.paused is False
    assert by_name["events"].paused is True
    assert default.depth == {1: 1, 2: 0, 3: 2, 4: 0}
    assert default.scheduled == 1
    assert default.running == 0
    assert 0.04 <= default.lag_seconds < 30
    assert by_name["events"].depth == {1: 0, 2: 0, 3: 0, 4: 0}
    assert by_name["events"].lag_seconds == 0


def test_pausing_or_resuming_an_unknown_queue_is_refused_naming_the_queue(broker: dramatiq.Broker) -> None:
    service = epq.QueueService(broker)
    for call in (service.pause_queue, service.resume_queue):
        with pytest.raises(epq.InvalidRequest) as refused:
            call("defualt")
        assert refused.value.field == "queue"
        assert "defualt" in str(refused.value)
        assert "default" in str(refused.value)
    assert [info.name for info in service.queues() if info.paused] == []
    assert service.resume_queue("default") is False  # (not paused: nothing to do)
    assert service.pause_queue("default") is True
    assert service.pause_queue("default") is False


def test_drain_leaves_a_paused_queues_jobs_waiting_and_runs_the_others(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    starts = Starts(epq_handlers)
    service = epq.QueueService(broker)
    service.pause_queue("default")
    waiting = _enqueue(service, 0, 2)
    other = _enqueue(service, 1, 2, "events")

    drain(broker, worker, timeout_ms=10_000)

    assert starts.started([waiting, other]) == [other]
    assert service.get_job(waiting).state is S.AVAILABLE  # type: ignore[union-attr]
    service.resume_queue("default")
    drain(broker, worker, timeout_ms=10_000)
    assert service.get_job(waiting).state is S.COMPLETED  # type: ignore[union-attr]
