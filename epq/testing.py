"""Test support for applications that use epq: a pytest plugin with no servers needed.

Installed with epq and loaded by pytest automatically (entry point ``pytest11``). It gives:

- ``epq_broker``: a fresh Dramatiq ``StubBroker`` with epq's middleware, the epq actors bound
  to it (and set as Dramatiq's global broker);
- ``epq_worker``: a started ``dramatiq.Worker`` on that broker, stopped after the test;
- ``epq_handlers``: the handler registry for the test: the application's handlers stay, and
  ``register(kind, fn)`` or ``record(kind)`` (which captures the requests a kind's handler
  receives) replace one kind's handler until the test ends; payload upgrades declared during the
  test (``@epq.payload_upgrade``) are forgotten when it ends;
- ``epq_clock``: a :class:`~epq.backends.memory.FakeClock` driving the stub's state store, so uniqueness
  windows can be crossed with ``epq_clock.advance(seconds)`` instead of sleeping (periodic jobs
  tick by it too);
- ``epq_periodic``: :func:`epq.periodic` for the test: the periodic jobs it declares are
  forgotten when the test ends;
- :func:`drain`: enqueue the periodic jobs' ticks that are due, wait until every queue is empty
  and the worker is idle, and fail if a handler failed and its job did not succeed since;
- :func:`worker_request`: the request a worker's handler would receive for a payload (upgraded,
  unknown fields dropped, validated), to test payload upgrades without a broker;
- :func:`relay`: move the jobs committed through the outbox (``tx=``) into epq now, as a relay
  would (``EPQ_OUTBOX_URL``, ``EPQ_OUTBOX_TABLE``), then :func:`drain` runs them.

    def test_indexing(epq_broker, epq_worker, epq_handlers):
        received = epq_handlers.record("index_endpoint")
        epq.actors.index_endpoint.send(endpoint_id=str(uuid4()), source="API")
        drain(epq_broker, epq_worker)
        assert received[0].source is epq.EndpointIndexSource.API

When the plugin loads and ``EPQ_BROKER_URL`` is unset, it sets it to ``stub://`` so that an
``import epq.actors`` during collection binds to a stub broker instead of starting a server.

For tests that need another broker, or epq's own internals, without reaching into private
modules (what these give may change with epq; the names stay):

- :func:`install`: build a new broker from a URL (Redis, RabbitMQ with a ``state_url``, stub),
  bind the epq actors to it and make it Dramatiq's global broker, closing the one it replaces
  (``epq.setup()`` returns the broker it built already when called again with the same URLs);
- :func:`reset`: close the broker epq is set up with and forget it, so that the next
  ``epq.setup()`` (or ``import epq.actors``) builds one from the settings;
- :func:`current_broker`: the broker epq is set up with, if any;
- :func:`backend`: what epq keeps beside a broker it built (``.state``: the state store,
  ``.records``: the record store, ``.url``, ``.fused``; see ``epq.backends.base``);
- ``messages``: epq's message ids and message encoding (``new_id``, ``new_ids``, ``encode``,
  ``flat_json``, ``data_template``), for tests of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import dramatiq
import pytest

from . import _messages as messages
from . import _runtime, handlers, periodic_jobs
from .backends.base import Backend, backend_of, moves_begun, served_queues
from .backends.memory import EpqStubBroker, FakeClock, MemoryStateStore
from .cancellation import JobCancelled
from .controls import Snooze
from .errors import ConfigurationError
from .kinds import get_kind
from .middleware.common import find_middleware
from .models import _Request
from .outbox.relay import Relay
from .payloads import to_request
from .schedule import promote_due
from .settings import get_settings, reset_settings

__all__ = [
    "FakeClock",
    "HandlerFailures",
    "HandlerRegistry",
    "backend",
    "current_broker",
    "drain",
    "epq_broker",
    "epq_clock",
    "epq_handlers",
    "epq_periodic",
    "epq_worker",
    "install",
    "messages",
    "relay",
    "reset",
    "watch_failures",
    "worker_request",
]


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("EPQ_BROKER_URL", "stub://")


def install(broker_url: str, *, state_url: str | None = None) -> dramatiq.Broker:
    """Build a new broker for ``broker_url`` (its state store at ``state_url``, which RabbitMQ
    needs), with epq's middleware; bind the epq actors to it and make it Dramatiq's global
    broker. The broker epq was set up with before is closed.

    Raises:
      ConfigurationError: an unknown URL scheme, or RabbitMQ without a state URL.
      BrokerUnavailable: a server cannot be reached.
    """
    return _runtime.install(broker_url, state_url=state_url).broker


def reset() -> None:
    """Close the broker epq is set up with (and its state store) and forget it: the next
    ``epq.setup()`` builds one from the settings."""
    _runtime.reset()


def current_broker() -> dramatiq.Broker | None:
    """The broker epq is set up with (by ``epq.setup()``, :func:`install` or ``epq_broker``), or
    None when nothing is."""
    runtime = _runtime.current()
    return runtime.broker if runtime is not None else None


def backend(broker: dramatiq.Broker | None = None) -> Backend:
    """What epq keeps beside ``broker`` (by default :func:`current_broker`): its state store
    (``.state``), its record store (``.records``), its masked URL and whether the records live in
    the broker's own Redis (``.fused``).

    Raises:
      LookupError: there is no such broker, or epq did not build it.
    """
    target = broker if broker is not None else current_broker()
    found = backend_of(target) if target is not None else None
    if found is None:
        raise LookupError(f"not a broker epq built: {target!r}")
    return found


def worker_request(kind: str, payload: dict[str, Any], *, strict: bool = False) -> _Request:
    """The request a worker's handler receives for a message of ``kind`` carrying ``payload``:
    through the kind's payload upgrades, without the fields its model does not know (unless
    ``strict``, as for a kind in ``EPQ_STRICT_PAYLOAD_KINDS``), validated.

        @epq.payload_upgrade("register_job")
        def metadata_was_meta(payload): ...

        def test_old_payloads_are_upgraded():
            request = worker_request("register_job", {**today, "meta": {"v": 1}})
            assert request.job_metadata == {"v": 1}
            assert worker_request("register_job", today) == epq.RegisterJobRequest(**today)

    Raises:
      PayloadUpgradeFailed: an upgrade raised or returned no dict (the worker dead-letters it).
      InvalidPayload: the payload does not validate (likewise).
    """
    return to_request(get_kind(kind), payload, strict=strict)


def relay(broker: dramatiq.Broker | None = None) -> int:
    """Relay every job committed through the outbox of the settings (``EPQ_OUTBOX_URL``,
    ``EPQ_OUTBOX_TABLE``) into ``broker`` (by default :func:`current_broker`), as ``epq relay``
    does, until the table is empty; return how many rows there were.

        with psycopg.connect(url) as conn:
            epq.QueueService().enqueue_index_endpoint(request, tx=conn)
        relay(epq_broker)
        drain(epq_broker, epq_worker)

    Raises:
      ConfigurationError: ``EPQ_OUTBOX_URL`` is not set.
    """
    target = broker if broker is not None else current_broker()
    settings = get_settings()
    if target is None or not settings.outbox_url:
        raise ConfigurationError("relay() needs a broker epq set up and EPQ_OUTBOX_URL")
    relayer = Relay(target, settings.outbox_url, backend(target).outbox_table)
    total = 0
    try:
        while moved := relayer.relay_once():
            total += moved
    finally:
        relayer.close()
    return total


class HandlerFailures(dramatiq.Middleware):
    """Notes each job whose handler raised, until the job succeeds (see :func:`drain`)."""

    def __init__(self) -> None:
        self.failed: dict[str, BaseException] = {}  # message id -> the last exception

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        # (a snooze is not a failure, nor an interruption by cancel_job)
        if exception is None or isinstance(exception, (Snooze, JobCancelled)):
            self.failed.pop(message.message_id, None)
        else:
            self.failed[message.message_id] = exception

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self.failed.pop(message.message_id, None)


def watch_failures(broker: dramatiq.Broker) -> HandlerFailures:
    """The broker's :class:`HandlerFailures`, added on first use (``epq_broker`` adds it when it
    builds the broker; :func:`drain` on another broker sees failures from its first call on)."""
    for middleware in broker.middleware:
        if isinstance(middleware, HandlerFailures):
            return middleware
    watcher = HandlerFailures()
    broker.add_middleware(watcher)
    return watcher


def drain(
    broker: dramatiq.Broker, worker: dramatiq.Worker, *, timeout_ms: int = 30_000, fail_fast: bool = True
) -> None:
    """Wait until no job is waiting, running, or scheduled for a time that has come, but in the
    paused queues (``QueueService.pause_queue``), whose jobs wait as they would in production.

    The ticks of periodic jobs that are due (by the state store's clock, which ``epq_clock`` may
    stop and move) are enqueued first, as a worker's ticker would. Jobs scheduled for later (by
    that clock) are left in the schedule. With ``fail_fast`` (the default), a handler that raised
    (but for ``epq.Snooze`` and an ``epq.JobCancelled`` interruption) fails the test that drains
    it: when the drain ends, the exception of a job that failed and has not succeeded since
    (dead-lettered, or waiting for a retry) is raised here, as Dramatiq's ``StubBroker.join``
    raises a dead-lettered message's. Pass ``fail_fast=False`` to test failures and retries
    themselves.
    """
    failures = watch_failures(broker)
    try:
        _drain(broker, worker, timeout_ms)
    finally:
        left, failures.failed = failures.failed, {}
    if fail_fast and left:
        raise next(iter(left.values()))


def _drain(broker: dramatiq.Broker, worker: dramatiq.Worker, timeout_ms: int) -> None:
    deadline = time.monotonic() + timeout_ms / 1000
    backend = backend_of(broker)
    store = backend.state if backend is not None else None
    ticking = find_middleware(broker, periodic_jobs.Ticking)
    while True:
        if ticking is not None:
            ticking.run_due(broker)  # (the worker's own ticker may be at it too: each tick goes once)
        remaining = max(1, int((deadline - time.monotonic()) * 1000))
        # Read before the queues are joined: a message that reaches a queue after its join was
        # moved there by a thread of the worker's process (a promoter, a hand-over, a ticker),
        # which counts the move once it is made or claimed (``backends.base.note_moves``): counted
        # before this read, it was on its queue, claimed, or due when the joins began.
        moves_before = moves_begun()
        claimed_before = store.schedule_claimed() if store is not None else 0
        paused = store.paused_queues() if store is not None else set()
        for queue in served_queues(broker):
            if queue in paused:
                continue
            join = getattr(broker, "join_queue", None)  # an epq broker's (see DurableDelays)
            if join is not None:
                join(queue, remaining)
            else:
                broker.join(queue, timeout=remaining)
        worker.join()
        if store is None:
            return
        moved, next_due = promote_due(broker, store)
        busy = moves_begun() != moves_before or claimed_before or store.schedule_claimed()
        if moved or (busy and time.monotonic() < deadline):
            if not moved:  # (the worker's own promoter may be publishing; or a job is due soon)
                time.sleep(0.005)
            continue
        now = store.now_ms()
        if next_due is None or next_due > now + _DUE_SOON_MS or time.monotonic() > deadline:
            return
        time.sleep(max(0, next_due - now) / 1000)


#: Scheduled jobs due this soon (a short retry backoff, say) are waited for by :func:`drain`.
_DUE_SOON_MS = 100


class HandlerRegistry:
    """The handler registry of one test (the application's handlers are in it)."""

    def register(self, kind: str, fn: Callable[[Any], Any]) -> None:
        """Use ``fn`` as the handler of ``kind`` for this test (in place of any other)."""
        handlers.register(kind, fn, replace=True)

    def record(self, kind: str) -> list[Any]:
        """Handle ``kind`` for this test by appending each request to the returned list."""
        received: list[Any] = []
        self.register(kind, received.append)
        return received

    def clear(self) -> None:
        """Leave this test with no handler at all."""
        handlers.unregister_all()


@pytest.fixture
def epq_broker() -> Iterator[EpqStubBroker]:
    """A fresh stub broker with the epq actors bound to it."""
    reset_settings()
    broker = cast(EpqStubBroker, install("stub://"))  # (stub:// builds one)
    watch_failures(broker)
    yield broker
    broker.flush_all()
    reset()
    reset_settings()


@pytest.fixture
def epq_worker(epq_broker: EpqStubBroker) -> Iterator[dramatiq.Worker]:
    """A worker on ``epq_broker`` (2 threads), started before the test and stopped after."""
    worker = dramatiq.Worker(epq_broker, worker_timeout=50, worker_threads=2)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def epq_handlers() -> Iterator[HandlerRegistry]:
    """The handler registry for the test, as the application registered it; whatever the test
    changes is undone afterwards."""
    with handlers.isolated_handlers():
        yield HandlerRegistry()


@pytest.fixture
def epq_periodic() -> Iterator[Callable[..., periodic_jobs.PeriodicJob]]:
    """:func:`epq.periodic` for the test: the periodic jobs the test declares (with it, or with
    ``epq.periodic``) are forgotten when it ends; the application's stay. A job declared with it
    starts at once on the broker epq is set up with (its first tick is the first after now, by the
    state store's clock), as a worker's ticker would start it a moment later.

        def test_reindexing(epq_broker, epq_worker, epq_handlers, epq_clock, epq_periodic):
            received = epq_handlers.record("index_endpoint")
            epq_periodic("reindex", "index_endpoint", every=60, request=REQUEST)
            epq_clock.advance(60)
            drain(epq_broker, epq_worker)  # enqueues the tick, and runs it
            assert len(received) == 1
    """

    def declare(*args: Any, **kwargs: Any) -> periodic_jobs.PeriodicJob:
        job = periodic_jobs.periodic(*args, **kwargs)
        broker = current_broker()
        if broker is not None:
            ticking = find_middleware(broker, periodic_jobs.Ticking)
            if ticking is not None:
                ticking.run_due(broker)
        return job

    with periodic_jobs.isolated_declarations():
        yield declare


@pytest.fixture
def epq_clock(epq_broker: EpqStubBroker) -> FakeClock:
    """The clock of ``epq_broker``'s state store, stopped at the current time until advanced."""
    runtime = _runtime.current()
    assert runtime is not None
    assert isinstance(runtime.state, MemoryStateStore)
    clock = FakeClock()
    runtime.state.clock = clock
    return clock
