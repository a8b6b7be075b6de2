"""Cancelling running jobs from another process, with real workers, on Redis and RabbitMQ: the test
process calls ``cancel_job`` while a ``dramatiq epq.actors`` worker (one of two, as on two
machines) runs the handler; the handler stops within a second (timed where it stops, against the
moment of the call: both clocks are this machine's), the job is recorded ``cancelled``, its key
is free, and it does not run again. (The stub broker lives in one process: its tests are in
``tests/contract/test_cancel_running.py``.)"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis

import epq
import epq.actors
from epq.testing import backend, current_broker, install
from tests.conftest import RABBITMQ_URL, REDIS_URL, STATE_URL, rabbitmq_available
from tests.e2e.test_cli import run_epq
from tests.support.helpers import VALID, wait_for
from tests.support.workers import BIN, CANCEL_HANDLERS, Worker

pytestmark = pytest.mark.slow

S = epq.JobState
#: Two workers of one thread each (two machines, say): each job runs in whichever takes it.
WORKER = [str(BIN / "dramatiq"), "epq.actors", "--processes", "1", "--threads", "1"]
#: A retry, were there one, would come this soon (ms).
BACKOFF_MS = 300


def _note(worker: Worker, key: str, timeout: float) -> dict[str, Any]:
    item = worker.results.blpop([key], timeout=timeout)
    assert item is not None, f"nothing on {key} in {timeout} s; worker log:\n{worker.log.read_text()}"
    note: dict[str, Any] = json.loads(item[1])
    return note


def _state(job_id: str) -> epq.JobState:
    record = epq.QueueService().get_job(job_id)
    assert record is not None
    return record.state


def _cancel_two_running_jobs(start_worker: Any, env: dict[str, str]) -> None:
    svc = epq.QueueService()
    # Given two workers that each take one job at a time (two machines, say), and two jobs (a
    # retry of either would come 300 ms after its failure)
    env = {**env, "EPQ_HANDLERS": CANCEL_HANDLERS, "dramatiq_queue_prefetch": "1"}
    first = start_worker(WORKER, env)
    second = start_worker(WORKER, env, key=first.key)
    requests = [{**VALID["register_job"], "job_id": f"job-{n}"} for n in range(2)]
    jobs = [
        epq.actors.register_job.send_with_options(kwargs=request, backoff_ms=[BACKOFF_MS]).message_id
        for request in requests
    ]
    # running at the same time, one in each worker
    started = [_note(first, f"{first.key}:started", timeout=60) for _ in jobs]
    assert sorted(note["job_id"] for note in started) == sorted(jobs)
    assert len({note["pid"] for note in started}) == 2
    assert [_state(job_id) for job_id in jobs] == [S.RUNNING, S.RUNNING]

    for note in started:
        job_id = note["job_id"]
        # When this process cancels one
        asked = time.time()
        answer = svc.cancel_job(job_id)
        assert (answer.state, answer.cancel_requested_at is not None) == (S.RUNNING, True)

        # Then its handler stops within a second, interrupted (in whichever worker runs it)
        stopped = _note(first, first.key, timeout=10)
        assert (stopped["job_id"], stopped["pid"], stopped["how"]) == (job_id, note["pid"], "JobCancelled")
        assert stopped["at"] - asked < 1.0, f"stopped {stopped['at'] - asked:.3f} s after the cancel"
        # and the job is recorded cancelled after its one attempt
        assert wait_for(lambda: _state(job_id) is S.CANCELLED, timeout=10)  # noqa: B023
        assert svc.get_job(job_id).attempt == 1  # type: ignore[union-attr]
        # and its key is free: the same request is enqueued again (an hour ahead, not to run here)
        later = datetime.now(timezone.utc) + timedelta(hours=1)
        request = requests[jobs.index(job_id)]
        assert svc.enqueue_register_job({**request, "run_at": later}).unique_skipped_as_duplicate is False
        print(f"\njob {job_id} (pid {note['pid']}) stopped {stopped['at'] - asked:.3f} s after cancel_job")

    # And neither runs again, well past when a retry would have come
    time.sleep(2)
    assert first.results.llen(f"{first.key}:started") == 0  # (both starts were taken off it above)
    assert [_state(job_id) for job_id in jobs] == [S.CANCELLED, S.CANCELLED]
    assert backend().state.cancel_requests(jobs) == []
    for worker in (first, second):
        assert worker.proc.poll() is None, worker.log.read_text()


@pytest.mark.redis
def test_running_jobs_cancelled_from_another_process_stop_within_a_second_on_redis(
    start_worker: Any, redis_client: redis.Redis
) -> None:
    install(REDIS_URL)
    _cancel_two_running_jobs(start_worker, {"EPQ_BROKER_URL": REDIS_URL})


@pytest.mark.rabbitmq
def test_running_jobs_cancelled_from_another_process_stop_within_a_second_on_rabbitmq(
    start_worker: Any, state_client: redis.Redis
) -> None:
    rabbitmq_available(RABBITMQ_URL)
    install(RABBITMQ_URL, state_url=STATE_URL).flush_all()
    try:
        _cancel_two_running_jobs(start_worker, {"EPQ_BROKER_URL": RABBITMQ_URL, "EPQ_STATE_URL": STATE_URL})
    finally:
        current_broker().flush_all()  # type: ignore[union-attr]


@pytest.mark.redis
def test_epq_jobs_cancel_stops_a_running_job_and_says_so(
    start_worker: Any, redis_client: redis.Redis
) -> None:
    # Given a job running in a worker
    install(REDIS_URL)
    env = {"EPQ_BROKER_URL": REDIS_URL}
    worker = start_worker(WORKER, {**env, "EPQ_HANDLERS": CANCEL_HANDLERS})
    job_id = epq.actors.register_job.send(**VALID["register_job"]).message_id
    assert _note(worker, f"{worker.key}:started", timeout=60)["job_id"] == job_id
    # When an operator cancels it by its id's first characters
    out = run_epq("jobs", "cancel", job_id[:8], env=env)
    # Then the command waits for its worker to stop it, and says it is cancelled
    assert (out.returncode, out.stdout.strip()) == (0, f"{job_id}: cancelled"), out.stderr
    assert _note(worker, worker.key, timeout=10)["how"] == "JobCancelled"
    shown = run_epq("jobs", "show", job_id, env=env).stdout.splitlines()
    assert [line.split()[1] for line in shown if line.startswith("state ")] == ["cancelled"]
    assert [line for line in shown if line.startswith("cancel asked ")]
