"""Bulk enqueue on Redis, where one script writes the messages, records and locks of a run of
jobs: one round trip a run, replies lost on the way back, scripts the server lost, and the
connections kept for the next call."""

from __future__ import annotations

import os
from typing import Any

import dramatiq
import pytest
import redis

import epq
import epq.actors
from epq.backends.redis.connections import ScriptStream
from epq.records import lock_key_of
from epq.testing import backend
from tests.support.helpers import index_request, keyed_request, message_count


@pytest.mark.redis
def test_enqueue_many_on_redis_is_one_round_trip_per_chunk(
    redis_broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from epq import insert as bulk

    svc = epq.QueueService(redis_broker)
    # warm up: the connection, and the single and bulk scripts loaded (the server keeps scripts
    # from test to test: this one also runs first)
    svc.enqueue_index_endpoint(index_request(10_000))
    svc.enqueue_many([index_request(10_001)])
    sent = [0]
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent[0] += 1
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    n = 2 * bulk.SCRIPT_RUN
    results = svc.enqueue_many([index_request(i) for i in range(n)])
    monkeypatch.undo()
    assert len(results) == n
    # one script per chunk, then reading nothing more (no duplicates to look up)
    assert sent[0] <= 2 + 1, sent[0]
    assert message_count(redis_broker, "default") == n + 2


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
    results = svc.enqueue_many([index_request(n) for n in range(5)] + [index_request(0)])
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
        epq.QueueService(redis_broker).enqueue_many([index_request(n) for n in range(3)])


@pytest.mark.redis
def test_bulk_enqueue_gives_a_server_that_lost_its_scripts_the_script_again(
    redis_broker: dramatiq.Broker,
) -> None:
    svc = epq.QueueService(redis_broker)
    svc.enqueue_many([index_request(0)])
    redis_broker.client.script_flush()  # type: ignore[attr-defined]  # as after a Redis restart
    results = svc.enqueue_many([index_request(n) for n in range(1, 4)])
    assert [r.unique_skipped_as_duplicate for r in results] == [False] * 3
    assert message_count(redis_broker, "default") == 4


@pytest.mark.redis
def test_a_lost_reply_in_the_middle_of_a_batch_is_reported_with_the_requests_it_covers(
    redis_broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from epq import insert as bulk

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
        epq.QueueService(redis_broker).enqueue_many([index_request(i) for i in range(3 * run)])
    text = str(failed.value)
    assert f"failed after {run} of {3 * run} jobs" in text
    assert f"requests [0] to [{run - 1}] were handled" in text
    assert f"requests [{run}] to [{2 * run - 1}] may have been" in text


@pytest.mark.redis
def test_a_bulk_call_run_again_returns_its_first_reply_and_writes_nothing(
    redis_broker: dramatiq.Broker,
) -> None:
    # even when a job's record is gone in between (say, purged), it is not enqueued again
    from epq import insert as bulk

    stores = backend(redis_broker)
    target = bulk._target(redis_broker)
    jobs = bulk._prepare(target, [(epq.actors.index_endpoint, index_request(i)) for i in range(3)], 0)
    bulk._build(target, jobs, holders=False)
    fused = bulk._FusedRuns(target, [None] * 3, [None] * 3, [])
    keys, args = redis_broker.bulk_call(fused._bulk_jobs(jobs))  # type: ignore[attr-defined]
    assert args[-18:][3::6] == ["", "", ""]  # the script makes the messages, from the payloads
    script = redis_broker._lua["enqueue_many_recorded"]  # type: ignore[attr-defined]
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
    result = svc.enqueue_index_endpoint(index_request(0))
    monkeypatch.undo()
    assert result.unique_skipped_as_duplicate is False
    assert message_count(redis_broker, "default") == 1
    assert [(row["queue"], row["waiting"]) for row in svc.stats()] == [("default", 1)]
    # and without a lock to tell a second run by (a job of a kind without uniqueness)
    _lose_replies(monkeypatch)
    message = epq.actors.index_endpoint.send_with_options(
        kwargs=index_request(1).model_dump(mode="json"), unique_for=0
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
    svc.enqueue_index_endpoint(index_request(0))  # leaves a connection kept for the next enqueue
    kept = redis_broker._kept.idle[-1]  # type: ignore[attr-defined]
    kept.send_command("CLIENT", "ID")
    redis_client.client_kill_filter(_id=kept.read_response())  # as a server timeout would
    assert not svc.enqueue_index_endpoint(index_request(1)).unique_skipped_as_duplicate
    assert not svc.enqueue_many([index_request(2)])[0].unique_skipped_as_duplicate
    assert message_count(redis_broker, "default") == 3


@pytest.mark.redis
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_use_its_parents_kept_connections(redis_broker: dramatiq.Broker) -> None:
    epq.QueueService(redis_broker).enqueue_index_endpoint(index_request(0))
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
        [
            index_request(0, priority=1),
            index_request(1),
            ("register_job", keyed_request("register_job", 2, None)),
        ]
    )
    for result in results:
        job = result.job
        data = redis_client.hget("dramatiq:default.msgs", job.id)
        message = dramatiq.Message.decode(data)
        assert (message.message_id, message.queue_name, message.actor_name) == (job.id, job.queue, job.kind)
        assert message.kwargs == job.args
        assert message.message_timestamp == round(job.created_at.timestamp() * 1000)
        record = {k.decode(): v.decode() for k, v in redis_client.hgetall(f"epq:job:{job.id}").items()}
        assert "args" not in record  # (the payload is kept once, in the message)
        assert message.options == {
            "epq_recorded": 1,
            "epq_priority": int(job.priority),
            "epq_unique_key": lock_key_of(record),
            "redis_message_id": job.id,
        }
