"""On RabbitMQ the records of jobs that succeeded are completed in batches, just before their
messages are acked (``EpqRabbitmqConsumer``); the outage rule holds for a batch as for one job:
a message is acked only once its job's outcome is written, and while the state store cannot be
reached, nothing is lost."""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
import pytest
import redis

import epq
from epq.backends.base import Move
from epq.testing import HandlerRegistry, backend
from tests.support.helpers import VALID, message_count, wait_for

pytestmark = pytest.mark.rabbitmq

N = 6
#: Messages a worker of two threads holds unacked at most (Dramatiq's prefetch: twice its threads).
HELD = 4


def _enqueue(broker: dramatiq.Broker, n: int) -> list[str]:
    svc = epq.QueueService(broker)
    requests = [("register_job", {**VALID["register_job"], "job_id": f"batched-{i}"}) for i in range(n)]
    return [r.job.id for r in svc.enqueue_many(requests)]


def _states(broker: dramatiq.Broker, ids: list[str]) -> set[epq.JobState]:
    svc = epq.QueueService(broker)
    return {svc.get_job(i).state for i in ids}  # type: ignore[union-attr]


class _Unreachable:
    """A store's ``method`` (``move_many``, ``serial_release_many``) that cannot reach its
    server for the calls ``only`` picks (all by default), until ``back`` is set."""

    def __init__(self, method: Any, only: Any = None) -> None:
        self.method, self.only = method, only
        self.tried = threading.Event()
        self.back = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.only is None or self.only(*args):
            self.tried.set()
            if not self.back.is_set():
                raise redis.ConnectionError("Connection refused")
        return self.method(*args, **kwargs)


def _outcomes(moves: list[Move]) -> bool:
    """Whether a ``move_many`` call writes jobs' outcomes (a consumer's flush)."""
    return any(move.state == "completed" for move in moves)


def test_jobs_started_and_completed_together_each_get_their_record_written_once(
    rabbitmq_broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    received = epq_handlers.record("register_job")
    ids = _enqueue(rabbitmq_broker, 50)
    worker = dramatiq.Worker(rabbitmq_broker, worker_timeout=50, worker_threads=4)
    worker.start()
    try:
        assert wait_for(lambda: _states(rabbitmq_broker, ids) == {epq.JobState.COMPLETED}, timeout=30)
    finally:
        worker.stop()
    assert len(received) == 50
    assert message_count(rabbitmq_broker, "default") == 0
    svc = epq.QueueService(rabbitmq_broker)
    assert {svc.get_job(i).attempt for i in ids} == {1}  # type: ignore[union-attr]  # one start each


def _run_with_store_down(
    broker: dramatiq.Broker,
    epq_handlers: HandlerRegistry,
    monkeypatch: pytest.MonkeyPatch,
    store: Any,
    method: str,
    jobs: int,
    ran: int,
    only: Any = None,
) -> tuple[Any, list[str], _Unreachable, dramatiq.Worker]:
    """``jobs`` jobs enqueued and a worker of two threads started while ``store``'s ``method``
    cannot reach its server; returns once ``ran`` of them have run and the worker has tried to
    write (the worker runs on)."""
    received = epq_handlers.record("register_job")
    ids = _enqueue(broker, jobs)
    down = _Unreachable(getattr(store, method), only)
    monkeypatch.setattr(store, method, down)
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        assert wait_for(lambda: len(received) == ran, timeout=30)
        assert down.tried.wait(10)
    except BaseException:
        worker.stop()
        raise
    return received, ids, down, worker


def _run_with_outcomes_unwritten(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, list[str], _Unreachable, dramatiq.Worker]:
    """``N`` jobs run while the state store refuses their outcomes: the worker holds ``HELD``."""
    records = backend(broker).records
    return _run_with_store_down(broker, epq_handlers, monkeypatch, records, "move_many", N, HELD)


def test_a_batch_whose_outcomes_cannot_be_written_is_not_acked_and_runs_again_after_the_worker_stops(
    rabbitmq_broker: dramatiq.Broker, epq_handlers: HandlerRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given jobs that ran while the state store could not take their outcomes
    received, ids, _down, worker = _run_with_outcomes_unwritten(rabbitmq_broker, epq_handlers, monkeypatch)
    try:
        # Then their messages are not acked: the worker holds as many as it may, the rest wait
        time.sleep(0.5)
        assert len(received) == HELD
        assert message_count(rabbitmq_broker, "default") == N - HELD
    finally:
        # When the worker stops before the state store is back
        worker.stop()
    monkeypatch.undo()
    # Then every message is back in its queue, none dead-lettered, and each runs to the end
    assert wait_for(lambda: message_count(rabbitmq_broker, "default") == N)
    assert message_count(rabbitmq_broker, "default.XQ") == 0
    received.clear()
    worker = dramatiq.Worker(rabbitmq_broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        assert wait_for(lambda: _states(rabbitmq_broker, ids) == {epq.JobState.COMPLETED}, timeout=30)
    finally:
        worker.stop()
    assert sorted(r.job_id for r in received) == sorted(f"batched-{i}" for i in range(N))
    assert message_count(rabbitmq_broker, "default") == 0


def test_a_batch_waits_for_an_unreachable_state_store_and_is_acked_once_it_is_back(
    rabbitmq_broker: dramatiq.Broker, epq_handlers: HandlerRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given jobs that ran while the state store could not take their outcomes (not acked)
    received, ids, down, worker = _run_with_outcomes_unwritten(rabbitmq_broker, epq_handlers, monkeypatch)
    try:
        assert message_count(rabbitmq_broker, "default") == N - HELD
        # When it is back
        down.back.set()
        # Then the outcomes are written, the messages acked, and the rest run: each job once
        assert wait_for(lambda: _states(rabbitmq_broker, ids) == {epq.JobState.COMPLETED}, timeout=30)
    finally:
        worker.stop()
    assert sorted(r.job_id for r in received) == sorted(f"batched-{i}" for i in range(N))
    assert message_count(rabbitmq_broker, "default") == 0
    assert message_count(rabbitmq_broker, "default.XQ") == 0


@pytest.mark.parametrize(
    ("store", "method", "only"),
    [("state", "serial_release_many", None), ("records", "move_many", _outcomes)],
    ids=["release", "outcomes"],
)
def test_a_serial_key_is_released_with_its_batch_and_waits_for_an_unreachable_state_store(
    serial_keys_on: None,
    rabbitmq_broker: dramatiq.Broker,
    epq_handlers: HandlerRegistry,
    monkeypatch: pytest.MonkeyPatch,
    store: str,
    method: str,
    only: Any,
) -> None:
    # Given three jobs of one endpoint (serial keys on), and a state store that cannot take the
    # release of a key, or the outcomes written after it, when a batch of acks is written
    # When the first job has run
    state = backend(rabbitmq_broker).state
    received, ids, down, worker = _run_with_store_down(
        rabbitmq_broker,
        epq_handlers,
        monkeypatch,
        getattr(backend(rabbitmq_broker), store),
        method,
        3,
        1,
        only,
    )
    try:
        # Then its message is not acked and the next job of its endpoint does not start
        time.sleep(0.5)
        assert len(received) == 1
        assert message_count(rabbitmq_broker, "default") == 0  # (the head, unacked; the rest held)
        # and once the state store is back, the key goes to each next job in turn: each runs once,
        # in enqueue order
        down.back.set()
        assert wait_for(lambda: _states(rabbitmq_broker, ids) == {epq.JobState.COMPLETED}, timeout=30)
        # and the claims of the next jobs' messages, published by the consumer, are forgotten
        assert wait_for(lambda: state.schedule_claimed() == 0, timeout=10)
    finally:
        worker.stop()
    assert [r.job_id for r in received] == [f"batched-{i}" for i in range(3)]
    assert message_count(rabbitmq_broker, "default") == 0
