"""Bulk enqueue: ``QueueService.enqueue_many`` and the actors' ``send_many``, on every broker."""

from __future__ import annotations

import os
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
from epq.middleware import JobRecords, Uniqueness
from epq.testing import HandlerRegistry, backend
from tests.contract.test_priority import StartLog, _request
from tests.support.helpers import ENDPOINT, VALID, message_count, run_until_drained, total_waiting, wait_for


def _index(n: int, **extra: Any) -> epq.EnqueueIndexEndpointRequest:
    return epq.EnqueueIndexEndpointRequest(endpoint_id=uuid.UUID(int=n + 1), source="API", **extra)


def test_enqueue_many_returns_a_result_per_request_in_order_and_every_job_runs(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    received = epq_handlers.record("index_endpoint")
    jobs = epq_handlers.record("register_job")
    svc = epq.QueueService(broker)
    requests: list[Any] = [_index(n) for n in range(30)]
    requests.insert(5, ("register_job", _request("register_job", 0, 1)))  # a (kind, mapping) pair
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
    first = svc.enqueue_index_endpoint(_index(0))
    results = svc.enqueue_many([_index(1), _index(0), _index(1), _index(2)])
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
    first = svc.enqueue_many([_index(0, priority=3)])[0].job
    next(m for m in broker.middleware if isinstance(m, JobRecords)).records.delete(first.id)
    again = svc.enqueue_many([_index(0)])[0]
    assert again.unique_skipped_as_duplicate
    got = again.job
    assert (got.id, got.queue, got.priority) == (first.id, first.queue, epq.JobPriority.LOW)
    assert got.created_at == first.created_at
    assert abs(got.scheduled_at - first.scheduled_at) < timedelta(seconds=1)  # due: now, by the state clock


def test_enqueue_many_schedules_the_requests_with_a_run_at(broker: dramatiq.Broker) -> None:
    svc = epq.QueueService(broker)
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    results = svc.enqueue_many([_index(0), _index(1, run_at=later), _index(2)])
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
    bad = {**_request("register_job", 1, None), "endpoint_id": "not-a-uuid"}
    with pytest.raises(epq.InvalidRequest) as info:
        svc.enqueue_many(
            [
                _index(0),
                ("register_job", bad),
                ("register_job", {**VALID["register_job"], "queue_name": "nope"}),
            ]
        )
    assert info.value.fields == ["[1].endpoint_id", "[2].queue_name"]
    assert total_waiting(broker) == 0
    assert svc.enqueue_index_endpoint(_index(0)).unique_skipped_as_duplicate is False  # no lock was left


def test_enqueue_many_refuses_what_is_not_a_request(broker: dramatiq.Broker) -> None:
    svc = epq.QueueService(broker)
    with pytest.raises(epq.InvalidRequest, match=r"\[1\]"):
        svc.enqueue_many([_index(0), {"endpoint_id": ENDPOINT}])
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
    requests = [_index(n) for n in range(5)]
    with pytest.raises(epq.BrokerUnavailable, match="0 of 5"):
        svc.enqueue_many(requests)
    request.getfixturevalue("monkeypatch").undo()
    assert total_waiting(broker) == 0
    uniqueness = next(m for m in broker.middleware if isinstance(m, Uniqueness))
    for req in requests:
        message = epq.actors.index_endpoint.message_for(req, broker=broker)
        assert uniqueness.store.get_unique(uniqueness.lock_key(broker, message)) is None  # type: ignore[arg-type]
    assert [r.unique_skipped_as_duplicate for r in svc.enqueue_many(requests)] == [False] * 5


@pytest.mark.redis
def test_enqueue_many_on_redis_is_one_round_trip_per_chunk(
    redis_broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from epq import bulk

    svc = epq.QueueService(redis_broker)
    svc.enqueue_index_endpoint(_index(10_000))  # warm up: connection and scripts loaded
    sent = [0]
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent[0] += 1
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    n = 2 * bulk.SCRIPT_RUN
    results = svc.enqueue_many([_index(i) for i in range(n)])
    monkeypatch.undo()
    assert len(results) == n
    # one script per chunk, then reading nothing more (no duplicates to look up)
    assert sent[0] <= 2 + 1, sent[0]
    assert message_count(redis_broker, "default") == n + 1


def test_what_epq_hands_to_its_own_middleware_never_travels_with_the_message(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    from dramatiq.middleware import CurrentMessage

    seen: list[dict[str, Any]] = []
    epq_handlers.register(
        "index_endpoint", lambda request: seen.append(CurrentMessage.get_current_message().options)
    )
    svc = epq.QueueService(broker)
    epq.actors.index_endpoint.send(**_index(0).model_dump(mode="json"))
    svc.enqueue_index_endpoint(_index(1))
    svc.enqueue_many([_index(2), _index(3)])
    run_until_drained(broker)
    assert len(seen) == 4
    for options in seen:
        assert not {"epq_args_json", "epq_fused", "epq_unique_pending"} & set(options), options


def test_of_two_requests_with_one_key_the_earlier_wins_even_when_it_is_delayed(
    broker: dramatiq.Broker,
) -> None:
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    results = epq.QueueService(broker).enqueue_many([_index(0, run_at=later), _index(0), _index(1)])
    assert [r.unique_skipped_as_duplicate for r in results] == [False, True, False]
    assert results[1].job.id == results[0].job.id
    assert results[1].job.state is epq.JobState.SCHEDULED


@pytest.mark.redis
def _lose_replies(monkeypatch: pytest.MonkeyPatch, lost: int = 1) -> None:
    """The script calls run, but the first ``lost`` replies are lost on the way back."""
    enter = ScriptStream.__enter__
    left = [lost]

    def entered(self: ScriptStream) -> ScriptStream:
        out = enter(self)
        read = self.conn.read_response

        def read_response(*args: Any, **kwargs: Any) -> Any:
            reply = read(*args, **kwargs)
            if left[0] > 0:
                left[0] -= 1
                self.conn.disconnect()
                raise redis.ConnectionError("reply lost")
            return reply

        monkeypatch.setattr(self.conn, "read_response", read_response)
        return out

    monkeypatch.setattr(ScriptStream, "__enter__", entered)


@pytest.mark.redis
def test_a_bulk_call_sent_again_after_its_reply_was_lost_enqueues_each_job_once(
    redis_broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    _lose_replies(monkeypatch)
    svc = epq.QueueService(redis_broker)
    results = svc.enqueue_many([_index(n) for n in range(5)] + [_index(0)])
    monkeypatch.undo()
    assert [r.unique_skipped_as_duplicate for r in results] == [False] * 5 + [True]
    assert results[5].job.id == results[0].job.id
    assert message_count(redis_broker, "default") == 5
    assert [(row["queue"], row["waiting"]) for row in svc.stats()] == [("default", 5)]


@pytest.mark.redis
def test_a_bulk_call_whose_reply_never_came_is_reported_as_maybe_enqueued(
    redis_broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    _lose_replies(monkeypatch, lost=2)
    with pytest.raises(epq.BrokerUnavailable, match=r"requests \[0\] to \[2\] may have been"):
        epq.QueueService(redis_broker).enqueue_many([_index(n) for n in range(3)])


@pytest.mark.redis
def test_bulk_enqueue_gives_a_server_that_lost_its_scripts_the_script_again(
    redis_broker: dramatiq.Broker,
) -> None:
    svc = epq.QueueService(redis_broker)
    svc.enqueue_many([_index(0)])
    redis_broker.client.script_flush()  # type: ignore[attr-defined]  # as after a Redis restart
    results = svc.enqueue_many([_index(n) for n in range(1, 4)])
    assert [r.unique_skipped_as_duplicate for r in results] == [False] * 3
    assert message_count(redis_broker, "default") == 4


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
    results = svc.enqueue_many([_index(0), _index(1), _index(0)])  # the last one a duplicate
    single = epq.actors.index_endpoint.send(**_index(2).model_dump(mode="json"))
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

    from epq import bulk

    # on Redis, refused while the first run's call is in flight (its reply is still read); on
    # the other brokers the whole batch is one run, refused before it is published
    broker.add_middleware(_Refuse(bulk.SCRIPT_RUN + 50, MiddlewareError("refused")))
    svc = epq.QueueService(broker)
    with pytest.raises(MiddlewareError):
        svc.enqueue_many([_index(i) for i in range(2 * bulk.SCRIPT_RUN)])
    enqueued = total_waiting(broker)
    assert enqueued == (bulk.SCRIPT_RUN if bulk._fused(broker) else 0)
    # the connection is as good as before: the rest go in, and the earlier ones are duplicates
    results = svc.enqueue_many([_index(i) for i in range(2 * bulk.SCRIPT_RUN)])
    assert sum(r.unique_skipped_as_duplicate for r in results) == enqueued
    assert total_waiting(broker) == 2 * bulk.SCRIPT_RUN


def test_an_error_in_another_middleware_is_logged_and_the_batch_goes_on(broker: dramatiq.Broker) -> None:
    broker.add_middleware(_Refuse(2, RuntimeError("a bug elsewhere")))  # as Dramatiq's emit does
    results = epq.QueueService(broker).enqueue_many([_index(i) for i in range(3)])
    assert not any(r.unique_skipped_as_duplicate for r in results)
    assert total_waiting(broker) == 3


def test_one_key_across_runs_and_ways_goes_to_the_earliest_request(broker: dramatiq.Broker) -> None:
    from epq import bulk

    later = datetime.now(timezone.utc) + timedelta(hours=1)
    requests = [_index(i) for i in range(bulk.SCRIPT_RUN)]  # a whole run
    requests += [_index(0), _index(500, run_at=later), _index(500), _index(1, run_at=later)]
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
        requests.append((kind, _request(kind, n, priority)))
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


@pytest.mark.redis
def test_a_lost_reply_in_the_middle_of_a_batch_is_reported_with_the_requests_it_covers(
    redis_broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from epq import bulk

    reads = [0]
    original = ScriptStream.read

    def read(self: ScriptStream) -> Any:
        reads[0] += 1
        if reads[0] == 2:
            self.conn.disconnect()
            self.call = None
            raise redis.ConnectionError("reply lost")
        return original(self)

    monkeypatch.setattr(ScriptStream, "read", read)
    run = bulk.SCRIPT_RUN
    with pytest.raises(epq.BrokerUnavailable) as failed:
        epq.QueueService(redis_broker).enqueue_many([_index(i) for i in range(3 * run)])
    text = str(failed.value)
    assert f"failed after {run} of {3 * run} jobs" in text
    assert f"requests [0] to [{run - 1}] were handled" in text
    assert f"requests [{run}] to [{2 * run - 1}] may have been" in text


@pytest.mark.redis
def test_a_bulk_call_run_again_returns_its_first_reply_and_writes_nothing(
    redis_broker: dramatiq.Broker,
) -> None:
    # even when a job's record is gone in between (say, purged), it is not enqueued again
    from epq import bulk

    stores = backend(redis_broker)
    target = bulk._Target(redis_broker, stores.state, stores.records)
    jobs = bulk._prepare(target, [(epq.actors.index_endpoint, _index(i)) for i in range(3)], 0)
    bulk._build(target, jobs, holders=False)
    fused = bulk._FusedRuns(target, [None] * 3, [None] * 3, [])
    keys, args = redis_broker.bulk_call(fused._bulk_jobs(jobs))  # type: ignore[attr-defined]
    assert args[-15:][3::5] == ["", "", ""]  # the script makes the messages, from the payloads
    script = redis_broker._enqueue_many_recorded  # type: ignore[attr-defined]
    first = script(keys=keys, args=args)
    stores.records.delete(jobs[0].message.message_id)
    assert script(keys=keys, args=args) == first
    assert message_count(redis_broker, "default") == 3


@pytest.mark.redis
def test_a_single_enqueue_sent_again_after_its_reply_was_lost_pushes_the_job_once(
    redis_broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    _lose_replies(monkeypatch)
    svc = epq.QueueService(redis_broker)
    result = svc.enqueue_index_endpoint(_index(0))
    monkeypatch.undo()
    assert result.unique_skipped_as_duplicate is False
    assert message_count(redis_broker, "default") == 1
    assert [(row["queue"], row["waiting"]) for row in svc.stats()] == [("default", 1)]
    # and without a lock to tell a second run by (a job of a kind without uniqueness)
    _lose_replies(monkeypatch)
    message = epq.actors.index_endpoint.send_with_options(
        kwargs=_index(1).model_dump(mode="json"), unique_for=0
    )
    monkeypatch.undo()
    assert message_count(redis_broker, "default") == 2
    assert [(row["queue"], row["waiting"]) for row in svc.stats()] == [("default", 2)]
    assert svc.get_job(message.message_id) is not None


@pytest.mark.redis
def test_an_enqueue_on_a_kept_connection_the_server_closed_goes_through(
    redis_broker: dramatiq.Broker, redis_client: redis.Redis
) -> None:
    svc = epq.QueueService(redis_broker)
    svc.enqueue_index_endpoint(_index(0))  # leaves a connection kept for the next enqueue
    kept = redis_broker._kept.idle[-1]  # type: ignore[attr-defined]
    kept.send_command("CLIENT", "ID")
    redis_client.client_kill_filter(_id=kept.read_response())  # as a server timeout would
    assert not svc.enqueue_index_endpoint(_index(1)).unique_skipped_as_duplicate
    assert not svc.enqueue_many([_index(2)])[0].unique_skipped_as_duplicate
    assert message_count(redis_broker, "default") == 3


@pytest.mark.redis
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_use_its_parents_kept_connections(redis_broker: dramatiq.Broker) -> None:
    epq.QueueService(redis_broker).enqueue_index_endpoint(_index(0))
    kept = redis_broker._kept  # type: ignore[attr-defined]
    parents = list(kept.idle)
    assert parents
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (forked with or without Python's fork hooks, it checks its pid)
        os.write(write, str(sum(kept.get_connection() is c for c in parents)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        assert pipe.read() == "0"
    os.waitpid(pid, 0)
    assert kept.idle == parents  # the parent keeps its own


def test_kept_connections_leave_a_small_pool_most_of_its_connections() -> None:
    from epq.backends.redis.connections import KeptConnections

    class Pool:
        max_connections = 8

        def __init__(self) -> None:
            self.released: list[object] = []

        def get_connection(self) -> object:
            return type("Connection", (), {"_sock": object()})()  # a connected one

        def release(self, connection: object) -> None:
            self.released.append(connection)

    pool = Pool()
    kept = KeptConnections(pool)
    taken = [kept.get_connection() for _ in range(5)]
    for connection in taken:
        kept.release(connection)
    assert len(kept.idle) == 2  # a quarter of the pool's 8
    assert pool.released == taken[2:]
    assert kept.get_connection() is taken[1]  # the idle ones are used first
    taken[0]._sock = None  # type: ignore[attr-defined]  # disconnected: back to the pool, not kept
    kept.release(taken[0])
    assert pool.released[-1] is taken[0]


@pytest.mark.redis
def test_the_messages_the_bulk_script_makes_are_the_messages_epq_sends(
    redis_broker: dramatiq.Broker, redis_client: redis.Redis
) -> None:
    results = epq.QueueService(redis_broker).enqueue_many(
        [_index(0, priority=1), _index(1), ("register_job", _request("register_job", 2, None))]
    )
    for result in results:
        job = result.job
        data = redis_client.hget("dramatiq:default.msgs", job.id)
        message = dramatiq.Message.decode(data)
        assert (message.message_id, message.queue_name, message.actor_name) == (job.id, job.queue, job.kind)
        assert message.kwargs == job.args
        assert message.message_timestamp == round(job.created_at.timestamp() * 1000)
        record = redis_client.hgetall(f"epq:job:{job.id}")
        assert message.options == {
            "epq_recorded": 1,
            "epq_priority": int(job.priority),
            "epq_unique_key": record[b"unique_key"].decode(),
            "redis_message_id": job.id,
        }
