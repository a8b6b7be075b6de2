"""Uniqueness modes ``replace`` and ``debounce`` on every broker (``epq.modes``): of many
duplicates, the last payload always runs, in one or two runs, and two jobs of one key never run
at once. ``keep_first`` (the default) is ``test_uniqueness.py``'s.

Real brokers run in real time, compressed (20 enqueues over about 2 s, a 0.3 s debounce); the
stub's fake clock spreads them over 10 s without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest

import epq
from epq.models import JobState
from epq.settings import reset_settings
from epq.testing import HandlerRegistry
from tests.support.helpers import VALID, wait_for

KIND = "index_endpoint"  # (unique by endpoint and source: its reason and data are the payload)
DEBOUNCE_S = 0.3


@pytest.fixture(autouse=True)
def _modes_settings(_clean_epq_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # (read when the broker is set up: this fixture comes first)
    monkeypatch.setenv("EPQ_INDEX_UNIQUE_FOR", "60")
    monkeypatch.setenv("EPQ_INDEX_DEBOUNCE_DELAY", str(DEBOUNCE_S))
    monkeypatch.setenv("EPQ_INDEX_DEBOUNCE_MAX_WAIT", "20")
    reset_settings()


def request(n: int, mode: str) -> dict[str, Any]:
    """The same key every time (endpoint and source); payload version ``n``."""
    return {**VALID[KIND], "source_data": {"version": n}, "unique_mode": mode}


class Runs:
    """A handler that notes each run's payload version and how many of the key run at once."""

    def __init__(self, handlers: HandlerRegistry, work_s: float = 0.0) -> None:
        self.versions: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self.work_s = work_s
        self.first_may_end = threading.Event()
        self.first_may_end.set()
        self._lock = threading.Lock()
        handlers.register(KIND, self)

    def __call__(self, req: Any) -> None:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.versions.append(int(req.source_data["version"]))
            first = len(self.versions) == 1
        try:
            if first:
                self.first_may_end.wait(30)
            time.sleep(self.work_s)
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def stopped_worker(broker: dramatiq.Broker) -> Iterator[dramatiq.Worker]:
    """A worker, not started: the test starts it when the jobs are to run."""
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=4)
    yield worker
    worker.stop()


def settled(svc: epq.QueueService, ids: set[str]) -> bool:
    jobs = [svc.get_job(job_id) for job_id in ids]
    return all(j is not None and j.state in (JobState.COMPLETED,) for j in jobs)


@pytest.mark.parametrize("mode", ["replace", "debounce"])
def test_duplicates_of_a_job_not_started_replace_its_payload_and_the_last_one_runs_once(
    broker: dramatiq.Broker, stopped_worker: dramatiq.Worker, epq_handlers: HandlerRegistry, mode: str
) -> None:
    # Given 20 duplicates enqueued over about 2 s while no worker runs
    runs = Runs(epq_handlers)
    svc = epq.QueueService(broker)
    results = []
    for n in range(20):
        results.append(svc.enqueue_index_endpoint(request(n, mode)))
        time.sleep(0.1)

    # Then the first was enqueued, each other replaced its payload, and the caller got its id
    first = results[0]
    assert not first.unique_skipped_as_duplicate
    assert not first.unique_replaced
    assert all(r.unique_replaced and not r.unique_skipped_as_duplicate for r in results[1:])
    assert {r.job.id for r in results} == {first.job.id}
    job = svc.get_job(first.job.id)
    assert job is not None
    assert job.args["source_data"] == {"version": 19}
    assert job.replaced == 19

    # When a worker runs it, it runs once, with the last payload
    stopped_worker.start()
    assert wait_for(lambda: settled(svc, {first.job.id}), timeout=20)
    time.sleep(0.3)
    assert runs.versions == [19]


@pytest.mark.parametrize("mode", ["replace", "debounce"])
def test_duplicates_of_a_running_job_leave_one_follow_up_that_runs_the_last_payload_after_it(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry, mode: str
) -> None:
    # Given a job whose handler runs until the duplicates are in
    runs = Runs(epq_handlers)
    runs.first_may_end.clear()
    svc = epq.QueueService(broker)
    first = svc.enqueue_index_endpoint(request(0, mode))
    assert wait_for(lambda: runs.versions == [0], timeout=10)

    # When 19 duplicates come over about 2 s while it runs
    results = []
    for n in range(1, 20):
        results.append(svc.enqueue_index_endpoint(request(n, mode)))
        time.sleep(0.1)
    runs.first_may_end.set()

    # Then the first of them is a new job (the follow-up), the others replace its payload
    follow_up = results[0]
    assert not follow_up.unique_skipped_as_duplicate
    assert not follow_up.unique_replaced
    assert follow_up.job.id != first.job.id
    assert all(r.unique_replaced and r.job.id == follow_up.job.id for r in results[1:])
    # and it runs after the first ended, once, with the last payload: two runs, never at once
    assert wait_for(lambda: settled(svc, {first.job.id, follow_up.job.id}), timeout=20)
    time.sleep(0.3)
    assert runs.versions == [0, 19]
    assert runs.most_at_once == 1


@pytest.mark.parametrize("mode", ["replace", "debounce"])
def test_a_duplicate_after_the_job_ended_starts_a_new_job(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry, mode: str
) -> None:
    runs = Runs(epq_handlers)
    svc = epq.QueueService(broker)
    first = svc.enqueue_index_endpoint(request(0, mode))
    assert wait_for(lambda: settled(svc, {first.job.id}), timeout=10)

    again = svc.enqueue_index_endpoint(request(1, mode))

    assert not again.unique_skipped_as_duplicate
    assert not again.unique_replaced
    assert again.job.id != first.job.id
    assert wait_for(lambda: settled(svc, {again.job.id}), timeout=10)
    assert runs.versions == [0, 1]
    # while keep_first refuses it for the rest of the window
    assert svc.enqueue_index_endpoint(request(2, "keep_first")).unique_skipped_as_duplicate
