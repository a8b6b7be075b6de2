"""Uniqueness modes ``replace`` and ``debounce`` on every broker (``epq.middleware.modes``): of many
duplicates, the last payload always runs, in one or two runs, and two jobs of one key never run
at once. ``keep_first`` (the default) is ``test_uniqueness.py``'s.

Real brokers run in real time, compressed (20 enqueues over about 2 s, a 0.3 s debounce); the
stub's fake clock spreads them over 10 s without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import dramatiq
import pytest

import epq
from epq.backends.memory import FakeClock
from epq.models import JobState
from epq.settings import reset_settings
from epq.testing import HandlerRegistry, drain
from tests.support.helpers import VALID, wait_for

KIND = "index_endpoint"  # (unique by endpoint and source: its reason and data are the payload)
DEBOUNCE_S = 0.3


@pytest.fixture(autouse=True)
def _modes_settings(_clean_epq_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # (read when the broker is set up: this fixture comes first)
    monkeypatch.setenv("EPQ_INDEX_UNIQUE_FOR", "60")
    monkeypatch.setenv("EPQ_INDEX_DEBOUNCE_DELAY", str(DEBOUNCE_S))
    monkeypatch.setenv("EPQ_INDEX_DEBOUNCE_MAX_WAIT", "20")
    reset_settings()


def request(n: int, mode: str) -> dict[str, Any]:
    """The same key every time (endpoint and source); payload version ``n``."""
    return {**VALID[KIND], "source_data": {"version": n}, "unique_mode": mode}


class Runs:
    """A handler that notes each run's payload version and how many of the key run at once."""

    def __init__(self, handlers: HandlerRegistry, work_s: float = 0.0) -> None:
        self.versions: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self.work_s = work_s
        self.first_may_end = threading.Event()
        self.first_may_end.set()
        self._lock = threading.Lock()
        handlers.register(KIND, self)

    def __call__(self, req: Any) -> None:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.versions.append(int(req.source_data["version"]))
            first = len(self.versions) == 1
        try:
            if first:
                self.first_may_end.wait(30)
            time.sleep(self.work_s)
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def stopped_worker(broker: dramatiq.Broker) -> Iterator[dramatiq.Worker]:
    """A worker, not started: the test starts it when the jobs are to run."""
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=4)
    yield worker
    worker.stop()


def settled(svc: epq.QueueService, ids: set[str]) -> bool:
    jobs = [svc.get_job(job_id) for job_id in ids]
    return all(j is not None and j.state in (JobState.COMPLETED,) for j in jobs)


@pytest.mark.parametrize("mode", ["replace", "debounce"])
def test_duplicates_of_a_job_not_started_replace_its_payload_and_the_last_one_runs_once(
    broker: dramatiq.Broker, stopped_worker: dramatiq.Worker, epq_handlers: HandlerRegistry, mode: str
) -> None:
    # Given 20 duplicates enqueued over about 2 s while no worker runs
    runs = Runs(epq_handlers)
    svc = epq.QueueService(broker)
    results = []
    for n in range(20):
        results.append(svc.enqueue_index_endpoint(request(n, mode)))
        time.sleep(0.1)

    # Then the first was enqueued, each other replaced its payload, and the caller got its id
    first = results[0]
    assert not first.unique_skipped_as_duplicate
    assert not first.unique_replaced
    assert all(r.unique_replaced and not r.unique_skipped_as_duplicate for r in results[1:])
    assert {r.job.id for r in results} == {first.job.id}
    job = svc.get_job(first.job.id)
    assert job is not None
    assert job.args["source_data"] == {"version": 19}
    assert job.replaced == 19

    # When a worker runs it, it runs once, with the last payload
    stopped_worker.start()
    assert wait_for(lambda: settled(svc, {first.job.id}), timeout=20)
    time.sleep(0.3)
    assert runs.versions == [19]


@pytest.mark.parametrize("mode", ["replace", "debounce"])
def test_duplicates_of_a_running_job_leave_one_follow_up_that_runs_the_last_payload_after_it(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry, mode: str
) -> None:
    # Given a job whose handler runs until the duplicates are in
    runs = Runs(epq_handlers)
    runs.first_may_end.clear()
    svc = epq.QueueService(broker)
    first = svc.enqueue_index_endpoint(request(0, mode))
    assert wait_for(lambda: runs.versions == [0], timeout=10)

    # When 19 duplicates come over about 2 s while it runs
    results = []
    for n in range(1, 20):
        results.append(svc.enqueue_index_endpoint(request(n, mode)))
        time.sleep(0.1)
    runs.first_may_end.set()

    # Then the first of them is a new job (the follow-up), the others replace its payload
    follow_up = results[0]
    assert not follow_up.unique_skipped_as_duplicate
    assert not follow_up.unique_replaced
    assert follow_up.job.id != first.job.id
    assert all(r.unique_replaced and r.job.id == follow_up.job.id for r in results[1:])
    # and it runs after the first ended, once, with the last payload: two runs, never at once
    assert wait_for(lambda: settled(svc, {first.job.id, follow_up.job.id}), timeout=20)
    time.sleep(0.3)
    assert runs.versions == [0, 19]
    assert runs.most_at_once == 1


@pytest.mark.parametrize("mode", ["replace", "debounce"])
def test_a_duplicate_after_the_job_ended_starts_a_new_job(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry, mode: str
) -> None:
    runs = Runs(epq_handlers)
    svc = epq.QueueService(broker)
    first = svc.enqueue_index_endpoint(request(0, mode))
    assert wait_for(lambda: settled(svc, {first.job.id}), timeout=10)

    again = svc.enqueue_index_endpoint(request(1, mode))

    assert not again.unique_skipped_as_duplicate
    assert not again.unique_replaced
    assert again.job.id != first.job.id
    assert wait_for(lambda: settled(svc, {again.job.id}), timeout=10)
    assert runs.versions == [0, 1]
    # while keep_first refuses it for the rest of the window
    assert svc.enqueue_index_endpoint(request(2, "keep_first")).unique_skipped_as_duplicate


def test_a_follow_up_waits_while_the_job_before_it_waits_for_a_retry(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a job whose first attempt fails after its duplicates came (retried 0.5 s later)
    runs = Runs(epq_handlers)
    runs.first_may_end.clear()
    failed = []

    def handler(req: Any) -> None:
        runs(req)
        if not failed:
            failed.append(1)
            raise RuntimeError("endpoint down")

    epq_handlers.register(KIND, handler)
    svc = epq.QueueService(broker)
    first_id = epq.actors.index_endpoint.send_with_options(
        kwargs=request(0, "replace"), backoff_ms=[500]
    ).message_id
    assert wait_for(lambda: runs.versions == [0], timeout=10)
    results = [svc.enqueue_index_endpoint(request(n, "replace")) for n in range(1, 6)]
    runs.first_may_end.set()

    # Then its follow-up runs once, after the retry that succeeded, with the last payload
    follow_up = results[0].job.id
    assert wait_for(lambda: settled(svc, {first_id, follow_up}), timeout=20)
    time.sleep(0.3)
    assert runs.versions == [0, 0, 5]
    assert runs.most_at_once == 1


def enqueue_at_once(svc: epq.QueueService, threads: int, each: int, mode: str) -> list[Any]:
    """``threads`` threads enqueue ``each`` duplicates each, all starting together."""
    start = threading.Barrier(threads)
    results: list[Any] = []
    lock = threading.Lock()

    def send(t: int) -> None:
        start.wait(10)
        for i in range(each):
            result = svc.enqueue_index_endpoint(request(100 * t + i, mode))
            with lock:
                results.append(result)

    pool = [threading.Thread(target=send, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(60)
    return results


def test_duplicates_at_once_of_a_job_not_started_leave_that_one_job(
    broker: dramatiq.Broker, stopped_worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given no job of the key, and 8 threads enqueueing 10 duplicates each at the same instant
    runs = Runs(epq_handlers)
    svc = epq.QueueService(broker)
    results = enqueue_at_once(svc, threads=8, each=10, mode="replace")

    # Then there is one job: one result made it, the 79 others replaced its payload
    assert len(results) == 80
    assert len({r.job.id for r in results}) == 1
    assert sum(not r.unique_replaced for r in results) == 1
    job = svc.get_job(results[0].job.id)
    assert job is not None
    assert job.replaced == 79
    # and it runs once, with the payload its record holds last
    stopped_worker.start()
    assert wait_for(lambda: settled(svc, {job.id}), timeout=20)
    time.sleep(0.3)
    assert runs.versions == [job.args["source_data"]["version"]]


def test_duplicates_at_once_of_a_running_job_make_one_follow_up_never_running_beside_it(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a job of the key running (its handler waits)
    runs = Runs(epq_handlers, work_s=0.05)
    runs.first_may_end.clear()
    svc = epq.QueueService(broker)
    first = svc.enqueue_index_endpoint(request(0, "replace"))
    assert wait_for(lambda: runs.versions == [0], timeout=10)

    # When 8 threads enqueue 10 duplicates each at the same instant
    results = enqueue_at_once(svc, threads=8, each=10, mode="replace")
    runs.first_may_end.set()

    # Then exactly one of them is a new job, the follow-up; the 79 others replaced its payload
    new = [r for r in results if not r.unique_replaced]
    assert len(new) == 1
    follow_up = new[0].job.id
    assert follow_up != first.job.id
    assert {r.job.id for r in results} == {follow_up}
    # and it runs once, after the first ended (never two at once), with the payload it holds last
    assert wait_for(lambda: settled(svc, {first.job.id, follow_up}), timeout=20)
    time.sleep(0.3)
    last = svc.get_job(follow_up)
    assert last is not None
    assert last.replaced == 79
    assert runs.versions == [0, last.args["source_data"]["version"]]
    assert runs.most_at_once == 1


@pytest.mark.parametrize("mode", ["replace", "debounce"])
def test_enqueue_many_honours_the_modes_in_order(
    broker: dramatiq.Broker, stopped_worker: dramatiq.Worker, epq_handlers: HandlerRegistry, mode: str
) -> None:
    # Given a batch with five versions of one key, among other keys
    runs = Runs(epq_handlers)
    svc = epq.QueueService(broker)
    batch = [("index_endpoint", request(n, mode)) for n in range(5)]
    results = svc.enqueue_many(batch)

    # Then the first is enqueued and each later one replaced its payload, in order
    assert [r.unique_replaced for r in results] == [False, True, True, True, True]
    assert {r.job.id for r in results} == {results[0].job.id}
    job = svc.get_job(results[0].job.id)
    assert job is not None
    assert job.args["source_data"] == {"version": 4}
    stopped_worker.start()
    assert wait_for(lambda: settled(svc, {job.id}), timeout=20)
    assert runs.versions == [4]


# ---- the stub broker, on its fake clock ---------------------------------------------------------


@pytest.fixture
def long_debounce(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 s debounce, waits of 20 s at most (request it before ``epq_broker``)."""
    monkeypatch.setenv("EPQ_INDEX_DEBOUNCE_DELAY", "2")
    monkeypatch.setenv("EPQ_INDEX_DEBOUNCE_MAX_WAIT", "20")
    reset_settings()


@pytest.mark.parametrize("mode", ["replace", "debounce"])
def test_on_the_fake_clock_20_duplicates_over_10_s_run_the_last_payload_once(
    long_debounce: None,
    epq_broker: dramatiq.Broker,
    epq_clock: FakeClock,
    epq_handlers: HandlerRegistry,
    mode: str,
) -> None:
    # Given a job delayed 10 s (replace) or debounced 2 s, and 19 duplicates, one every 0.5 s
    runs = Runs(epq_handlers)
    svc = epq.QueueService(epq_broker)
    worker = dramatiq.Worker(epq_broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        first_request = request(0, mode)
        if mode == "replace":  # (not started while its duplicates come)
            first_request["run_at"] = datetime.fromtimestamp(epq_clock() + 10, tz=timezone.utc)
        first = svc.enqueue_index_endpoint(first_request)
        for n in range(1, 20):
            epq_clock.advance(0.5)
            assert svc.enqueue_index_endpoint(request(n, mode)).job.id == first.job.id
            drain(epq_broker, worker)  # (what is due runs: nothing is)
        assert runs.versions == []
        job = svc.get_job(first.job.id)
        assert job is not None
        if mode == "debounce":  # moved by each duplicate: due 2 s after the last
            assert job.scheduled_at.timestamp() == pytest.approx(epq_clock() + 2, abs=0.01)

        # When its time comes, it runs once, with the last payload
        epq_clock.advance(2.5)
        drain(epq_broker, worker)
    finally:
        worker.stop()
    assert runs.versions == [19]


def test_debounce_never_moves_a_job_past_its_maximum_wait(
    epq_broker: dramatiq.Broker, epq_clock: FakeClock, epq_handlers: HandlerRegistry
) -> None:
    # Given a debounce of 0.3 s and waits of 20 s at most: duplicates every 0.25 s for 30 s
    svc = epq.QueueService(epq_broker)
    first = svc.enqueue_index_endpoint(request(0, "debounce"))
    created = first.job.created_at.timestamp()
    for n in range(1, 120):
        epq_clock.advance(0.25)
        svc.enqueue_index_endpoint(request(n, "debounce"))
        job = svc.get_job(first.job.id)
        assert job is not None
        # Then it is due 0.3 s after the last one, until that is past 20 s after its creation
        assert job.scheduled_at.timestamp() == pytest.approx(min(epq_clock() + 0.3, created + 20), abs=0.01)


def test_keep_first_stays_the_default_and_a_request_may_choose_its_mode(epq_broker: dramatiq.Broker) -> None:
    svc = epq.QueueService(epq_broker)
    first = svc.enqueue_index_endpoint(request(0, "keep_first"))
    plain = {k: v for k, v in request(1, "keep_first").items() if k != "unique_mode"}

    assert svc.enqueue_index_endpoint(plain).unique_skipped_as_duplicate
    with pytest.raises(epq.DuplicateJob):
        epq.actors.index_endpoint.send(**plain)
    # a replacing duplicate of a keep_first job (which reads no replaced payload as it starts)
    # becomes its follow-up, whose payload the next one replaces
    follow_up = svc.enqueue_index_endpoint(request(2, "replace"))
    assert not follow_up.unique_replaced
    assert follow_up.job.id != first.job.id
    replaced = svc.enqueue_index_endpoint(request(3, "replace"))
    assert replaced.unique_replaced
    assert replaced.job.id == follow_up.job.id
    assert replaced.job.args["source_data"] == {"version": 3}
    assert "unique_mode" not in replaced.job.args  # (read at enqueue, not part of the payload)
    # send() in a replacing mode returns the message with the id of the job it replaced into
    assert epq.actors.index_endpoint.send(**request(4, "replace")).message_id == follow_up.job.id


@pytest.fixture
def replace_by_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """``index_endpoint`` in mode replace by its setting (request it before ``epq_broker``)."""
    monkeypatch.setenv("EPQ_INDEX_UNIQUE_MODE", "replace")
    reset_settings()


def test_a_kinds_setting_gives_its_mode_and_a_request_may_keep_the_first(
    replace_by_setting: None, epq_broker: dramatiq.Broker
) -> None:
    svc = epq.QueueService(epq_broker)
    plain = {k: v for k, v in request(0, "replace").items() if k != "unique_mode"}
    first = svc.enqueue_index_endpoint(plain)

    replaced = svc.enqueue_index_endpoint({**plain, "source_data": {"version": 1}})
    refused = svc.enqueue_index_endpoint(request(2, "keep_first"))

    assert replaced.unique_replaced
    assert replaced.job.id == first.job.id
    assert refused.unique_skipped_as_duplicate
    job = svc.get_job(first.job.id)
    assert job is not None
    assert job.args["source_data"] == {"version": 1}
    # (the other kinds keep theirs)
    svc.enqueue_register_job(VALID["register_job"])
    assert svc.enqueue_register_job(VALID["register_job"]).unique_skipped_as_duplicate
