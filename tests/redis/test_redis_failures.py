"""Error paths on Redis: an unreadable schedule entry, dead records that expire, and a message that
is not JSON in a queue."""

from __future__ import annotations

from typing import Any

import dramatiq
import pytest

import epq
import epq.actors
from epq.backends.redis.keys import SCHEDULE as SCHEDULE_KEY
from epq.backends.redis.keys import SCHEDULE_DATA as SCHEDULE_DATA_KEY
from epq.schedule import promote_due
from epq.testing import HandlerRegistry, backend
from tests.support.helpers import VALID, message_count, wait_for


@pytest.mark.redis
def test_an_unreadable_schedule_entry_does_not_block_the_others(redis_broker: dramatiq.Broker) -> None:
    client = redis_broker.client  # type: ignore[attr-defined]
    now = backend(redis_broker).state.now_ms()
    client.hset(SCHEDULE_DATA_KEY, "garbage", b"not json")
    client.zadd(SCHEDULE_KEY, {"garbage": now - 1000})
    epq.actors.register_job.send_with_options(kwargs=VALID["register_job"], delay=1)
    moved = [0]

    def promote() -> bool:
        moved[0] += promote_due(redis_broker, backend(redis_broker).state)[0]
        return moved[0] >= 1

    assert wait_for(promote)
    assert message_count(redis_broker, "default") == 1
    assert client.hget(SCHEDULE_DATA_KEY + ":unreadable", "garbage") == b"not json"
    assert backend(redis_broker).state.schedule_size() == 0


@pytest.mark.redis
def test_expired_dead_records_leave_the_dead_list_and_the_stats(
    redis_broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    def fails(request: Any) -> None:
        raise RuntimeError("no")

    epq_handlers.register("register_job", fails)
    worker = dramatiq.Worker(redis_broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        message = epq.actors.register_job.send_with_options(kwargs=VALID["register_job"], backoff_ms=[1])
        svc = epq.QueueService(redis_broker)
        assert wait_for(lambda: len(svc.list_dead()) == 1, timeout=10)
    finally:
        worker.stop()
    assert [r["dead"] for r in svc.stats()] == [1]
    redis_broker.client.pexpire(f"epq:job:{message.message_id}", 1)  # type: ignore[attr-defined]
    assert wait_for(lambda: svc.list_dead() == [])
    assert all(r["dead"] == 0 for r in svc.stats())
    assert redis_broker.client.zcard("epq:dead") == 0  # type: ignore[attr-defined]


@pytest.mark.redis
def test_an_undecodable_message_on_redis_is_dead_lettered_and_the_worker_goes_on(
    redis_broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    # Given a message that is not JSON waiting ahead of a valid job
    client = redis_broker.client  # type: ignore[attr-defined]
    client.hset("dramatiq:default.msgs", "junk", b"not json {")
    client.rpush("dramatiq:default.P1", "junk")
    received = epq_handlers.record("register_job")
    epq.actors.register_job.send(**VALID["register_job"])
    # When a worker runs
    worker = dramatiq.Worker(redis_broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        # Then the valid job runs, and the junk is in the dead-letter queue with its data
        assert wait_for(lambda: len(received) == 1, timeout=10)
        assert wait_for(lambda: message_count(redis_broker, "default.XQ") == 1, timeout=10)
    finally:
        worker.stop()
    assert client.hget("dramatiq:default.XQ.msgs", "junk") == b"not json {"
    assert message_count(redis_broker, "default") == 0


class _Interrupt(BaseException):
    """Stands for an interrupt raised into a thread that is sending (Dramatiq's time limit)."""


@pytest.mark.redis
def test_a_job_enqueued_by_hand_is_written_whole_or_not_at_all(
    redis_broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from epq.backends.redis.connections import ScriptStream

    def unreachable(self: Any) -> None:
        raise redis.ConnectionError("Error 111 connecting: Connection refused.")

    # Given an epq message built and enqueued by hand (what Dramatiq's pipelines do), on a Redis
    # that keeps epq's records: when its script never reaches Redis
    message = epq.actors.register_job.message(**VALID["register_job"])
    monkeypatch.setattr(ScriptStream, "_send", unreachable)
    with pytest.raises(redis.ConnectionError):
        redis_broker.enqueue(message)
    monkeypatch.undo()
    # then nothing of it was written: no record, no lock, no message
    client = redis_broker.client  # type: ignore[attr-defined]
    assert epq.QueueService(redis_broker).get_job(message.message_id) is None
    assert client.keys("epq:unique:*") == []
    assert message_count(redis_broker, "default") == 0
    # and the same job goes in once Redis answers, lock and record with it
    redis_broker.enqueue(message)
    assert epq.QueueService(redis_broker).get_job(message.message_id) is not None
    assert len(client.keys("epq:unique:*")) == 1
    assert message_count(redis_broker, "default") == 1


@pytest.mark.redis
def test_an_interrupt_after_the_insert_leaves_the_job_with_its_record(
    redis_broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from epq.backends.redis.connections import ScriptStream

    read = ScriptStream.read

    def read_then_interrupt(self: Any) -> Any:
        read(self)
        raise _Interrupt

    monkeypatch.setattr(ScriptStream, "read", read_then_interrupt)
    with pytest.raises(_Interrupt):
        epq.QueueService(redis_broker).enqueue_register_job(VALID["register_job"])
    monkeypatch.undo()
    # the script ran: the job waits, and keeps its record and its lock
    client = redis_broker.client  # type: ignore[attr-defined]
    assert message_count(redis_broker, "default") == 1
    assert len(client.keys("epq:job:*")) == 1
    assert len(client.keys("epq:unique:*")) == 1
