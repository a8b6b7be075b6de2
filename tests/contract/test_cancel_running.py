"""Cancelling a running job, on every broker, with an in-process worker (the test thread cancels
while a worker thread runs the handler): the handler is interrupted within a second, the job is
recorded ``cancelled``, its key is free and it never runs again; and the races at either end of
the handler (a cancel between the start and the handler, a cancel as the handler returns or
fails) each end the way ``QueueService.cancel_job`` documents. Across processes, with real
workers: ``tests/e2e/test_cancel_running.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import pytest
from prometheus_client import CollectorRegistry

import epq
import epq.actors
from epq import metrics
from epq.settings import reset_settings
from epq.testing import HandlerRegistry, backend, drain
from tests.support.helpers import VALID, wait_for

S = epq.JobState
KIND = "register_job"
#: A retry, were there one, would come this soon (ms): waiting well past it shows there is none.
BACKOFF_MS = 100
#: Time for the worker's watcher to poll a few times (it polls every 0.2 s while jobs run).
A_FEW_POLLS_S = 0.8


def record(broker: dramatiq.Broker, job_id: str) -> epq.JobRecord:
    found = epq.QueueService(broker).get_job(job_id)
    assert found is not None
    return found


def send() -> str:
    """A register_job whose retry, were there one, would come at once."""
    return epq.actors.register_job.send_with_options(kwargs=VALID[KIND], backoff_ms=[BACKOFF_MS]).message_id


def key_is_free(broker: dramatiq.Broker) -> bool:
    """Whether a job with the same unique key can be enqueued (scheduled an hour ahead, so that
    it does not run here)."""
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    result = epq.QueueService(broker).enqueue_register_job({**VALID[KIND], "run_at": later})
    return not result.unique_skipped_as_duplicate


class Runs:
    """A handler that works in small steps (Python code between short sleeps, so interruptible
    at once) for up to 30 s, noting each start and when and how it stopped."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.starts: list[float] = []
        self.stops: list[tuple[float, str]] = []  # (time.monotonic(), what stopped it)

    def __call__(self, request: Any) -> None:
        self.starts.append(time.monotonic())
        self.started.set()
        how = "returned"
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.02)
        except BaseException as exc:
            how = type(exc).__name__
            raise
        finally:
            self.stops.append((time.monotonic(), how))


def test_a_running_job_cancelled_stops_within_a_second_and_never_runs_again(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a job whose handler is running
    runs = Runs()
    epq_handlers.register(KIND, runs)
    job_id = send()
    assert runs.started.wait(10)
    assert record(broker, job_id).state is S.RUNNING

    # When it is cancelled
    asked = time.monotonic()
    answer = epq.QueueService(broker).cancel_job(job_id)

    # Then cancel_job answers at once, the job still running with the request noted
    assert answer.state is S.RUNNING
    assert answer.cancel_requested_at is not None
    # and the handler is interrupted within a second (measured where it stops)
    assert wait_for(lambda: bool(runs.stops), timeout=10)
    stopped, how = runs.stops[0]
    assert how == "JobCancelled"
    assert stopped - asked < 1.0
    # and the job is recorded cancelled after its one attempt, with no error
    assert wait_for(lambda: record(broker, job_id).state is S.CANCELLED, timeout=5)
    done = record(broker, job_id)
    assert (done.attempt, done.errors) == (1, [])
    assert done.finalized_at is not None
    # and its key is free at once (freed before the record says cancelled)
    assert key_is_free(broker)
    # and it never runs again, well past when a retry would have come
    time.sleep(1.0)
    assert len(runs.starts) == 1
    assert record(broker, job_id).state is S.CANCELLED
    assert epq.QueueService(broker).list_dead() == []
    # and its request is gone with it
    assert backend(broker).state.cancel_requests([job_id]) == []


def test_a_cancel_between_the_start_and_the_handler_stops_it_before_it_begins(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a job a worker thread has started (its record says running), held just before its
    # handler by a middleware that runs after epq's
    runs = Runs()
    epq_handlers.register(KIND, runs)
    gate = Gate(before=True)
    broker.add_middleware(gate)
    job_id = send()
    gate.target = job_id
    assert gate.entered.wait(10)
    assert record(broker, job_id).state is S.RUNNING

    # When it is cancelled there, and the watcher sees the request before the handler begins
    answer = epq.QueueService(broker).cancel_job(job_id)
    assert answer.state is S.RUNNING
    time.sleep(A_FEW_POLLS_S)
    gate.release.set()

    # Then its handler never begins, and it is cancelled after its one attempt, its key free
    assert wait_for(lambda: record(broker, job_id).state is S.CANCELLED, timeout=10)
    assert key_is_free(broker)
    time.sleep(1.0)
    assert runs.starts == []
    assert record(broker, job_id).attempt == 1


def test_a_cancel_as_the_handler_returns_is_too_late_the_job_completes(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a job whose handler has returned, held before epq writes its outcome
    runs: list[int] = []
    epq_handlers.register(KIND, lambda request: runs.append(1))
    gate = Gate(after=True)
    broker.add_middleware(gate)
    job_id = send()
    gate.target = job_id
    assert gate.entered.wait(10)

    # When it is cancelled there (its record still says running), and the watcher sees it
    answer = epq.QueueService(broker).cancel_job(job_id)
    assert answer.state is S.RUNNING
    time.sleep(A_FEW_POLLS_S)
    gate.release.set()

    # Then it completes, as it did; its record keeps the request, which is dropped
    assert wait_for(lambda: record(broker, job_id).state is S.COMPLETED, timeout=10)
    done = record(broker, job_id)
    assert done.cancel_requested_at is not None
    assert runs == [1]
    assert wait_for(lambda: backend(broker).state.cancel_requests([job_id]) == [], timeout=5)


@pytest.mark.parametrize("watcher_first", [False, True], ids=["found-at-the-end", "found-by-the-watcher"])
def test_a_run_that_fails_as_it_is_cancelled_is_cancelled_not_retried(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry, watcher_first: bool
) -> None:
    # Given a job whose handler has just failed, held before epq writes its outcome
    runs: list[int] = []

    def fails(request: Any) -> None:
        runs.append(1)
        raise RuntimeError("the endpoint answered 500")

    epq_handlers.register(KIND, fails)
    gate = Gate(after=True)
    broker.add_middleware(gate)
    job_id = send()
    gate.target = job_id
    assert gate.entered.wait(10)

    # When it is cancelled there and let go, at once (before the watcher need have seen it) or
    # after the watcher has seen the request (the two ways the worker learns of it)
    assert epq.QueueService(broker).cancel_job(job_id).state is S.RUNNING
    if watcher_first:
        time.sleep(A_FEW_POLLS_S)
    gate.release.set()

    # Then its failed run is recorded, but it is cancelled, not retried, and its key is free
    assert wait_for(lambda: record(broker, job_id).state is S.CANCELLED, timeout=10)
    assert key_is_free(broker)
    time.sleep(1.0)
    done = record(broker, job_id)
    assert (done.state, done.attempt, runs) == (S.CANCELLED, 1, [1])
    assert [e.error_type for e in done.errors] == ["RuntimeError"]


def test_a_handler_that_swallows_the_interruption_is_cancelled_all_the_same(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a handler that catches everything, and asks epq.cancel_requested() when it does
    seen: list[bool] = [epq.cancel_requested()]  # (outside a job: False)
    started = threading.Event()

    def stubborn(request: Any) -> None:
        started.set()
        seen.append(epq.cancel_requested())
        try:
            give_up = time.monotonic() + 15  # (never run on for good: a test that fails must end)
            while time.monotonic() < give_up:
                time.sleep(0.02)
        except BaseException:
            seen.append(epq.cancel_requested())  # and returns as if it had succeeded

    epq_handlers.register(KIND, stubborn)
    job_id = send()
    assert started.wait(10)
    epq.QueueService(broker).cancel_job(job_id)

    # Then it is cancelled, not completed, and not retried
    assert wait_for(lambda: record(broker, job_id).state is S.CANCELLED, timeout=10)
    time.sleep(0.5)
    assert seen == [False, False, True]
    assert record(broker, job_id).state is S.CANCELLED


def test_cancelling_one_running_job_leaves_the_other_running(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given two running jobs (the worker has two threads)
    runs = Runs()
    epq_handlers.register(KIND, runs)
    first = send()
    second = epq.actors.register_job.send(**{**VALID[KIND], "job_id": "job-2"}).message_id
    assert wait_for(lambda: len(runs.starts) == 2, timeout=10)
    # When one is cancelled
    epq.QueueService(broker).cancel_job(second)
    assert wait_for(lambda: record(broker, second).state is S.CANCELLED, timeout=10)
    # Then the other runs on
    time.sleep(A_FEW_POLLS_S)
    assert record(broker, first).state is S.RUNNING
    assert [how for _, how in runs.stops] == ["JobCancelled"]
    epq.QueueService(broker).cancel_job(first)
    assert wait_for(lambda: record(broker, first).state is S.CANCELLED, timeout=10)


def test_a_handler_blocked_in_a_call_into_c_is_interrupted_when_the_call_returns(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a handler blocked in one call into C (a lock's wait, as a socket read without a timeout)
    started, release = threading.Event(), threading.Event()
    after_wait: list[str] = []

    def blocked(request: Any) -> None:
        started.set()
        release.wait(30)
        after_wait.append("ran on")  # (never: the interruption lands as the wait returns)

    epq_handlers.register(KIND, blocked)
    job_id = send()
    assert started.wait(10)
    # When it is cancelled, the exception waits for the call to return (where the wait cannot be
    # interrupted; under a tracer such as coverage's it may be, and the job ends at once)
    epq.QueueService(broker).cancel_job(job_id)
    time.sleep(A_FEW_POLLS_S)
    assert record(broker, job_id).state in (S.RUNNING, S.CANCELLED)
    # Then once the call returns, it is interrupted before its next line, and cancelled
    release.set()
    assert wait_for(lambda: record(broker, job_id).state is S.CANCELLED, timeout=10)
    assert after_wait == []


def test_a_job_whose_worker_died_is_stopped_when_it_is_delivered_again(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    # Given a job a worker started and then died with (its record says running; its message
    # waits to be delivered again)
    runs = Runs()
    epq_handlers.register(KIND, runs)
    job_id = send()
    stores = backend(broker)
    assert stores.records.start(job_id, stores.state.now_ms(), 60_000) == "available"
    # When it is cancelled, no worker running it
    assert epq.QueueService(broker).cancel_job(job_id).state is S.RUNNING
    # Then the worker it is delivered to next stops it, and it is cancelled, its key free
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        assert wait_for(lambda: bool(runs.stops), timeout=10)
        assert [how for _, how in runs.stops] == ["JobCancelled"]
        assert wait_for(lambda: record(broker, job_id).state is S.CANCELLED, timeout=10)
        assert key_is_free(broker)
    finally:
        worker.stop()


@pytest.mark.redis
def test_a_cancel_request_lasts_the_jobs_time_limit_and_a_minute(
    redis_broker: dramatiq.Broker, redis_client: Any
) -> None:
    job_id = send()  # (no worker: its record is started by hand, as a worker would)
    stores = backend(redis_broker)
    stores.records.start(job_id, stores.state.now_ms(), 60_000)
    epq.QueueService(redis_broker).cancel_job(job_id)
    ttl_ms = redis_client.pttl(f"epq:cancel:{job_id}")
    assert 60_000 + 50_000 < ttl_ms <= 60_000 + 60_000  # register_job: 1 min, and a minute more


def test_a_handler_that_called_an_actor_inline_can_still_be_interrupted_after_the_call(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a handler that runs another kind's handler inline (its actor called as a function),
    # then works on
    runs = Runs()
    epq_handlers.register("register_source", lambda request: None)

    def outer(request: Any) -> None:
        epq.actors.register_source(**VALID["register_source"])
        runs(request)

    epq_handlers.register(KIND, outer)
    job_id = send()
    assert runs.started.wait(10)
    # When it is cancelled after the inline call returned
    asked = time.monotonic()
    epq.QueueService(broker).cancel_job(job_id)
    # Then it is interrupted all the same
    assert wait_for(lambda: bool(runs.stops), timeout=10)
    assert runs.stops[0][1] == "JobCancelled"
    assert runs.stops[0][0] - asked < 1.0
    assert wait_for(lambda: record(broker, job_id).state is S.CANCELLED, timeout=10)


class Gate(dramatiq.Middleware):
    """Holds one job (``target``) on its worker thread, just before its handler (``before``, after
    epq's own start hooks) or just after it (``after``, before epq's outcome hooks), until
    ``release`` is set."""

    def __init__(self, *, before: bool = False, after: bool = False) -> None:
        self.before, self.after = before, after
        self.target: str | None = None
        self.entered = threading.Event()
        self.release = threading.Event()

    def _hold(self, message: Any) -> None:
        if message.message_id == self.target:
            self.entered.set()
            self.release.wait(10)

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if self.before:
            wait_for(lambda: self.target is not None, timeout=5)
            self._hold(message)

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        if self.after:
            wait_for(lambda: self.target is not None, timeout=5)
            self._hold(message)


# ---- the stub broker: what the test plugin and the metrics make of it ------------------------


def test_drain_does_not_fail_a_test_on_a_job_cancelled_while_it_ran(
    epq_broker: dramatiq.Broker, epq_worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    runs = Runs()
    epq_handlers.register(KIND, runs)
    job_id = send()
    assert runs.started.wait(10)
    epq.QueueService(epq_broker).cancel_job(job_id)
    drain(epq_broker, epq_worker)  # (fail_fast: a handler's failure would be raised here)
    assert record(epq_broker, job_id).state is S.CANCELLED


@pytest.fixture
def worker_metrics(monkeypatch: pytest.MonkeyPatch) -> Iterator[CollectorRegistry]:
    """The worker-side metrics on (``EPQ_METRICS=1``), on a registry of the test's own."""
    monkeypatch.setenv("EPQ_METRICS", "1")
    reset_settings()
    metrics.disable()
    registry = CollectorRegistry()
    metrics.enable(registry)
    yield registry
    metrics.disable()


def test_a_job_cancelled_while_it_runs_counts_as_a_cancelled_outcome(
    worker_metrics: CollectorRegistry, request: pytest.FixtureRequest
) -> None:
    broker = request.getfixturevalue("epq_broker")
    runs = Runs()
    request.getfixturevalue("epq_handlers").register(KIND, runs)
    request.getfixturevalue("epq_worker")
    job_id = send()
    assert runs.started.wait(10)
    epq.QueueService(broker).cancel_job(job_id)
    assert wait_for(lambda: record(broker, job_id).state is S.CANCELLED, timeout=10)

    def processed(outcome: str) -> float:
        metrics.flush()
        value = worker_metrics.get_sample_value(
            "epq_jobs_processed_total", {"kind": KIND, "outcome": outcome}
        )
        return value or 0.0

    assert wait_for(lambda: processed("cancelled") == 1, timeout=5)
    assert [processed(o) for o in ("completed", "retried", "discarded", "failed")] == [0, 0, 0, 0]
    assert worker_metrics.get_sample_value("epq_jobs_started_total", {"kind": KIND}) == 1
