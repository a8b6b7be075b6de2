"""Scheduled jobs survive workers killed with SIGKILL, and two promoters never promote twice."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

from epq.schedule import promote_due
from epq.testing import backend, install, reset
from tests.conftest import RABBITMQ_URL, REDIS_URL, STATE_URL, rabbitmq_available
from tests.support.helpers import VALID, message_count
from tests.support.workers import BIN

pytestmark = pytest.mark.slow

WORKER = [str(BIN / "dramatiq"), "epq.actors", "--processes", "2", "--threads", "2"]
JOBS = 200


def _kill_while_scheduled(
    start_worker: Any, env: dict[str, str], broker_url: str, state_url: str | None
) -> None:
    install(broker_url, state_url=state_url)
    from epq import actors

    # Given running workers (proved by a job they ran)
    first = start_worker(WORKER, env)
    probe = actors.register_job.send(**{**VALID["register_job"], "job_id": "probe"})
    assert [r["job_id"] for r in first.collect(1)] == [probe.message_id]
    # and 200 jobs scheduled 8 s ahead (due after the kill, however slowly a loaded machine sends them)
    ids = {
        actors.register_job.send_with_options(
            kwargs={**VALID["register_job"], "job_id": f"job-{i}"}, delay=8000
        ).message_id
        for i in range(JOBS)
    }
    # When every worker process is killed with SIGKILL, and a new one starts 5 s later
    first.kill9()
    time.sleep(5)
    assert first.results.llen(first.key) == 0
    second = start_worker(WORKER, env, key=first.key)
    # Then every job runs, each exactly once
    reports = second.collect(JOBS, timeout=30)
    counts = Counter(r["job_id"] for r in reports)
    assert set(counts) == ids
    assert set(counts.values()) == {1}
    assert second.results.blpop([second.key], timeout=2) is None


@pytest.mark.redis
def test_scheduled_jobs_survive_kill9_on_redis(start_worker: Any, redis_client: redis.Redis) -> None:
    _kill_while_scheduled(start_worker, {"EPQ_BROKER_URL": REDIS_URL}, REDIS_URL, None)


@pytest.mark.rabbitmq
def test_scheduled_jobs_survive_kill9_on_rabbitmq(start_worker: Any, state_client: redis.Redis) -> None:
    rabbitmq_available(RABBITMQ_URL)
    broker = install(RABBITMQ_URL, state_url=STATE_URL)
    broker.flush_all()
    env = {"EPQ_BROKER_URL": RABBITMQ_URL, "EPQ_STATE_URL": STATE_URL}
    _kill_while_scheduled(start_worker, env, RABBITMQ_URL, STATE_URL)


# ---- two promoters side by side ------------------------------------------------------------

PROMOTED_JOBS = 2000


def _promoter(broker_url: str, state_url: str | None, barrier: Any, out: Any) -> None:
    broker = install(broker_url, state_url=state_url)
    state = backend(broker).state
    barrier.wait(timeout=60)
    promoted = 0
    deadline = time.monotonic() + 60
    while state.schedule_size() and time.monotonic() < deadline:
        moved, _ = promote_due(broker, state, limit=20)
        promoted += moved
    out.put(promoted)
    reset()


def _queued_message_ids(broker: dramatiq.Broker) -> list[str]:
    if isinstance(broker, RedisBroker):
        rids = broker.client.lrange("dramatiq:default.P2", 0, -1)  # register_job's priority lane
        datas = broker.client.hmget("dramatiq:default.msgs", rids) if rids else []
        return [dramatiq.Message.decode(d).message_id for d in datas]
    assert isinstance(broker, RabbitmqBroker)
    ids = []
    while True:
        method, _, body = broker.channel.basic_get("default", auto_ack=True)
        if method is None:
            return ids
        ids.append(dramatiq.Message.decode(body).message_id)


def _promoters_race(broker: dramatiq.Broker, broker_url: str, state_url: str | None) -> None:
    # Given 2000 jobs in the schedule, all coming due at once
    from epq import actors

    sent = {
        actors.register_job.send_with_options(
            kwargs={**VALID["register_job"], "job_id": f"j{i}"}, delay=2000, unique_for=0
        ).message_id
        for i in range(PROMOTED_JOBS)
    }
    # When two promoter processes work the schedule side by side, 20 messages a step
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_promoter, args=(broker_url, state_url, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    counts = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    # Then every job was promoted exactly once, and both promoters took part
    assert sum(counts) == PROMOTED_JOBS
    assert min(counts) > 0, counts
    assert message_count(broker, "default") == PROMOTED_JOBS
    queued = _queued_message_ids(broker)
    assert len(queued) == PROMOTED_JOBS
    assert set(queued) == sent


@pytest.mark.redis
def test_two_promoters_on_redis_move_each_job_once(redis_broker: dramatiq.Broker) -> None:
    _promoters_race(redis_broker, REDIS_URL, None)


@pytest.mark.redis
def test_two_promoters_claiming_from_a_separate_state_client_move_each_job_once(
    redis_client: redis.Redis,
) -> None:
    # a state URL of its own makes the promoters claim, publish, then forget (the RabbitMQ path)
    broker = install(REDIS_URL, state_url=REDIS_URL)
    _promoters_race(broker, REDIS_URL, REDIS_URL)


@pytest.mark.rabbitmq
def test_two_promoters_on_rabbitmq_move_each_job_once(rabbitmq_broker: dramatiq.Broker) -> None:
    _promoters_race(rabbitmq_broker, RABBITMQ_URL, STATE_URL)
