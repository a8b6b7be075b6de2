"""Per-queue concurrency in a worker process, on every broker, with a real worker: a queue runs
at most its budget of jobs at once (``EPQ_QUEUE_CONCURRENCY``), its delayed jobs and retries
included, while the worker's other threads keep running other queues' jobs."""

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
import epq.actors
from epq.testing import HandlerRegistry
from tests.support.helpers import keyed_request, wait_for

S = epq.JobState
#: Jobs of the capped queue: many more than its budget and than the worker's threads.
CAPPED_JOBS = 12
OTHER_JOBS = 16
THREADS = 8


class Sampler:
    """Handlers (of every kind) that count the jobs of each queue running at this instant."""

    def __init__(self, handlers: HandlerRegistry, work_s: dict[str, float], fail_first: set[str]) -> None:
        self.lock = threading.Lock()
        self.running: Counter[str] = Counter()
        self.most: Counter[str] = Counter()
        self.capped_running_at_other_starts: list[int] = []
        self.work_s = work_s
        self.fail_first = fail_first  # (register_job ids whose first attempt fails: retried)
        self.attempts: Counter[str] = Counter()
        for kind in ("register_job", "register_source"):
            handlers.register(kind, self)

    def __call__(self, request: Any) -> None:
        message = CurrentMessage.get_current_message()
        queue = message.queue_name
        with self.lock:
            self.running[queue] += 1
            self.most[queue] = max(self.most[queue], self.running[queue])
            self.attempts[message.message_id] += 1
            first = self.attempts[message.message_id] == 1
            if queue != "default":
                self.capped_running_at_other_starts.append(self.running["default"])
        try:
            time.sleep(self.work_s[queue])
            if first and getattr(request, "job_id", None) in self.fail_first:
                raise RuntimeError("first attempt fails")
        finally:
            with self.lock:
                self.running[queue] -= 1


@pytest.fixture
def default_capped_at_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default queue's budget is 2 (set before ``broker`` builds the broker)."""
    monkeypatch.setenv("EPQ_QUEUE_CONCURRENCY", "default=2")


@pytest.fixture
def eight_threads(broker: dramatiq.Broker) -> Iterator[dramatiq.Worker]:
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=THREADS)
    yield worker
    worker.stop()


def test_a_queue_runs_at_most_its_budget_while_other_queues_keep_running(
    default_capped_at_2: None,
    broker: dramatiq.Broker,
    eight_threads: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
) -> None:
    # Given the default queue capped at 2 in a worker of 8 threads, and 12 jobs waiting there: 4
    # of them due a moment later (from the schedule), 2 that fail once and are retried
    sampler = Sampler(
        epq_handlers, work_s={"default": 0.4, "events": 0.1}, fail_first={"job_id-0", "job_id-1"}
    )
    service = epq.QueueService(broker)
    soon = datetime.now(timezone.utc) + timedelta(milliseconds=300)
    capped = []
    for n in range(CAPPED_JOBS):
        request = keyed_request("register_job", n, None)
        if n in (0, 1):
            capped.append(
                epq.actors.register_job.send_with_options(kwargs=request, backoff_ms=[50]).message_id
            )
            continue
        if n >= CAPPED_JOBS - 4:
            request["run_at"] = soon
        capped.append(service.enqueue_register_job(request).job.id)

    def done(job_ids: list[str]) -> int:
        return sum(getattr(service.get_job(j), "state", None) is S.COMPLETED for j in job_ids)

    # When the worker runs them and, once the default queue is at its budget, 16 jobs of the
    # events queue are enqueued
    eight_threads.start()
    assert wait_for(lambda: sampler.running["default"] == 2, timeout=20)
    other = [
        service.enqueue_register_source(
            {**keyed_request("register_source", n, None), "queue_name": "events"}
        ).job.id
        for n in range(OTHER_JOBS)
    ]

    # Then the events jobs run at once on the threads the cap leaves free, before the default
    # queue's backlog is through
    assert wait_for(lambda: done(other) == OTHER_JOBS, timeout=20, interval=0.05)
    assert done(capped) < CAPPED_JOBS - 2
    assert sampler.most["events"] >= 3
    assert sampler.capped_running_at_other_starts.count(2) >= 1
    # and never more than 2 jobs of the default queue ran at once, its delayed jobs and retries
    # included
    assert wait_for(lambda: done(capped) == CAPPED_JOBS, timeout=30, interval=0.1)
    assert sampler.most["default"] == 2
    assert sum(sampler.attempts[j] for j in capped) == CAPPED_JOBS + 2


def test_a_worker_logs_the_budgets_of_the_queues_it_serves(
    default_capped_at_2: None, epq_broker: dramatiq.Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="epq")
    worker = dramatiq.Worker(epq_broker, queues={"default", "events"}, worker_timeout=50, worker_threads=3)
    worker.start()
    worker.stop()
    said = "Jobs at once per queue in this process: default 2, events 20 (EPQ_QUEUE_CONCURRENCY); "
    said += "3 worker threads"
    assert said in caplog.messages
