"""Priority on Redis: a list per priority lane in each queue, which requeued, promoted and
recovered messages go back to, and a consumer that gives back what it fetched."""

from __future__ import annotations

import time

import dramatiq
import pytest
import redis

import epq
from epq.schedule import promote_due
from epq.testing import HandlerRegistry, backend, install
from tests.conftest import REDIS_URL
from tests.e2e.test_cli import run_epq
from tests.support.helpers import StartLog, keyed_request, message_count, soon, wait_for


@pytest.mark.redis
def test_redis_keeps_a_list_per_priority_lane(
    redis_broker: dramatiq.Broker, redis_client: redis.Redis
) -> None:
    svc = epq.QueueService(redis_broker)
    for n, priority in enumerate((1, 2, 3, 4, 4, None)):
        svc.enqueue_register_job(keyed_request("register_job", n, priority))
    lengths = [redis_client.llen(f"dramatiq:default.P{lane}") for lane in (1, 2, 3, 4)]
    assert lengths == [1, 2, 1, 2]
    assert message_count(redis_broker, "default") == 6
    redis_broker.flush("default")
    assert redis_client.keys("dramatiq:default*") == []


@pytest.mark.redis
def test_redis_requeued_messages_go_back_to_the_front_of_their_lane(redis_broker: dramatiq.Broker) -> None:
    # Given a worker that fetched a priority-4 and a priority-1 job, then shut down (requeue)
    svc = epq.QueueService(redis_broker)
    low = svc.enqueue_register_job(keyed_request("register_job", 0, 4)).job.id
    high = svc.enqueue_register_job(keyed_request("register_job", 1, 1)).job.id
    fetched = [dramatiq.Message.decode(d) for _, d in redis_broker.fetch_lanes("default", 2)]  # type: ignore[attr-defined]
    assert [m.message_id for m in fetched] == [high, low]
    redis_broker.do_requeue("default", *[m.options["redis_message_id"] for m in fetched])  # type: ignore[attr-defined]
    # and jobs enqueued since
    later_high = svc.enqueue_register_job(keyed_request("register_job", 2, 1)).job.id
    later_low = svc.enqueue_register_job(keyed_request("register_job", 3, 4)).job.id
    # When a worker fetches again
    again = [dramatiq.Message.decode(d) for _, d in redis_broker.fetch_lanes("default", 10)]  # type: ignore[attr-defined]
    # Then the requeued jobs are back in their lanes, ahead of the newer ones of their priority
    assert [m.message_id for m in again] == [high, later_high, low, later_low]


@pytest.mark.redis
def test_redis_promotes_a_scheduled_job_into_its_lane(
    redis_broker: dramatiq.Broker, redis_client: redis.Redis
) -> None:
    svc = epq.QueueService(redis_broker)
    svc.enqueue_register_job(keyed_request("register_job", 0, 4))
    svc.enqueue_register_job({**keyed_request("register_job", 1, 1), "run_at": soon()})
    time.sleep(0.3)
    moved, _ = promote_due(redis_broker, backend(redis_broker).state)
    assert moved == 1
    assert [redis_client.llen(f"dramatiq:default.P{lane}") for lane in (1, 4)] == [1, 1]


@pytest.mark.redis
def test_migrate_queues_has_nothing_to_do_on_redis(redis_client: redis.Redis) -> None:
    out = run_epq("migrate-queues", env={"EPQ_BROKER_URL": REDIS_URL})
    assert (out.returncode, out.stdout.strip()) == (0, "nothing to migrate: only RabbitMQ queues need it")


@pytest.mark.redis
def test_redis_recovers_the_messages_of_a_dead_worker_into_their_lanes(redis_broker: dramatiq.Broker) -> None:
    # Given a worker that fetched a priority-1 and a priority-4 job, then died (no more heartbeats)
    svc = epq.QueueService(redis_broker)
    high = svc.enqueue_register_job(keyed_request("register_job", 0, 1)).job.id
    low = svc.enqueue_register_job(keyed_request("register_job", 1, 4)).job.id
    fetched = redis_broker.fetch_lanes("default", 2)  # type: ignore[attr-defined]
    assert len(fetched) == 2
    client = redis_broker.client  # type: ignore[attr-defined]
    client.zadd("dramatiq:__heartbeats__", {redis_broker.broker_id: 0})  # type: ignore[attr-defined]
    # and a newer priority-1 job
    newer = svc.enqueue_register_job(keyed_request("register_job", 2, 1)).job.id
    # When another worker runs Dramatiq's maintenance (each consumer does every few seconds), then
    # fetches
    other = install(REDIS_URL)
    other.maintain("default")  # type: ignore[attr-defined]
    again = [dramatiq.Message.decode(d).message_id for _, d in other.fetch_lanes("default", 10)]  # type: ignore[attr-defined]
    # Then the dead worker's jobs are fetched again, in priority order, ahead of newer ones
    assert again == [high, newer, low]


@pytest.mark.redis
def test_redis_jobs_fetched_but_not_run_at_shutdown_are_available_again(
    redis_broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    # Given a worker (one thread, so it prefetches two) busy with the first of three jobs
    log = StartLog(epq_handlers, work_s=0.3)
    svc = epq.QueueService(redis_broker)
    ids = [svc.enqueue_register_job(keyed_request("register_job", n, None)).job.id for n in range(3)]
    worker = dramatiq.Worker(redis_broker, worker_timeout=50, worker_threads=1)
    worker.start()
    assert wait_for(lambda: len(log.started) == 1)
    # When it shuts down
    worker.stop()
    # Then the job that ran is completed, and the others are waiting, with no attempt counted
    records = {job_id: svc.get_job(job_id) for job_id in ids}
    assert records[ids[0]].state is epq.JobState.COMPLETED  # type: ignore[union-attr]
    for job_id in ids[1:]:
        assert (records[job_id].state, records[job_id].attempt) == (epq.JobState.AVAILABLE, 0)  # type: ignore[union-attr]
    assert message_count(redis_broker, "default") == 2


@pytest.mark.redis
def test_redis_messages_fetched_but_not_handed_out_go_back_when_the_consumer_closes(
    redis_broker: dramatiq.Broker,
) -> None:
    svc = epq.QueueService(redis_broker)
    ids = [svc.enqueue_register_job(keyed_request("register_job", n, None)).job.id for n in range(3)]
    consumer = redis_broker.consume("default", prefetch=5, timeout=50)
    first = next(consumer)  # fetches all three, hands out one
    assert first is not None
    assert first.message_id == ids[0]
    consumer.close()
    # the two never handed out are waiting again; no record was started (only a worker thread
    # starts one, and none ran here)
    assert message_count(redis_broker, "default") == 2
    for job_id in ids:
        record = svc.get_job(job_id)
        assert (record.state, record.attempt) == (epq.JobState.AVAILABLE, 0)  # type: ignore[union-attr]


@pytest.mark.redis
def test_an_idle_consumer_waits_longer_between_polls_of_a_delay_queue(redis_broker: dramatiq.Broker) -> None:
    # epq's delays wait in its schedule, so Dramatiq's .DQ queues are polled at the worker's
    # timeout, and the work queues several times as often (a job starts soon on an idle worker)
    work = redis_broker.consume("default", timeout=1000)
    delays = redis_broker.consume("default.DQ", timeout=1000)
    try:
        assert work.timeout == 200  # type: ignore[attr-defined]
        assert delays.timeout == 1000  # type: ignore[attr-defined]
    finally:
        work.close()
        delays.close()
