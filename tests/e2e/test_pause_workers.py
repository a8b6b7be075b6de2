"""Pausing a queue under worker processes, on Redis and RabbitMQ: the test process pauses the
default queue while two ``dramatiq epq.actors`` workers (two machines, say) run a backlog of it;
within a second neither starts another of its jobs, the events queue's jobs keep running, enqueues
succeed, and a third worker started during the pause starts none either. Once resumed, every job
runs exactly once. (The stub broker lives in one process: its tests are in
``tests/contract/test_pause.py``.)"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest
import redis

import epq
from epq.testing import current_broker, install
from tests.conftest import RABBITMQ_URL, REDIS_URL, STATE_URL, rabbitmq_available
from tests.support.helpers import keyed_request, wait_for
from tests.support.workers import BIN, PAUSE_HANDLERS, Worker

pytestmark = pytest.mark.slow

S = epq.JobState
WORKER = [str(BIN / "dramatiq"), "epq.actors", "--processes", "1", "--threads", "2"]
#: The contract: a pause reaches every worker process within a second.
PAUSE_LANDS_S = 1.0


def _notes(worker: Worker) -> list[dict[str, Any]]:
    return [json.loads(item) for item in worker.results.lrange(worker.key, 0, -1)]


def _ready(worker: Worker) -> bool:
    return "Worker process is ready for action." in worker.log.read_text()


def _enqueue(svc: epq.QueueService, n: int, priority: int, queue: str = "default") -> str:
    kind = "register_job" if queue == "default" else "register_source"
    return svc.enqueue(kind, {**keyed_request(kind, n, priority), "queue_name": queue}).job.id


def _pause_under_two_workers(start_worker: Any, env: dict[str, str]) -> None:
    svc = epq.QueueService()
    env = {**env, "EPQ_HANDLERS": PAUSE_HANDLERS, "EPQ_TEST_WORK_S": "0.1"}
    # Given two workers running, and a backlog of the default queue they are working through
    first = start_worker(WORKER, env)
    second = start_worker(WORKER, env, key=first.key)
    assert wait_for(lambda: _ready(first) and _ready(second), timeout=60), first.log.read_text()
    backlog = [_enqueue(svc, n, 1 + n % 4) for n in range(30)]
    assert wait_for(lambda: len(_notes(first)) >= 2, timeout=10)

    # When the default queue is paused
    paused_at = time.time()
    svc.pause_queue("default")
    # (and a third worker, serving the default queue only, starts)
    third = start_worker([*WORKER, "--queues", "default"], env, key=first.key)

    # Then within a second no worker starts another of its jobs, while enqueues succeed and the
    # events queue's jobs keep running
    time.sleep(PAUSE_LANDS_S)
    late = [_enqueue(svc, 100 + n, 1 + n % 4) for n in range(6)]
    events = [_enqueue(svc, 200 + n, 2, "events") for n in range(4)]
    assert wait_for(lambda: {n["job_id"] for n in _notes(first)} >= set(events), timeout=10)
    # and the worker started during the pause starts none of them either
    assert wait_for(lambda: _ready(third), timeout=60), third.log.read_text()
    time.sleep(PAUSE_LANDS_S)
    default_starts = [n for n in _notes(first) if n["queue"] == "default"]
    assert default_starts, "the backlog did not start before the pause"
    last = max(n["at"] for n in default_starts)
    assert last - paused_at < PAUSE_LANDS_S, f"a default job started {last - paused_at:.3f} s after the pause"
    waiting = [j for j in backlog + late if j not in {n["job_id"] for n in default_starts}]
    assert len(waiting) >= len(late)
    assert all(svc.get_job(j).attempt == 0 for j in waiting)  # type: ignore[union-attr]
    print(f"\n{len(default_starts)} of the backlog started before the pause, {len(waiting)} waited")

    # When it is resumed, every job runs, exactly once
    svc.resume_queue("default")
    everything = backlog + late + events
    assert wait_for(
        lambda: all(svc.get_job(j).state is S.COMPLETED for j in everything),  # type: ignore[union-attr]
        timeout=30,
        interval=0.1,
    )
    time.sleep(0.5)
    starts = Counter(n["job_id"] for n in _notes(first))
    assert {j: starts[j] for j in everything} == dict.fromkeys(everything, 1)
    for worker in (first, second, third):
        assert worker.proc.poll() is None, worker.log.read_text()


@pytest.mark.redis
def test_a_paused_queue_starts_nothing_under_worker_processes_on_redis(
    start_worker: Any, redis_client: redis.Redis
) -> None:
    install(REDIS_URL)
    _pause_under_two_workers(start_worker, {"EPQ_BROKER_URL": REDIS_URL})


@pytest.mark.rabbitmq
def test_a_paused_queue_starts_nothing_under_worker_processes_on_rabbitmq(
    start_worker: Any, state_client: redis.Redis
) -> None:
    rabbitmq_available(RABBITMQ_URL)
    install(RABBITMQ_URL, state_url=STATE_URL).flush_all()
    try:
        _pause_under_two_workers(start_worker, {"EPQ_BROKER_URL": RABBITMQ_URL, "EPQ_STATE_URL": STATE_URL})
    finally:
        current_broker().flush_all()  # type: ignore[union-attr]
