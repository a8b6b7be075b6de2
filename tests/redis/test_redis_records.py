"""Job records on the Redis broker that keeps epq's state: a waiting job's payload is stored once,
in its message, and the record takes it when the message goes."""

from __future__ import annotations

import json

import dramatiq
import pytest
import redis

import epq
from epq.testing import HandlerRegistry, backend, drain
from tests.support.helpers import VALID


def _record(client: redis.Redis, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in client.hgetall(f"epq:job:{job_id}").items()}


@pytest.mark.redis
def test_a_waiting_jobs_payload_is_kept_in_its_message_only(
    redis_broker: dramatiq.Broker, redis_client: redis.Redis
) -> None:
    svc = epq.QueueService(redis_broker)
    single = svc.enqueue_register_job(VALID["register_job"]).job.id
    (bulk,) = svc.enqueue_many([("index_endpoint", VALID["index_endpoint"])])

    for job_id in (single, bulk.job.id):
        assert "args" not in _record(redis_client, job_id)
        # Redis's compact encoding of a small hash (listpack from Redis 7, ziplist before), not a table
        assert redis_client.object("encoding", f"epq:job:{job_id}") in {b"listpack", b"ziplist"}
    assert svc.get_job(single).args == VALID["register_job"]  # type: ignore[union-attr]


@pytest.mark.redis
def test_a_completed_jobs_record_takes_its_payload_as_the_message_goes(
    redis_broker: dramatiq.Broker, redis_client: redis.Redis, epq_handlers: HandlerRegistry
) -> None:
    epq_handlers.register("register_job", lambda request: None)
    job_id = epq.QueueService(redis_broker).enqueue_register_job(VALID["register_job"]).job.id
    worker = dramatiq.Worker(redis_broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        drain(redis_broker, worker)
    finally:
        worker.stop()

    assert redis_client.hget("dramatiq:default.msgs", job_id) is None
    record = _record(redis_client, job_id)
    assert record["state"] == "completed"
    assert epq.QueueService(redis_broker).get_job(job_id).args == VALID["register_job"]  # type: ignore[union-attr]
    assert record["args"]


@pytest.mark.redis
def test_a_job_whose_message_is_corrupted_keeps_its_payload_in_its_dead_record_and_can_be_retried(
    redis_broker: dramatiq.Broker, redis_client: redis.Redis, epq_handlers: HandlerRegistry
) -> None:
    # Given a waiting job (its payload in its message only) whose message gets corrupted
    received = epq_handlers.record("register_job")
    svc = epq.QueueService(redis_broker)
    job_id = svc.enqueue_register_job(VALID["register_job"]).job.id
    fields = json.loads(redis_client.hget("dramatiq:default.msgs", job_id))
    fields["options"]["retries"] = "three"
    redis_client.hset("dramatiq:default.msgs", job_id, json.dumps(fields))
    # When a worker refuses it (dead-lettered: the message leaves the queue)
    worker = dramatiq.Worker(redis_broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        drain(redis_broker, worker)
        assert svc.get_job(job_id).state is epq.JobState.DISCARDED  # type: ignore[union-attr]
        # Then its dead record still holds the payload
        assert _record(redis_client, job_id)["args"]
        assert svc.get_job(job_id).args == VALID["register_job"]  # type: ignore[union-attr]
        # and it runs again with it
        svc.retry_dead(job_id)
        drain(redis_broker, worker)
    finally:
        worker.stop()
    assert [r.job_id for r in received] == [VALID["register_job"]["job_id"]]


@pytest.mark.redis
def test_a_dead_record_without_its_payload_is_not_retried_and_stays_dead(
    redis_broker: dramatiq.Broker, redis_client: redis.Redis, epq_handlers: HandlerRegistry
) -> None:
    # Given a dead job whose record lost its payload (as a worker of the previous version leaves
    # a job it discards: it wrote no payload into a record filed without one)
    svc = epq.QueueService(redis_broker)
    job_id = svc.enqueue_register_job(VALID["register_job"]).job.id
    worker = dramatiq.Worker(redis_broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        drain(redis_broker, worker, fail_fast=False)  # (no handler: it dies)
    finally:
        worker.stop()
    redis_client.hdel(f"epq:job:{job_id}", "args")
    # When an operator retries it, then it is refused and stays dead, listed and retryable later
    with pytest.raises(epq.InvalidPayload, match="payload"):
        svc.retry_dead(job_id)
    assert svc.get_job(job_id).state is epq.JobState.DISCARDED  # type: ignore[union-attr]
    assert [r.id for r in svc.list_dead()] == [job_id]


@pytest.mark.redis
def test_the_lag_is_read_from_the_lanes_with_no_index_of_waiting_jobs(
    redis_broker: dramatiq.Broker, redis_client: redis.Redis
) -> None:
    svc = epq.QueueService(redis_broker)
    first = svc.enqueue_register_job(VALID["register_job"]).job
    svc.enqueue_register_job({**VALID["register_job"], "job_id": "job-2"})

    oldest = backend(redis_broker).records.oldest_waiting()  # type: ignore[attr-defined]

    assert oldest == {("default", 2): round(first.created_at.timestamp() * 1000)}
    assert redis_client.keys("epq:stats:waiting:*") == []  # (no per-job index: the lanes tell it)
