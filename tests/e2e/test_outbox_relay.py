"""The relay as processes: ``epq relay`` killed with SIGKILL at random points while transactions
commit, and the relay inside every worker process; on Redis and on RabbitMQ."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import dramatiq
import psycopg
import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker

import epq
from tests.conftest import RABBITMQ_URL, REDIS_URL, STATE_URL
from tests.support.helpers import index_request, wait_for
from tests.support.postgres import POSTGRES_URL, rows
from tests.support.workers import BIN

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

TRANSACTIONS = 1000
MIN_KILLS = 20
WORKER = [str(BIN / "dramatiq"), "epq.actors", "--processes", "1", "--threads", "4"]
RELAY = [str(BIN / "epq"), "relay", "--batch", "20"]


def _urls(broker: dramatiq.Broker) -> dict[str, str]:
    if isinstance(broker, RabbitmqBroker):
        return {"EPQ_BROKER_URL": RABBITMQ_URL, "EPQ_STATE_URL": STATE_URL}
    return {"EPQ_BROKER_URL": REDIS_URL}


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    ]
)
def real_broker(outbox: str, request: pytest.FixtureRequest) -> dramatiq.Broker:
    broker: dramatiq.Broker = request.getfixturevalue(f"{request.param}_broker")
    return broker


def _commit_one(n: int, svc: epq.QueueService, connection: Any) -> str:
    with connection.transaction():
        return svc.enqueue_index_endpoint(index_request(n), tx=connection).job.id


def _ready(relay: Any) -> bool:
    """Whether an ``epq relay`` process says it relays (it has connected everywhere)."""
    return "epq: relaying" in relay.log.read_text(errors="replace")


def test_relays_killed_at_random_points_lose_nothing_and_enqueue_nothing_twice(
    outbox: str, real_broker: dramatiq.Broker, start_worker: Any
) -> None:
    urls = _urls(real_broker)
    outbox_env = {"EPQ_OUTBOX_URL": POSTGRES_URL, "EPQ_OUTBOX_TABLE": outbox}
    # Given a worker that runs jobs and relays none itself, and two `epq relay` processes
    worker = start_worker(WORKER, urls)
    relays = [start_worker(RELAY, {**urls, **outbox_env}) for _ in range(2)]
    svc = epq.QueueService(real_broker)
    committed: list[str] = []
    done = threading.Event()

    def produce() -> None:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
            for n in range(TRANSACTIONS):
                committed.append(_commit_one(n, svc, connection))
                time.sleep(random.uniform(0, 0.02))
        done.set()

    # When 1,000 transactions commit a job each, spread over about 12 s, while the relays are
    # killed with SIGKILL in turn, each at a random point of its work (0 to 250 ms after it is
    # up: waiting, or inside a batch), and started again
    producer = threading.Thread(target=produce)
    producer.start()
    kills = 0
    rng = random.Random()
    while not done.is_set() or kills < MIN_KILLS:
        n = kills % len(relays)
        assert wait_for(lambda n=n: _ready(relays[n]), timeout=30), relays[n].log.read_text()
        time.sleep(rng.uniform(0, 0.25))
        relays[n].kill9()
        relays[n] = start_worker(RELAY, {**urls, **outbox_env})
        kills += 1
    producer.join(60)
    assert len(committed) == TRANSACTIONS
    # Then, once the relays are left alone, every job runs exactly once
    assert wait_for(lambda: rows(POSTGRES_URL, outbox) == [], timeout=60), "the outbox was not emptied"
    reports = worker.collect(TRANSACTIONS, timeout=60)
    assert worker.results.blpop([worker.key], timeout=3) is None  # nothing more comes
    counts = Counter(report["job_id"] for report in reports)
    assert set(counts) == set(committed)  # 0 lost
    assert set(counts.values()) == {1}  # 0 twice
    states = {svc.get_job(job_id).state for job_id in committed}  # type: ignore[union-attr]
    assert states == {epq.JobState.COMPLETED}
    taken_over = sum(
        log.read_text(errors="replace").count("had been relayed by a relay that stopped")
        for log in worker.log.parent.glob("worker-*.log")
    )
    print(
        f"{kills} relays killed; {taken_over} batch(es) of a killed relay found inserted and not taken twice"
    )


def test_the_relay_runs_in_every_worker_process(
    outbox: str, real_broker: dramatiq.Broker, start_worker: Any
) -> None:
    # Given workers with EPQ_OUTBOX_URL (two processes: a relay each), and no `epq relay`
    env = {**_urls(real_broker), "EPQ_OUTBOX_URL": POSTGRES_URL, "EPQ_OUTBOX_TABLE": outbox}
    worker = start_worker([*WORKER[:-4], "--processes", "2", "--threads", "2"], env)
    svc = epq.QueueService(real_broker)
    with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
        ids = [_commit_one(n, svc, connection) for n in range(200)]
    # Then the workers' relays move every committed job, and each runs once
    reports = worker.collect(len(ids), timeout=60)
    assert Counter(report["job_id"] for report in reports) == Counter(ids)
    assert rows(POSTGRES_URL, outbox) == []
