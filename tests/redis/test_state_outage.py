"""The state store killed with SIGKILL for 5 s under load: nothing lost, nothing dead-lettered.

The state Redis here is a private server of this test (``brokers/redis-start``), killed and
started again on the same port and data directory (it keeps its data in its append-only file).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis

import epq
from epq.testing import install
from tests.conftest import RABBITMQ_URL, REDIS_URL, rabbitmq_available
from tests.support.helpers import VALID, message_count, wait_for
from tests.support.servers import PrivateServer, free_port, stop_server
from tests.support.workers import BIN, HOLD_HANDLERS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

OUTAGE_S = 5
WORKER = [str(BIN / "dramatiq"), "epq.actors", HOLD_HANDLERS, "--processes", "1", "--threads", "8"]


class StateRedis:
    """A private state Redis that can be killed and started again with its data."""

    def __init__(self, datadir: Path) -> None:
        self.server = PrivateServer("redis", free_port(20000, 29999), datadir)
        self.server.ensure_started()
        self.url = f"{self.server.url}/0"

    def kill(self) -> None:
        stop_server("redis", self.server.datadir)  # brokers/redis-stop --kill: SIGKILL
        self.server.started = False

    def start(self) -> None:
        self.server.ensure_started()


@pytest.fixture
def state_redis(tmp_path: Path) -> Iterator[StateRedis]:
    server = StateRedis(tmp_path / "state-redis")
    yield server
    server.kill()


def _requests(n: int, prefix: str, **extra: Any) -> list[tuple[str, dict[str, Any]]]:
    return [("register_job", {**VALID["register_job"], "job_id": f"{prefix}-{i}", **extra}) for i in range(n)]


def _kill_for_a_while(state: StateRedis) -> None:
    state.kill()
    time.sleep(OUTAGE_S)
    state.start()


def _everything_ran_once_or_more(worker: Any, broker: Any, ids: set[str], timeout: float) -> Counter[str]:
    reports = worker.collect(len(ids), timeout=timeout)
    counts = Counter(r["job_id"] for r in reports)
    while set(counts) != ids:  # duplicates (at-least-once) may have taken some of the first n
        reports = worker.collect(1, timeout=timeout)
        counts.update(r["job_id"] for r in reports)
    return counts


def _drain_through_an_outage(start_worker: Any, broker_url: str, state: StateRedis) -> None:
    broker = install(broker_url, state_url=state.url)
    svc = epq.QueueService(broker)
    # Given 2,000 jobs draining (5 ms each) on a worker whose state store is a private Redis
    ids = {r.job.id for r in svc.enqueue_many(_requests(2000, "drain"))}
    env = {"EPQ_BROKER_URL": broker_url, "EPQ_STATE_URL": state.url, "EPQ_TEST_WORK_MS": "5"}
    worker = start_worker(WORKER, env)
    assert wait_for(lambda: worker.results.llen(worker.key) >= 300, timeout=60), worker.log.read_text()
    # When the state Redis is killed with SIGKILL, and started again 5 s later
    _kill_for_a_while(state)
    # Then every job runs, none is dead-lettered, and every record ends completed
    counts = _everything_ran_once_or_more(worker, broker, ids, timeout=90)
    print(f"\n{len(ids)} jobs, {sum(counts.values()) - len(ids)} ran twice (at-least-once)")
    assert message_count(broker, "default.XQ") == 0
    assert svc.list_dead() == []
    assert wait_for(lambda: all(svc.get_job(i).state is epq.JobState.COMPLETED for i in ids), timeout=30)  # type: ignore[union-attr]


@pytest.mark.rabbitmq
def test_a_state_outage_while_draining_on_rabbitmq_loses_nothing(
    start_worker: Any, state_redis: StateRedis
) -> None:
    rabbitmq_available(RABBITMQ_URL)
    _drain_through_an_outage(start_worker, RABBITMQ_URL, state_redis)


@pytest.mark.redis
def test_a_state_outage_while_draining_on_redis_with_a_separate_state_store_loses_nothing(
    start_worker: Any, redis_client: redis.Redis, state_redis: StateRedis
) -> None:
    _drain_through_an_outage(start_worker, REDIS_URL, state_redis)


@pytest.mark.rabbitmq
def test_a_state_outage_while_promoting_scheduled_jobs_dead_letters_nothing(
    start_worker: Any, state_redis: StateRedis
) -> None:
    rabbitmq_available(RABBITMQ_URL)
    broker = install(RABBITMQ_URL, state_url=state_redis.url)
    broker.flush_all()
    svc = epq.QueueService(broker)
    env = {"EPQ_BROKER_URL": RABBITMQ_URL, "EPQ_STATE_URL": state_redis.url, "EPQ_TEST_WORK_MS": "5"}
    worker = start_worker(WORKER, env)
    # Given 500 jobs scheduled to run 4 s from now, and a worker promoting them
    due = time.time() + 4
    run_at = datetime.fromtimestamp(due, timezone.utc)
    ids = {r.job.id for r in svc.enqueue_many(_requests(500, "promote", run_at=run_at.isoformat()))}
    # When the state Redis is killed as they come due, for 5 s
    time.sleep(max(0.0, due - time.time() + 0.05))
    _kill_for_a_while(state_redis)
    # Then every job runs (twice at most, as at-least-once allows), none is dead-lettered
    counts = _everything_ran_once_or_more(worker, broker, ids, timeout=90)
    print(f"\n{len(ids)} scheduled jobs, {sum(counts.values()) - len(ids)} ran twice (at-least-once)")
    assert max(counts.values()) <= 2
    assert message_count(broker, "default.XQ") == 0
    assert svc.list_dead() == []
