"""Periodic jobs with real worker processes (``dramatiq epq.actors``, the schedule in
``EPQ_PERIODIC``): three workers over a 1-second schedule enqueue each tick exactly once, none
missed, also when one of them is killed with SIGKILL and started again in the middle."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import pytest
import redis

from epq.testing import install
from tests.conftest import RABBITMQ_URL, REDIS_URL, STATE_URL, rabbitmq_available
from tests.support.helpers import VALID
from tests.support.workers import BIN, Worker

pytestmark = pytest.mark.slow

WORKER = [str(BIN / "dramatiq"), "epq.actors", "--processes", "1", "--threads", "2"]
SCHEDULE = "e2e-every-second"
#: The ticks checked: this many in a row, from the first one a worker ran.
TICKS = 12


class Reports:
    """What the workers' handlers report, grouped by tick."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.jobs: dict[int, set[str]] = defaultdict(set)  # tick ms -> job ids that ran for it

    def take(self, until: Any, timeout: float) -> None:
        """Read reports until ``until(self)`` holds; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not until(self):
            assert time.monotonic() < deadline, (
                f"ticks seen: {sorted(self.jobs)}\n{self.worker.log.read_text()}"
            )
            item = self.worker.results.blpop([self.worker.key], timeout=1)
            if item is None:
                continue
            report = json.loads(item[1])
            name, _, tick = (report["periodic"] or "").rpartition("@")
            assert name == SCHEDULE, report
            self.jobs[int(tick)].add(report["job_id"])

    @property
    def first(self) -> int:
        return min(self.jobs)


def _three_workers_one_killed(start_worker: Any, env: dict[str, str]) -> None:
    env = {
        **env,
        "EPQ_PERIODIC": json.dumps(
            {SCHEDULE: {"kind": "register_job", "every": 1, "request": VALID["register_job"]}}
        ),
    }
    # Given three worker processes running a 1-second schedule
    workers = [start_worker(WORKER, env)]
    workers += [start_worker(WORKER, env, key=workers[0].key) for _ in range(2)]
    reports = Reports(workers[0])
    reports.take(lambda r: len(r.jobs) >= 4, timeout=60)
    # When one of them is killed with SIGKILL in the middle, and started again
    workers[1].kill9()
    workers[1] = start_worker(WORKER, env, key=workers[0].key)
    # Then every tick from the first one on runs, each as one job (a job the killed worker held
    # may run twice: delivery is at least once; it is the same job)
    wanted = [reports.first + n * 1000 for n in range(TICKS)]
    reports.take(lambda r: all(tick in r.jobs for tick in wanted), timeout=90)
    # (and a few ticks more: a second job of a wanted tick would have run by then)
    reports.take(lambda r: max(r.jobs) >= wanted[-1] + 3000, timeout=30)
    assert {tick: len(reports.jobs[tick]) for tick in wanted} == dict.fromkeys(wanted, 1)
    # and no tick ran that is not one of the schedule's, or ran as two jobs
    assert all(len(ids) == 1 for ids in reports.jobs.values())
    assert all(tick % 1000 == 0 for tick in reports.jobs)
    for worker in workers:
        assert worker.proc.poll() is None, worker.log.read_text()


@pytest.mark.redis
def test_three_workers_enqueue_each_tick_once_on_redis(start_worker: Any, redis_client: redis.Redis) -> None:
    _three_workers_one_killed(start_worker, {"EPQ_BROKER_URL": REDIS_URL})


@pytest.mark.rabbitmq
def test_three_workers_enqueue_each_tick_once_on_rabbitmq(
    start_worker: Any, state_client: redis.Redis
) -> None:
    rabbitmq_available(RABBITMQ_URL)
    broker = install(RABBITMQ_URL, state_url=STATE_URL)  # (the queues, declared and emptied)
    broker.flush_all()
    _three_workers_one_killed(start_worker, {"EPQ_BROKER_URL": RABBITMQ_URL, "EPQ_STATE_URL": STATE_URL})
