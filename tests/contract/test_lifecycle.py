"""The River lifecycle on every broker: records, retries, dead letters, cancellation."""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import pytest

import epq
import epq.actors
from epq.backends.memory import FakeClock
from epq.middleware.job_records import JobRecords
from epq.schedule import promote_due
from epq.testing import HandlerRegistry, backend, drain
from tests.support.helpers import VALID, message_count, wait_for

S = epq.JobState


def svc(broker: dramatiq.Broker) -> epq.QueueService:
    return epq.QueueService(broker)


def job(broker: dramatiq.Broker, job_id: str) -> epq.JobRecord:
    record = svc(broker).get_job(job_id)
    assert record is not None
    return record


def fails(times: int) -> Any:
    calls: list[int] = []

    def handler(request: Any) -> None:
        calls.append(1)
        if len(calls) <= times:
            raise RuntimeError(f"failure {len(calls)}")

    handler.calls = calls  # type: ignore[attr-defined]
    return handler


def test_success(broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry) -> None:
    epq_handlers.record("register_job")
    worker.pause()
    result = svc(broker).enqueue_register_job(VALID["register_job"])
    assert job(broker, result.job.id).state is S.AVAILABLE
    worker.resume()
    drain(broker, worker)

    record = job(broker, result.job.id)
    assert record.state is S.COMPLETED
    assert (record.attempt, record.max_attempts, record.errors) == (1, 3, [])
    assert record.attempted_at is not None
    assert record.finalized_at is not None
    assert record.args == result.job.args
    assert (record.kind, record.queue, record.priority) == ("register_job", "default", 2)


def test_completed_history_stays_within_its_bound(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a deployment that keeps the records of 20 completed jobs (EPQ_COMPLETED_MAX)
    records = backend(broker).records
    records.completed_max = 20  # type: ignore[attr-defined]  # (each store has the setting)
    epq_handlers.register("index_endpoint", lambda request: None)
    # When 150 jobs complete, 7.5 times the bound
    requests = [{"endpoint_id": f"00000000-0000-4000-8000-{i:012d}", "source": "API"} for i in range(150)]
    ids = [result.job.id for result in svc(broker).enqueue_many([("index_endpoint", r) for r in requests])]
    drain(broker, worker)
    # Then 20 completed records are kept, the counters say 20, and the rest are gone
    kept = [job_id for job_id in ids if svc(broker).get_job(job_id) is not None]
    assert len(kept) == 20
    assert {job(broker, job_id).state for job_id in kept} == {S.COMPLETED}
    completed = {group: n for group, n in records.counters().items() if group.endswith("|completed")}
    assert completed == {"default|2|completed": 20}
    # and they are among the last to complete (two worker threads: nearly in enqueue order)
    assert set(kept) <= set(ids[-40:])


def test_dead_jobs_stay_within_their_bound(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a deployment that keeps the records of 20 dead jobs (EPQ_DEAD_MAX), and a kind with
    # no handler: its jobs die on their first attempt
    records = backend(broker).records
    records.dead_max = 20  # type: ignore[attr-defined]  # (each store has the setting)
    epq_handlers.clear()
    # When 150 jobs die, 7.5 times the bound
    requests = [{"endpoint_id": f"00000000-0000-4000-8000-{i:012d}", "source": "API"} for i in range(150)]
    ids = [result.job.id for result in svc(broker).enqueue_many([("index_endpoint", r) for r in requests])]
    drain(broker, worker, fail_fast=False)
    # Then 20 dead records are kept, the counters, the dead list and the stats say 20, and the
    # rest are gone
    kept = [job_id for job_id in ids if svc(broker).get_job(job_id) is not None]
    assert len(kept) == 20
    assert {job(broker, job_id).state for job_id in kept} == {S.DISCARDED}
    dead = {group: n for group, n in records.counters().items() if group.endswith("|discarded")}
    assert dead == {"default|2|discarded": 20}
    assert sorted(r.id for r in svc(broker).list_dead()) == sorted(kept)
    assert [(row["queue"], row["dead"]) for row in svc(broker).stats()] == [("default", 20)]
    # and they are among the last to die (two worker threads: nearly in enqueue order)
    assert set(kept) <= set(ids[-40:])
    # The brokers' dead-letter messages are not the bound's: each job's is there, to its TTL
    assert wait_for(lambda: message_count(broker, "default.XQ") == 150, timeout=10)


def test_retry_then_success(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    handler = fails(1)
    epq_handlers.register("register_source", handler)
    message = epq.actors.register_source.send_with_options(kwargs=VALID["register_source"], backoff_ms=[50])

    assert wait_for(lambda: job(broker, message.message_id).state is S.COMPLETED, timeout=10)
    record = job(broker, message.message_id)
    assert record.attempt == 2
    assert [(e.attempt, e.error_type, e.message) for e in record.errors] == [(1, "RuntimeError", "failure 1")]
    assert "failure 1" in record.errors[0].traceback


def test_retries_exhausted_are_discarded_with_every_error(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    epq_handlers.register("register_job", fails(99))
    message = epq.actors.register_job.send_with_options(kwargs=VALID["register_job"], backoff_ms=[5])

    assert wait_for(lambda: job(broker, message.message_id).state is S.DISCARDED, timeout=10)
    record = job(broker, message.message_id)
    assert record.attempt == 3
    assert [e.attempt for e in record.errors] == [1, 2, 3]
    assert [e.message for e in record.errors] == ["failure 1", "failure 2", "failure 3"]
    assert record.finalized_at is not None
    assert [r.id for r in svc(broker).list_dead()] == [message.message_id]


def test_an_invalid_payload_is_discarded_on_its_first_attempt(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    received = epq_handlers.record("register_job")
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="default", actor_name="register_job", args=(), kwargs={"endpoint_id": "x"}, options={}
    )
    broker.enqueue(message)

    assert wait_for(lambda: job(broker, message.message_id).state is S.DISCARDED, timeout=10)
    record = job(broker, message.message_id)
    assert record.attempt == 1
    assert record.errors[-1].error_type == "InvalidPayload"
    assert "endpoint_id" in record.errors[-1].message
    assert received == []


def test_cancel_before_start_is_never_run_and_frees_the_key(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    received = epq_handlers.record("index_endpoint")
    result = svc(broker).enqueue_index_endpoint(VALID["index_endpoint"])

    cancelled = svc(broker).cancel_job(result.job.id)

    assert cancelled.state is S.CANCELLED
    assert cancelled.finalized_at is not None
    # the unique key is free at once
    again = svc(broker).enqueue_index_endpoint(VALID["index_endpoint"])
    assert again.unique_skipped_as_duplicate is False
    svc(broker).cancel_job(again.job.id)
    # a worker fetches both and skips them
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        drain(broker, worker)
    finally:
        worker.stop()
    assert received == []
    assert job(broker, result.job.id).state is S.CANCELLED
    assert message_count(broker, "default.XQ") == 0


def test_cancel_a_scheduled_job(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    received = epq_handlers.record("register_dynamic_schedule")
    # 2 s: the cancel comes before the run time even if a loaded machine pauses the test
    run_at = datetime.now(timezone.utc) + timedelta(seconds=2)
    result = svc(broker).enqueue_register_dynamic_schedule(
        {**VALID["register_dynamic_schedule"], "run_at": run_at}
    )
    assert job(broker, result.job.id).state is S.SCHEDULED

    assert svc(broker).cancel_job(result.job.id).state is S.CANCELLED
    time.sleep(2.5)
    drain(broker, worker)
    assert received == []
    assert job(broker, result.job.id).state is S.CANCELLED


def test_cancelling_a_finished_job_returns_it_unchanged(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    epq_handlers.record("register_job")
    result = svc(broker).enqueue_register_job(VALID["register_job"])
    drain(broker, worker)
    before = job(broker, result.job.id)

    after = svc(broker).cancel_job(result.job.id)

    assert after.state is S.COMPLETED
    assert after == before


def test_unknown_jobs(broker: dramatiq.Broker) -> None:
    assert svc(broker).get_job("no-such-job") is None
    with pytest.raises(epq.JobNotFound, match="no-such-job"):
        svc(broker).cancel_job("no-such-job")


def test_scheduled_until_promoted_then_available(broker: dramatiq.Broker) -> None:
    # no worker: promote by hand once the job is due
    # 1.5 s: the first promotion comes before the run time even if a loaded machine pauses the test
    run_at = datetime.now(timezone.utc) + timedelta(seconds=1.5)
    result = svc(broker).enqueue_register_job({**VALID["register_job"], "run_at": run_at})
    assert job(broker, result.job.id).state is S.SCHEDULED
    state = backend(broker).state
    assert promote_due(broker, state)[0] == 0
    assert job(broker, result.job.id).state is S.SCHEDULED
    time.sleep(max(0.0, (run_at - datetime.now(timezone.utc)).total_seconds()) + 0.1)
    assert promote_due(broker, state)[0] == 1
    assert job(broker, result.job.id).state is S.AVAILABLE
    assert message_count(broker, "default") == 1


def test_dead_letters_retry_and_purge(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    broken = [True]

    def handler(request: Any) -> None:
        if broken[0]:
            raise RuntimeError("downstream is down")

    epq_handlers.register("register_job", handler)
    dead_ids = []
    for name in ("a", "b"):
        fields = {**VALID["register_job"], "job_id": name}
        dead_ids.append(epq.actors.register_job.send_with_options(kwargs=fields, backoff_ms=[5]).message_id)
    assert wait_for(lambda: len(svc(broker).list_dead()) == 2, timeout=10)
    broken[0] = False

    # retry one: same id, kind and args; it runs again and now succeeds
    retried = svc(broker).retry_dead(dead_ids[0])
    assert retried.state in (S.AVAILABLE, S.RUNNING, S.COMPLETED)
    assert wait_for(lambda: job(broker, dead_ids[0]).state is S.COMPLETED, timeout=10)
    record = job(broker, dead_ids[0])
    assert record.args["job_id"] == "a"
    assert len(record.errors) == 3
    assert [r.id for r in svc(broker).list_dead()] == [dead_ids[1]]
    # retrying a job that is not dead changes nothing
    assert svc(broker).retry_dead(dead_ids[0]).state is S.COMPLETED
    # purge forgets the rest, broker dead-letter queues included
    assert svc(broker).purge_dead() == 1
    assert svc(broker).list_dead() == []
    assert svc(broker).get_job(dead_ids[1]) is None
    assert message_count(broker, "default.XQ") == 0


def test_a_dead_job_retried_before_its_nack_is_not_made_dead_again(broker: dramatiq.Broker) -> None:
    # Given a job whose last attempt failed: its death is recorded, its nack not yet done (the
    # consumer thread nacks later)
    records = next(m for m in broker.middleware if isinstance(m, JobRecords))
    message = epq.actors.register_job.send(**VALID["register_job"])
    proxy = dramatiq.broker.MessageProxy(message)
    records.attempt_failed(proxy, RuntimeError("downstream is down"), retry_due_ms=None)
    assert job(broker, message.message_id).state is S.DISCARDED
    # When an operator retries it in between, and then the nack comes
    svc(broker).retry_dead(message.message_id)
    records.after_nack(broker, proxy)
    # Then the retry stands: the job waits to run again
    assert job(broker, message.message_id).state is S.AVAILABLE


def test_stats_per_queue_and_priority(broker: dramatiq.Broker, epq_handlers: HandlerRegistry) -> None:
    s = svc(broker)
    s.enqueue_register_job(VALID["register_job"])
    s.enqueue_register_job({**VALID["register_job"], "job_id": "x", "priority": 1, "queue_name": "events"})
    s.enqueue_register_job(
        {**VALID["register_job"], "job_id": "y", "run_at": datetime.now(timezone.utc) + timedelta(hours=1)}
    )
    rows = {(r["queue"], r["priority"]): r for r in s.stats()}
    expected = {"queue": "default", "priority": 2, "waiting": 1, "scheduled": 1, "running": 0, "dead": 0}
    assert rows[("default", 2)] == expected
    assert rows[("events", 1)]["waiting"] == 1


def test_the_retry_schedule_follows_the_table_on_the_fake_clock(
    epq_broker: dramatiq.Broker,
    epq_worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
    epq_clock: FakeClock,
) -> None:
    # index_endpoint: 7 attempts, retries after 1, 2, 4, 8, 16, 30 min, each ±25 %
    epq_handlers.register("index_endpoint", fails(99))
    job_id = epq.actors.index_endpoint.send(**VALID["index_endpoint"]).message_id
    delays = []
    for attempt in range(1, 8):
        assert wait_for(lambda a=attempt: job(epq_broker, job_id).attempt == a and
                        job(epq_broker, job_id).state in (S.RETRYABLE, S.DISCARDED))  # fmt: skip
        record = job(epq_broker, job_id)
        if attempt == 7:
            assert record.state is S.DISCARDED
            break
        assert record.state is S.RETRYABLE
        assert record.attempted_at is not None
        delays.append((record.scheduled_at - record.attempted_at).total_seconds())
        epq_clock.advance((record.scheduled_at.timestamp() - epq_clock()) + 0.01)
    for delay, minutes in zip(delays, (1, 2, 4, 8, 16, 30), strict=True):
        assert minutes * 60 * 0.75 <= delay <= minutes * 60 * 1.25, (delays, minutes)


def test_records_expire_per_the_retention_settings(
    epq_broker: dramatiq.Broker,
    epq_worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
    epq_clock: FakeClock,
) -> None:
    def handler(request: Any) -> None:
        if request.job_id == "dies":
            raise RuntimeError("no")

    epq_handlers.register("register_job", handler)
    s = svc(epq_broker)
    done = s.enqueue_register_job({**VALID["register_job"], "job_id": "done"}).job.id
    dies = s.enqueue_register_job({**VALID["register_job"], "job_id": "dies"}).job.id
    for _ in range(3):  # three attempts, 10 s and 20 s apart (+25 %)
        with contextlib.suppress(RuntimeError):  # drain re-raises the dead-lettered job's error
            drain(epq_broker, epq_worker)
        epq_clock.advance(26)
    assert (job(epq_broker, done).state, job(epq_broker, dies).state) == (S.COMPLETED, S.DISCARDED)

    epq_clock.advance(24 * 3600)  # completed records are kept 24 h
    assert s.get_job(done) is None
    assert s.get_job(dies) is not None
    epq_clock.advance(6 * 24 * 3600)  # discarded ones 7 days
    assert s.get_job(dies) is None
    assert s.list_dead() == []


@pytest.mark.parametrize(
    "name",
    [pytest.param("redis", marks=pytest.mark.redis), pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)],
)
def test_finished_records_carry_their_retention_as_ttl(
    name: str, request: pytest.FixtureRequest, epq_handlers: HandlerRegistry
) -> None:
    # (the stub's expiry is shown on the fake clock in test_records_expire_per_the_retention_settings)
    broker = request.getfixturevalue(f"{name}_broker")
    epq_handlers.record("register_job")
    result = svc(broker).enqueue_register_job(VALID["register_job"])
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        drain(broker, worker)
    finally:
        worker.stop()
    assert job(broker, result.job.id).state is S.COMPLETED
    state = backend(broker).state
    ttl_ms = state.client.pttl(f"epq:job:{result.job.id}")  # type: ignore[attr-defined]
    assert 24 * 3600 * 1000 - 60_000 < ttl_ms <= 24 * 3600 * 1000


def test_a_fetched_job_that_has_not_started_is_not_running_and_can_be_cancelled(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    # Given one worker thread busy with a job, and three more jobs waiting behind it, some of
    # them already fetched into the worker's prefetch
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def slow(request: Any) -> None:
        ran.append(request.job_id)
        started.set()
        release.wait(10)

    epq_handlers.register("register_job", slow)
    s = svc(broker)
    ids = [
        s.enqueue("register_job", {**VALID["register_job"], "job_id": f"job-{i}"}).job.id for i in range(4)
    ]
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        assert started.wait(10)
        time.sleep(0.3)  # time for the consumer to prefetch (2 per worker thread)

        # Then only the job in the handler is running; the others are still available
        states = [job(broker, job_id).state for job_id in ids]
        assert states == [S.RUNNING, S.AVAILABLE, S.AVAILABLE, S.AVAILABLE]
        running = sum(row["running"] for row in s.stats())
        assert running == 1

        # and a fetched job can still be cancelled: it never runs
        assert s.cancel_job(ids[1]).state is S.CANCELLED
        release.set()
        drain(broker, worker)
    finally:
        release.set()
        worker.stop()
    assert ran == ["job-0", "job-2", "job-3"]
    states = [job(broker, job_id).state for job_id in ids]
    assert states == [S.COMPLETED, S.CANCELLED, S.COMPLETED, S.COMPLETED]
