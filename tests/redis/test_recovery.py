"""A crashed worker's jobs run again on another worker within a bound, on Redis."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

import epq
from epq.backends.redis.broker import HEARTBEAT_TIMEOUT_MS, MAINTENANCE_INTERVAL_MS
from epq.testing import install
from tests.conftest import REDIS_URL
from tests.support.helpers import VALID, wait_for
from tests.support.workers import BIN, HOLD_HANDLERS

pytestmark = pytest.mark.slow

#: The bound this test holds Redis to: a dead worker is noticed after HEARTBEAT_TIMEOUT_MS, and
#: an idle worker's next maintenance (every MAINTENANCE_INTERVAL_MS) gives its jobs back.
RECOVERY_BOUND_S = (HEARTBEAT_TIMEOUT_MS + MAINTENANCE_INTERVAL_MS) / 1000 + 5
JOBS = 16


@pytest.mark.redis
def test_the_jobs_of_a_killed_redis_worker_run_again_within_the_bound(
    start_worker: Any, redis_client: redis.Redis
) -> None:
    assert RECOVERY_BOUND_S < 30
    broker = install(REDIS_URL)
    from epq import actors

    argv = [str(BIN / "dramatiq"), "epq.actors", HOLD_HANDLERS, "--processes", "1", "--threads", "8"]
    # (the default queue's budget as large as Dramatiq's prefetch, 2 x 8 threads: else it would
    # hold only 10 jobs of the queue, its budget)
    env = {"EPQ_BROKER_URL": REDIS_URL, "EPQ_HANDLERS": HOLD_HANDLERS, "EPQ_QUEUE_CONCURRENCY": "default=16"}
    # Given a worker holding 16 jobs: 8 hanging in its threads, 8 in its prefetch
    doomed = start_worker(argv, {**env, "EPQ_TEST_HOLD": "1"})
    ids = {
        actors.register_job.send(**{**VALID["register_job"], "job_id": f"job-{n}"}).message_id
        for n in range(JOBS)
    }
    started = f"{doomed.key}:started"
    assert wait_for(lambda: doomed.results.llen(started) == 8, timeout=30), doomed.log.read_text()
    assert wait_for(lambda: broker.waiting("default") == 0, timeout=10)  # type: ignore[attr-defined]
    # and another worker, idle
    survivor = start_worker(argv, env, key=doomed.key)
    time.sleep(1)
    assert survivor.results.llen(doomed.key) == 0
    # When the first worker is killed with SIGKILL
    doomed.kill9()
    killed_at = time.monotonic()
    # Then every one of its jobs runs on the other worker, within the bound
    done = survivor.collect(JOBS, timeout=RECOVERY_BOUND_S + 5)
    took = time.monotonic() - killed_at
    print(f"\nthe 16 jobs of the killed worker ran again {took:.1f} s after the kill")
    assert {d["job_id"] for d in done} == ids
    assert took < RECOVERY_BOUND_S
    svc = epq.QueueService(broker)
    # (a handler reports before its worker writes the record's end: wait for the records)
    assert wait_for(lambda: {svc.get_job(job_id).state.value for job_id in ids} == {"completed"}), {
        job_id: svc.get_job(job_id).state.value for job_id in ids
    }
    survivor.results.delete(started)
