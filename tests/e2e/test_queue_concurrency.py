"""Per-queue concurrency in worker processes started as operators start them (`dramatiq
epq.actors`, `epq worker`), on Redis and RabbitMQ: with the default queue capped at 2 and more
threads than that, never more than 2 of its jobs run at once, while the events queue's jobs run
on the other threads. The handlers count running jobs in Redis (tests.support.concurrency_handlers)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

import epq
from epq.testing import current_broker, install
from tests.conftest import RABBITMQ_URL, REDIS_URL, STATE_URL, rabbitmq_available
from tests.support.helpers import keyed_request, wait_for
from tests.support.workers import BIN, CONCURRENCY_HANDLERS, Worker

pytestmark = pytest.mark.slow

DRAMATIQ = [str(BIN / "dramatiq"), "epq.actors", "--processes", "1", "--threads", "8"]
EPQ_WORKER = [str(BIN / "epq"), "worker", "--processes", "1"]  # threads: the budgets' sum, 29
CAPPED_JOBS = 12
OTHER_JOBS = 16


def _cap_holds(
    start_worker: Any, argv: list[str], env: dict[str, str], broker_url: str, state_url: str | None
) -> None:
    install(broker_url, state_url=state_url)
    service = epq.QueueService()
    # Given a worker process whose default queue is capped at 2, with more threads than that
    worker: Worker = start_worker(
        argv,
        {
            **env,
            "EPQ_HANDLERS": CONCURRENCY_HANDLERS,
            "EPQ_QUEUE_CONCURRENCY": "default=2",
            "EPQ_TEST_WORK_MS": "default=300,events=50",
        },
    )
    results = worker.results
    started = f"{worker.key}:started"
    try:
        # When 12 jobs wait in the default queue and, once it is at its budget, 16 in events
        for n in range(CAPPED_JOBS):
            service.enqueue_register_job(keyed_request("register_job", n, None))

        def notes() -> list[dict[str, Any]]:
            return [json.loads(item) for item in results.lrange(started, 0, -1)]

        assert wait_for(lambda: any(n["running"] == 2 for n in notes()), timeout=30), worker.log.read_text()
        for n in range(OTHER_JOBS):
            service.enqueue_register_source(
                {**keyed_request("register_source", n, None), "queue_name": "events"}
            )
        done = [note["queue"] for note in worker.collect(CAPPED_JOBS + OTHER_JOBS, timeout=60)]

        # Then never more than 2 default jobs ran at once, and 2 did
        begun = notes()
        assert max(n["running"] for n in begun if n["queue"] == "default") == 2
        # and the events jobs ran meanwhile on the other threads, through before the default backlog
        events = [n for n in begun if n["queue"] == "events"]
        assert max(n["running"] for n in events) >= 3
        assert any(n["default_running"] == 2 for n in events)
        last_events = len(done) - 1 - done[::-1].index("events")
        assert done[last_events:].count("default") >= 3
        assert worker.proc.poll() is None, worker.log.read_text()
    finally:
        results.delete(started, f"{worker.key}:running:default", f"{worker.key}:running:events")


@pytest.mark.redis
@pytest.mark.parametrize("argv", [DRAMATIQ, EPQ_WORKER], ids=["dramatiq", "epq-worker"])
def test_a_capped_queue_in_a_worker_process_on_redis(
    start_worker: Any, redis_client: redis.Redis, argv: list[str]
) -> None:
    _cap_holds(start_worker, argv, {"EPQ_BROKER_URL": REDIS_URL}, REDIS_URL, None)


@pytest.mark.rabbitmq
@pytest.mark.parametrize("argv", [DRAMATIQ, EPQ_WORKER], ids=["dramatiq", "epq-worker"])
def test_a_capped_queue_in_a_worker_process_on_rabbitmq(
    start_worker: Any, state_client: redis.Redis, argv: list[str]
) -> None:
    rabbitmq_available(RABBITMQ_URL)
    env = {"EPQ_BROKER_URL": RABBITMQ_URL, "EPQ_STATE_URL": STATE_URL}
    try:
        _cap_holds(start_worker, argv, env, RABBITMQ_URL, STATE_URL)
    finally:
        current_broker().flush_all()  # type: ignore[union-attr]
