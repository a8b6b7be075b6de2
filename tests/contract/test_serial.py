"""Serial keys on every broker: jobs of one endpoint start one at a time, in enqueue order."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.broker import MessageProxy

import epq
import epq.actors
import epq.metrics
from epq.backends.base import backend_of
from epq.middleware.common import find_middleware
from epq.options import SERIAL_KEY
from epq.outage import requeue_instead
from epq.serial import HandOvers, SerialKeys
from epq.settings import reset_settings
from epq.testing import HandlerRegistry, drain, relay
from tests.support.helpers import VALID, message_count, wait_for

S = epq.JobState
A = "11111111-1111-4111-8111-111111111111"
B = "22222222-2222-4222-8222-222222222222"


@pytest.fixture
def serial_settings(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """``EPQ_SERIAL_KINDS`` (and the other ``EPQ_SERIAL_*``) as the test's parameter says
    (default: every kind serial), set before the broker is."""
    settings: dict[str, str] = getattr(request, "param", {"EPQ_SERIAL_KINDS": "all"})
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    reset_settings()


@pytest.fixture
def serial_broker(serial_settings: None, broker: dramatiq.Broker) -> Iterator[dramatiq.Broker]:
    """The contract broker, set up with the test's serial settings; the hand-over threads that
    releases without a worker started are stopped before the broker is closed."""
    yield broker
    keys = find_middleware(broker, SerialKeys)
    if keys is not None:
        keys.stop_hand_overs()


@pytest.fixture
def serial_worker(serial_broker: dramatiq.Broker) -> Iterator[dramatiq.Worker]:
    worker = dramatiq.Worker(serial_broker, worker_timeout=50, worker_threads=4)
    worker.start()
    yield worker
    worker.stop()


class Runs:
    """What a handler saw: (job, start, end) per run, and the most runs of one endpoint at once."""

    def __init__(self, seconds: float = 0.03) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.starts: list[tuple[str, str]] = []  # (endpoint, job)
        self.fail: dict[str, list[BaseException]] = {}  # job -> exceptions to raise, in turn
        self.gates: dict[str, threading.Event] = {}  # job -> what it waits for while it runs

    def __call__(self, request: Any) -> None:
        endpoint, job = str(request.endpoint_id), request.job_id
        with self.lock:
            self.running[endpoint] = self.running.get(endpoint, 0) + 1
            self.most[endpoint] = max(self.most.get(endpoint, 0), self.running[endpoint])
            self.starts.append((endpoint, job))
        try:
            time.sleep(self.seconds)
            if job in self.gates:
                assert self.gates[job].wait(10)
            errors = self.fail.get(job)
            if errors:
                raise errors.pop(0)
        finally:
            with self.lock:
                self.running[endpoint] -= 1

    def order(self, endpoint: str) -> list[str]:
        return [job for e, job in self.starts if e == endpoint]


def send(endpoint: str, job: str, **options: Any) -> str:
    kwargs = {**VALID["register_job"], "endpoint_id": endpoint, "job_id": job}
    return epq.actors.register_job.send_with_options(kwargs=kwargs, **options).message_id


def state(broker: dramatiq.Broker, job_id: str) -> S:
    found = epq.QueueService(broker).get_job(job_id)
    assert found is not None
    return found.state


def test_jobs_of_one_endpoint_start_one_at_a_time_in_enqueue_order_and_other_endpoints_are_not_held_up(
    serial_broker: dramatiq.Broker, serial_worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a register_job handler that takes 30 ms, and 4 worker threads
    runs = Runs()
    epq_handlers.register("register_job", runs)
    # When 6 jobs of endpoint A and 6 of endpoint B are enqueued, one by one and in bulk
    for i in range(3):
        send(A, f"a{i}")
    service = epq.QueueService(serial_broker)
    service.enqueue_many(
        [epq.RegisterJobRequest(endpoint_id=B, job_id=f"b{i}", job_metadata={}) for i in range(6)]
        + [epq.RegisterJobRequest(endpoint_id=A, job_id=f"a{i}", job_metadata={}) for i in range(3, 6)]
    )
    # Then every job runs; never two of one endpoint at once; each endpoint's in enqueue order
    assert wait_for(lambda: len(runs.starts) == 12, timeout=20)
    assert runs.most == {A: 1, B: 1}
    assert runs.order(A) == [f"a{i}" for i in range(6)]
    assert runs.order(B) == [f"b{i}" for i in range(6)]
    # and the two endpoints ran side by side: B's jobs did not wait for A's
    first_b = runs.starts.index((B, "b0"))
    assert first_b < runs.starts.index((A, "a5"))


def test_a_job_waiting_for_its_retry_keeps_its_place_and_holds_the_key(
    serial_broker: dramatiq.Broker, serial_worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a job that fails its first attempt (retried after 1 s) and two jobs after it
    runs = Runs(seconds=0.01)
    runs.fail["a0"] = [RuntimeError("endpoint down")]
    epq_handlers.register("register_job", runs)
    first = send(A, "a0", backoff_ms=[1000])  # (a loaded machine's polls can lag a few 100 ms)
    later = [send(A, "a1"), send(A, "a2")]
    queued = epq.QueueService(serial_broker).enqueue_register_job(
        epq.RegisterJobRequest(endpoint_id=B, job_id="b0", job_metadata={})
    )
    assert queued.job.state is S.SCHEDULED  # (in line, in the schedule: as its record says)
    # When it fails, it waits for its retry, and the others wait behind it
    assert wait_for(lambda: state(serial_broker, first) is S.RETRYABLE, timeout=10)
    time.sleep(0.15)
    assert runs.order(A) == ["a0"]
    assert [state(serial_broker, job) for job in later] == [S.SCHEDULED, S.SCHEDULED]
    # Then the retry runs before them, and they run after it, in order
    assert wait_for(lambda: len(runs.order(A)) == 4, timeout=10)
    assert runs.order(A) == ["a0", "a0", "a1", "a2"]
    assert wait_for(lambda: state(serial_broker, later[-1]) is S.COMPLETED)


@pytest.mark.parametrize(
    "serial_settings",
    [{"EPQ_SERIAL_KINDS": "all", "EPQ_SERIAL_CONTINUE_ON_FAILURE": "register_job"}],
    indirect=True,
)
def test_a_kind_that_continues_on_failure_lets_the_next_job_go_while_it_waits_for_its_retry(
    serial_broker: dramatiq.Broker, serial_worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a job that fails its first attempt (retried after 300 ms) and two jobs after it,
    # enqueued before it fails
    runs = Runs(seconds=0.01)
    runs.fail["a0"] = [RuntimeError("endpoint down")]
    sent = runs.gates["a0"] = threading.Event()
    epq_handlers.register("register_job", runs)
    first = send(A, "a0", backoff_ms=[300])
    send(A, "a1")
    send(A, "a2")
    sent.set()  # (else, on a loaded machine, its retry could join the line before a2 does)
    # Then the next ones run while it waits, and its retry, at the end of the line, runs last
    assert wait_for(lambda: len(runs.starts) == 4, timeout=10)
    assert runs.order(A) == ["a0", "a1", "a2", "a0"]
    assert runs.most == {A: 1}
    assert wait_for(lambda: state(serial_broker, first) is S.COMPLETED)


def test_a_discarded_a_dead_and_a_cancelled_job_let_the_next_one_go(
    serial_broker: dramatiq.Broker, serial_worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a job that discards itself, one that fails its only attempt, and one that waits
    # behind a running job and is cancelled before its turn
    gate = threading.Event()
    runs = Runs(seconds=0.01)
    runs.fail["a0"] = [epq.Discard("bad registration")]
    runs.fail["a1"] = [RuntimeError("broken")]

    def handler(request: Any) -> None:
        if request.job_id == "a2":
            assert gate.wait(10)
        runs(request)

    epq_handlers.register("register_job", handler)
    jobs = [send(A, "a0"), send(A, "a1", max_attempts=1), send(A, "a2"), send(A, "a3"), send(A, "a4")]
    service = epq.QueueService(serial_broker)
    assert wait_for(lambda: state(serial_broker, jobs[2]) is S.RUNNING, timeout=10)
    assert service.cancel_job(jobs[3]).state is S.CANCELLED
    # When the running one ends
    gate.set()
    # Then the last one runs: the cancelled one was skipped, and the key let it go
    assert wait_for(lambda: state(serial_broker, jobs[4]) is S.COMPLETED, timeout=10)
    assert runs.order(A) == ["a0", "a1", "a2", "a4"]
    assert [state(serial_broker, job) for job in jobs] == [
        S.DISCARDED,
        S.DISCARDED,
        S.COMPLETED,
        S.CANCELLED,
        S.COMPLETED,
    ]


@pytest.mark.parametrize("serial_settings", [{"EPQ_SERIAL_KINDS": "register_job"}], indirect=True)
def test_a_kind_with_serial_keys_off_runs_jobs_of_one_endpoint_at_once(
    serial_broker: dramatiq.Broker, serial_worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given register_source off (only register_job is serial): a handler that waits until two
    # of its jobs run at once
    both = threading.Barrier(2, timeout=10)
    ran: list[str] = []

    def handler(request: Any) -> None:
        both.wait()
        ran.append(request.source_id)

    epq_handlers.register("register_source", handler)
    for source in ("s0", "s1"):
        epq.actors.register_source.send(**{**VALID["register_source"], "endpoint_id": A, "source_id": source})
    # Then both run, side by side (the barrier would break otherwise)
    assert wait_for(lambda: len(ran) == 2, timeout=10)
    assert not both.broken


@pytest.mark.postgres
def test_jobs_relayed_from_the_outbox_keep_their_order(
    outbox: str, serial_broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    # Given three jobs of endpoint A enqueued in one transaction, then a fourth enqueued directly,
    # a fifth in a transaction of its own, all committed
    import psycopg

    from tests.support.postgres import POSTGRES_URL

    runs = Runs(seconds=0.01)
    epq_handlers.register("register_job", runs)
    service = epq.QueueService(serial_broker)
    with psycopg.connect(POSTGRES_URL) as conn, conn.transaction():
        service.enqueue_many(
            [epq.RegisterJobRequest(endpoint_id=A, job_id=f"a{i}", job_metadata={}) for i in range(3)],
            tx=conn,
        )
    with psycopg.connect(POSTGRES_URL) as conn, conn.transaction():
        service.enqueue_register_job(
            epq.RegisterJobRequest(endpoint_id=A, job_id="a3", job_metadata={}), tx=conn
        )
    # When a relay moves them, and a job enqueued directly comes after them
    assert relay(serial_broker) == 4
    send(A, "a4")
    worker = dramatiq.Worker(serial_broker, worker_timeout=50, worker_threads=4)
    worker.start()
    try:
        # Then they run one at a time, in the order they were relayed, then the direct one
        assert wait_for(lambda: len(runs.starts) == 5, timeout=20)
    finally:
        worker.stop()
    assert runs.order(A) == [f"a{i}" for i in range(5)]
    assert runs.most == {A: 1}


@pytest.mark.parametrize(("rounds", "line"), [(1, 5), (40, 2)], ids=["a-line-of-5", "40-lines-of-2"])
def test_drain_runs_a_whole_line_on_the_stub_and_never_returns_while_a_job_is_on_its_way(
    serial_settings: None,
    epq_broker: dramatiq.Broker,
    epq_worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
    rounds: int,
    line: int,
) -> None:
    # Given jobs of one endpoint waiting in line, in an application's test, sent and drained
    # over and over (the worker's promoter moves each head from the schedule and its hand-over
    # threads the next job, on threads of their own, while the drain joins the queues: each
    # round is one chance for them to cross)
    seen: list[str] = []
    epq_handlers.register("register_job", lambda request: seen.append(request.job_id))
    for round_ in range(rounds):
        sent = [f"r{round_}-{i}" for i in range(line)]
        for job in sent:
            send(A, job)
        # When the test drains, Then every one has run, in order, by the time it returns
        drain(epq_broker, epq_worker)
        assert seen[-line:] == sent, f"round {round_}"


class _Publishers(dramatiq.Middleware):
    """Notes which threads enqueued each message (the send, then the move to the broker)."""

    def __init__(self) -> None:
        self.threads: dict[str, list[str]] = {}

    def before_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int) -> None:
        self.threads.setdefault(message.message_id, []).append(threading.current_thread().name)


def test_the_worker_thread_that_ran_a_job_does_not_publish_the_next_job_of_its_key(
    serial_broker: dramatiq.Broker, serial_worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a broker that notes which threads enqueue each message
    publishers = _Publishers()
    serial_broker.add_middleware(publishers)
    runs = Runs(seconds=0.01)
    epq_handlers.register("register_job", runs)
    # When three jobs of one endpoint run
    ids = [send(A, f"a{i}") for i in range(3)]
    assert wait_for(lambda: len(runs.starts) == 3, timeout=20)
    assert runs.order(A) == ["a0", "a1", "a2"]
    # Then the second and the third went to the broker without the worker threads waiting for it:
    # moved by one script where the Redis broker keeps epq's state (no publish), else published
    # by the process's hand-over threads
    backend = backend_of(serial_broker)
    moved_by_script = backend is not None and backend.fused
    expected = ["MainThread"] if moved_by_script else ["MainThread", "epq-serial-handover"]
    assert [publishers.threads[job_id] for job_id in ids[1:]] == [expected] * 2


def test_a_dead_job_run_again_joins_the_end_of_its_endpoints_line(
    serial_broker: dramatiq.Broker, serial_worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a job of endpoint A that discarded itself, and the next job of A running
    runs = Runs(seconds=0.01)
    runs.fail["a0"] = [epq.Discard("bad registration")]
    gate = runs.gates["a1"] = threading.Event()
    epq_handlers.register("register_job", runs)
    dead, running = send(A, "a0"), send(A, "a1")
    service = epq.QueueService(serial_broker)
    assert wait_for(lambda: state(serial_broker, running) is S.RUNNING, timeout=10)
    assert state(serial_broker, dead) is S.DISCARDED
    # When the dead job is run again while the other runs
    service.retry_dead(dead)
    # Then it waits for its turn: it does not start beside the running job of its endpoint
    time.sleep(0.3)
    assert runs.order(A) == ["a0", "a1"]
    assert state(serial_broker, dead) is not S.RUNNING
    # and it runs once the running one has ended, never two of A at once
    gate.set()
    assert wait_for(lambda: state(serial_broker, dead) is S.COMPLETED, timeout=10)
    assert runs.order(A) == ["a0", "a1", "a0"]
    assert runs.most == {A: 1}


@pytest.mark.parametrize(
    "serial_settings",
    [
        {
            "EPQ_SERIAL_KINDS": "all",
            "EPQ_INDEX_UNIQUE_FOR": "60",
            "EPQ_INDEX_DEBOUNCE_DELAY": "0.3",
            "EPQ_INDEX_DEBOUNCE_MAX_WAIT": "20",
        }
    ],
    indirect=True,
)
def test_a_debounced_index_waits_for_its_turn_and_runs_once_with_the_last_payload(
    serial_broker: dramatiq.Broker, serial_worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a registration of endpoint A running, and an index of A that waits behind it
    runs = Runs(seconds=0.01)
    gate = runs.gates["a1"] = threading.Event()
    epq_handlers.register("register_job", runs)
    indexed: list[tuple[int, int]] = []  # (payload version, A's registrations running at its start)

    def index(request: Any) -> None:
        with runs.lock:
            indexed.append((int(request.source_data["version"]), runs.running.get(A, 0)))

    epq_handlers.register("index_endpoint", index)
    send(A, "a1")
    assert wait_for(lambda: runs.order(A) == ["a1"], timeout=10)
    service = epq.QueueService(serial_broker)
    request = {"endpoint_id": A, "source": "API", "reason": "deploy", "unique_mode": "debounce"}
    first = service.enqueue_index_endpoint({**request, "source_data": {"version": 0}})
    # When duplicates come with debounce, while the registration still runs
    for version in range(1, 4):
        again = service.enqueue_index_endpoint({**request, "source_data": {"version": version}})
        assert again.unique_replaced
        assert again.job.id == first.job.id
    # Then the index does not run beside the registration, even once its debounce delay is over
    time.sleep(0.6)
    assert indexed == []
    # and once the registration ends, it runs once, with the last payload
    gate.set()
    assert wait_for(lambda: state(serial_broker, first.job.id) is S.COMPLETED, timeout=10)
    time.sleep(0.3)
    assert indexed == [(3, 0)]


def test_jobs_waiting_for_their_serial_key_count_as_scheduled_in_the_metrics(
    serial_broker: dramatiq.Broker,
) -> None:
    # Given three jobs of one endpoint and two of another, and no worker
    ids = [send(A, f"a{i}") for i in range(3)] + [send(B, f"b{i}") for i in range(2)]
    # Then the store-side metrics count as scheduled the three held behind their endpoint's first
    # job, and the first jobs too while they are still in the schedule (the Redis broker keeping
    # epq's state moves them to their queue at once), as their records say
    heads_scheduled = sum(state(serial_broker, job) is S.SCHEDULED for job in (ids[0], ids[3]))
    found = backend_of(serial_broker)
    assert found is not None
    registry = epq.metrics.store_registry(found.state, found.records)
    assert registry.get_sample_value("epq_scheduled_jobs") == 3 + heads_scheduled
    scheduled = [
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "epq_jobs" and sample.labels["state"] == "scheduled"
    ]
    assert sum(scheduled) == 3 + heads_scheduled


def test_hand_overs_after_their_worker_stopped_are_published_at_once_by_the_releasing_thread(
    serial_broker: dramatiq.Broker,
) -> None:
    # Given a process's hand-over threads, stopped with their worker
    found = backend_of(serial_broker)
    assert found is not None
    handovers = HandOvers(serial_broker, found.state)
    handovers.stop()
    # When a release claims the next job's message after that (a job that ended late)
    message = epq.actors.register_job.message_with_options(
        kwargs={**VALID["register_job"], "endpoint_id": A, "job_id": "late"}
    )
    found.state.schedule_add(message.encode(), found.state.now_ms())
    claimed, _ = found.state.schedule_claim(found.state.now_ms(), 30_000, 10)
    assert len(claimed) == 1
    threads_before = set(threading.enumerate())
    handovers.submit(claimed[0])
    # Then it is on the broker when submit returns, its claim forgotten, and no thread was started
    assert message_count(serial_broker, "default") == 1
    assert found.state.schedule_claimed() == 0
    started = set(threading.enumerate()) - threads_before
    assert not [thread for thread in started if thread.name == "epq-serial-handover"]


def test_a_job_given_back_to_its_queue_in_an_outage_keeps_its_key(serial_broker: dramatiq.Broker) -> None:
    # Given two jobs of one endpoint, the first its key's head
    first, second = send(A, "a0"), send(A, "a1")
    found = backend_of(serial_broker)
    assert found is not None
    assert found.state.serial_sequence(A) == [first, second]
    # When the first one's worker gives it back to its queue (the state store was unreachable)
    # rather than dead-lettering it, and the nack's hooks run
    message = dramatiq.Message(
        queue_name="default", actor_name="register_job", args=(), kwargs={}, options={SERIAL_KEY: A},
        message_id=first,
    )  # fmt: skip
    proxy = MessageProxy(message)
    requeue_instead(proxy)
    serial_broker.emit_after("nack", proxy)
    # Then it is still its key's head: the next job does not go before it runs again
    assert found.state.serial_sequence(A) == [first, second]
    # (and a nack that dead-letters it does let the next one go)
    serial_broker.emit_after("nack", MessageProxy(message))
    assert found.state.serial_sequence(A) == [second]
