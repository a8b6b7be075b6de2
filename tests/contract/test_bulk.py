"""Bulk enqueue: ``QueueService.enqueue_many`` and the actors' ``send_many``, on every broker.

The Redis script path (lost replies, kept connections) is in ``tests/redis/test_redis_bulk.py``.
"""

from __future__ import annotations

import gc
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import pika.exceptions
import pytest
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

import epq
import epq.actors
from epq.backends.redis.connections import ScriptStream
from epq.middleware.job_records import JobRecords
from epq.middleware.uniqueness import Uniqueness
from epq.testing import HandlerRegistry, backend
from tests.support.helpers import (
    ENDPOINT,
    VALID,
    StartLog,
    index_request,
    keyed_request,
    message_count,
    run_until_drained,
    total_waiting,
    wait_for,
)


def test_enqueue_many_returns_a_result_per_request_in_order_and_every_job_runs(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    received = epq_handlers.record("index_endpoint")
    jobs = epq_handlers.record("register_job")
    svc = epq.QueueService(broker)
    requests: list[Any] = [index_request(n) for n in range(30)]
    requests.insert(5, ("register_job", keyed_request("register_job", 0, 1)))  # a (kind, mapping) pair
    results = svc.enqueue_many(requests)
    assert len(results) == 31
    assert [r.job.kind for r in results] == ["index_endpoint"] * 5 + ["register_job"] + [
        "index_endpoint"
    ] * 25
    assert not any(r.unique_skipped_as_duplicate for r in results)
    assert results[0].job.args["endpoint_id"] == str(uuid.UUID(int=1))
    assert results[5].job.priority is epq.JobPriority.HIGH
    for result in results:
        record = svc.get_job(result.job.id)
        assert record is not None
        assert (record.state, record.kind) == (epq.JobState.AVAILABLE, result.job.kind)
    assert total_waiting(broker) == 31
    run_until_drained(broker)
    assert sorted(str(r.endpoint_id) for r in received) == sorted(
        str(uuid.UUID(int=n + 1)) for n in range(30)
    )
    assert len(jobs) == 1
    assert svc.get_job(results[0].job.id).state is epq.JobState.COMPLETED  # type: ignore[union-attr]


def test_enqueue_many_reports_duplicates_in_the_batch_and_against_held_keys(broker: dramatiq.Broker) -> None:
    svc = epq.QueueService(broker)
    first = svc.enqueue_index_endpoint(index_request(0))
    results = svc.enqueue_many([index_request(1), index_request(0), index_request(1), index_request(2)])
    assert [r.unique_skipped_as_duplicate for r in results] == [False, True, True, False]
    assert results[1].job.id == first.job.id  # held before the batch
    assert results[2].job.id == results[0].job.id  # held by an earlier request of the batch
    assert total_waiting(broker) == 3


def test_a_duplicate_of_a_job_whose_record_is_gone_is_answered_from_its_lock(
    broker: dramatiq.Broker,
) -> None:
    # the lock's holder value (written by the bulk script on Redis) names the holder's times,
    # queue and priority
    svc = epq.QueueService(broker)
    first = svc.enqueue_many([index_request(0, priority=3)])[0].job
    next(m for m in broker.middleware if isinstance(m, JobRecords)).records.delete(first.id)
    again = svc.enqueue_many([index_request(0)])[0]
    assert again.unique_skipped_as_duplicate
    got = again.job
    assert (got.id, got.queue, got.priority) == (first.id, first.queue, epq.JobPriority.LOW)
    assert got.created_at == first.created_at
    assert abs(got.scheduled_at - first.scheduled_at) < timedelta(seconds=1)  # due: now, by the state clock


def test_enqueue_many_schedules_the_requests_with_a_run_at(broker: dramatiq.Broker) -> None:
    svc = epq.QueueService(broker)
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    results = svc.enqueue_many([index_request(0), index_request(1, run_at=later), index_request(2)])
    assert [r.job.state for r in results] == [
        epq.JobState.AVAILABLE,
        epq.JobState.SCHEDULED,
        epq.JobState.AVAILABLE,
    ]
    assert svc.get_job(results[1].job.id).state is epq.JobState.SCHEDULED  # type: ignore[union-attr]
    assert message_count(broker, "default") == 2
    assert backend(broker).state.schedule_size() == 1


def test_enqueue_many_refuses_the_whole_batch_on_one_bad_request(broker: dramatiq.Broker) -> None:
    svc = epq.QueueService(broker)
    bad = {**keyed_request("register_job", 1, None), "endpoint_id": "not-a-uuid"}
    with pytest.raises(epq.InvalidRequest) as info:
        svc.enqueue_many(
            [
                index_request(0),
                ("register_job", bad),
                ("register_job", {**VALID["register_job"], "queue_name": "nope"}),
            ]
        )
    assert info.value.fields == ["[1].endpoint_id", "[2].queue_name"]
    assert total_waiting(broker) == 0
    assert (
        svc.enqueue_index_endpoint(index_request(0)).unique_skipped_as_duplicate is False
    )  # no lock was left


def test_enqueue_many_refuses_what_is_not_a_request(broker: dramatiq.Broker) -> None:
    svc = epq.QueueService(broker)
    with pytest.raises(epq.InvalidRequest, match=r"\[1\]"):
        svc.enqueue_many([index_request(0), {"endpoint_id": ENDPOINT}])
    with pytest.raises(epq.InvalidRequest, match="unknown kind"):
        svc.enqueue_many([("no_such_kind", {})])
    assert total_waiting(broker) == 0


def test_send_many_on_an_actor(broker: dramatiq.Broker) -> None:
    results = epq.actors.register_source.send_many(
        [{**VALID["register_source"], "source_id": f"s{n}"} for n in range(3)]
        + [VALID["register_source"] | {"source_id": "s0"}]
    )
    assert [r.unique_skipped_as_duplicate for r in results] == [False, False, False, True]
    assert total_waiting(broker) == 3


def _break_batch_publish(broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        if isinstance(broker, RabbitmqBroker):
            raise pika.exceptions.AMQPConnectionError("simulated")
        raise redis.ConnectionError("simulated")

    if isinstance(broker, RedisBroker):  # the script call never reaches Redis
        monkeypatch.setattr(ScriptStream, "_send", fail)
    monkeypatch.setattr(type(broker), "_publish_batch", fail)


# (the stub broker publishes in memory: it has no publish that can fail half-way)
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("redis_broker", marks=pytest.mark.redis),
        pytest.param("rabbitmq_broker", marks=pytest.mark.rabbitmq),
    ],
)
def test_a_failed_bulk_publish_leaves_no_job_no_record_and_no_lock(
    name: str, request: pytest.FixtureRequest
) -> None:
    broker: dramatiq.Broker = request.getfixturevalue(name)
    _break_batch_publish(broker, request.getfixturevalue("monkeypatch"))
    svc = epq.QueueService(broker)
    requests = [index_request(n) for n in range(5)]
    with pytest.raises(epq.BrokerUnavailable, match="0 of 5"):
        svc.enqueue_many(requests)
    request.getfixturevalue("monkeypatch").undo()
    assert total_waiting(broker) == 0
    uniqueness = next(m for m in broker.middleware if isinstance(m, Uniqueness))
    for req in requests:
        message = epq.actors.index_endpoint.message_for(req, broker=broker)
        assert uniqueness.store.get_unique(uniqueness.lock_key(broker, message)) is None  # type: ignore[arg-type]
    assert [r.unique_skipped_as_duplicate for r in svc.enqueue_many(requests)] == [False] * 5


def test_what_epq_hands_to_its_own_middleware_never_travels_with_the_message(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    from dramatiq.middleware import CurrentMessage

    seen: list[dict[str, Any]] = []
    epq_handlers.register(
        "index_endpoint", lambda request: seen.append(CurrentMessage.get_current_message().options)
    )
    svc = epq.QueueService(broker)
    epq.actors.index_endpoint.send(**index_request(0).model_dump(mode="json"))
    svc.enqueue_index_endpoint(index_request(1))
    svc.enqueue_many([index_request(2), index_request(3)])
    run_until_drained(broker)
    assert len(seen) == 4
    for options in seen:
        assert not {"epq_args_json", "epq_fused", "epq_unique_pending"} & set(options), options


def test_of_two_requests_with_one_key_the_earlier_wins_even_when_it_is_delayed(
    broker: dramatiq.Broker,
) -> None:
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    results = epq.QueueService(broker).enqueue_many(
        [index_request(0, run_at=later), index_request(0), index_request(1)]
    )
    assert [r.unique_skipped_as_duplicate for r in results] == [False, True, False]
    assert results[1].job.id == results[0].job.id
    assert results[1].job.state is epq.JobState.SCHEDULED


class _Stamp(dramatiq.Middleware):
    """Another application's middleware: changes each message on its way in, notes each one in."""

    def __init__(self) -> None:
        self.enqueued: list[str] = []

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        message.options["stamp"] = "yes"
        message.kwargs["reason"] = "stamped"

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        self.enqueued.append(message.message_id)


def test_other_middleware_sees_and_may_change_each_job_of_a_batch(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    from dramatiq.middleware import CurrentMessage

    stamp = _Stamp()
    broker.add_middleware(stamp)
    seen: list[tuple[str, Any]] = []
    epq_handlers.register(
        "index_endpoint",
        lambda request: seen.append(
            (request.reason, CurrentMessage.get_current_message().options.get("stamp"))
        ),
    )
    svc = epq.QueueService(broker)
    results = svc.enqueue_many(
        [index_request(0), index_request(1), index_request(0)]
    )  # the last one a duplicate
    single = epq.actors.index_endpoint.send(**index_request(2).model_dump(mode="json"))
    run_until_drained(broker)
    assert seen == [("stamped", "yes")] * 3  # what the hook changed is what the job got
    assert stamp.enqueued == [results[0].job.id, results[1].job.id, single.message_id]


class _Refuse(dramatiq.Middleware):
    """Refuses the ``n``-th message it sees (``error``: the exception it raises)."""

    def __init__(self, n: int, error: Exception) -> None:
        self.n, self.error, self.seen = n, error, 0

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        self.seen += 1
        if self.seen == self.n:
            raise self.error


def test_a_middleware_error_part_way_leaves_the_earlier_runs_enqueued_once(
    broker: dramatiq.Broker,
) -> None:
    from dramatiq.middleware import MiddlewareError

    from epq import insert as bulk

    # on Redis, refused while the first run's call is in flight (its reply is still read); on
    # the other brokers the whole batch is one run, refused before it is published
    broker.add_middleware(_Refuse(bulk.SCRIPT_RUN + 50, MiddlewareError("refused")))
    svc = epq.QueueService(broker)
    with pytest.raises(MiddlewareError):
        svc.enqueue_many([index_request(i) for i in range(2 * bulk.SCRIPT_RUN)])
    enqueued = total_waiting(broker)
    assert enqueued == (bulk.SCRIPT_RUN if backend(broker).fused else 0)
    # the connection is as good as before: the rest go in, and the earlier ones are duplicates
    results = svc.enqueue_many([index_request(i) for i in range(2 * bulk.SCRIPT_RUN)])
    assert sum(r.unique_skipped_as_duplicate for r in results) == enqueued
    assert total_waiting(broker) == 2 * bulk.SCRIPT_RUN


class _SeesCollector(dramatiq.Middleware):
    """Notes whether Python's garbage collector was on as each message was enqueued."""

    def __init__(self) -> None:
        self.enabled: list[bool] = []

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: Any) -> None:
        self.enabled.append(gc.isenabled())


def test_the_garbage_collector_pauses_for_a_batch_and_is_left_as_it_was(broker: dramatiq.Broker) -> None:
    seen = _SeesCollector()
    broker.add_middleware(seen)
    svc = epq.QueueService(broker)
    svc.enqueue_many([index_request(i) for i in range(3)])
    assert seen.enabled == [False] * 3
    assert gc.isenabled()
    gc.disable()  # (an application that runs it itself)
    try:
        svc.enqueue_many([index_request(i) for i in range(3, 5)])
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(epq.InvalidRequest):
        svc.enqueue_many([("index_endpoint", {"endpoint_id": "not a uuid"})])
    assert gc.isenabled()


def test_an_error_in_another_middleware_is_logged_and_the_batch_goes_on(broker: dramatiq.Broker) -> None:
    broker.add_middleware(_Refuse(2, RuntimeError("a bug elsewhere")))  # as Dramatiq's emit does
    results = epq.QueueService(broker).enqueue_many([index_request(i) for i in range(3)])
    assert not any(r.unique_skipped_as_duplicate for r in results)
    assert total_waiting(broker) == 3


def test_one_key_across_runs_and_ways_goes_to_the_earliest_request(broker: dramatiq.Broker) -> None:
    from epq import insert as bulk

    later = datetime.now(timezone.utc) + timedelta(hours=1)
    requests = [index_request(i) for i in range(bulk.SCRIPT_RUN)]  # a whole run
    requests += [
        index_request(0),
        index_request(500, run_at=later),
        index_request(500),
        index_request(1, run_at=later),
    ]
    results = epq.QueueService(broker).enqueue_many(requests)
    skipped = [r.unique_skipped_as_duplicate for r in results]
    assert skipped == [False] * bulk.SCRIPT_RUN + [True, False, True, True]
    n = bulk.SCRIPT_RUN
    assert results[n].job.id == results[0].job.id
    assert results[n + 2].job.id == results[n + 1].job.id
    assert results[n + 3].job.id == results[1].job.id


def test_one_call_with_kinds_and_priorities_sharing_a_queue_is_served_in_order(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    log = StartLog(epq_handlers)
    svc = epq.QueueService(broker)
    requests: list[Any] = []
    kinds = ["index_endpoint", "register_job", "index_endpoint", "register_source"] * 2
    priorities = [3, 1, None, 3, 4, 1, None, 3]
    for n, (kind, priority) in enumerate(zip(kinds, priorities, strict=True)):
        requests.append((kind, keyed_request(kind, n, priority)))
    results = svc.enqueue_many(requests)
    counters = {(row["queue"], row["priority"]): row["waiting"] for row in svc.stats()}
    assert counters == {("default", 1): 2, ("default", 2): 2, ("default", 3): 3, ("default", 4): 1}
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        assert wait_for(lambda: len(log.started) == len(requests), timeout=30)
    finally:
        worker.stop()
    expected = sorted(range(len(results)), key=lambda i: (results[i].job.priority, i))
    assert log.started == [results[i].job.id for i in expected]
