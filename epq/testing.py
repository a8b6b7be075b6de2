"""Test support for applications that use epq: a pytest plugin with no servers needed.

Installed with epq and loaded by pytest automatically (entry point ``pytest11``). It gives:

- ``epq_broker``: a fresh Dramatiq ``StubBroker`` with epq's middleware, the epq actors bound
  to it (and set as Dramatiq's global broker);
- ``epq_worker``: a started ``dramatiq.Worker`` on that broker, stopped after the test;
- ``epq_handlers``: an empty handler registry for the test (restored afterwards), with
  ``record(kind)`` to capture the requests a kind's handler receives;
- ``epq_clock``: a :class:`~epq.state.FakeClock` driving the stub's state store, so uniqueness
  windows can be crossed with ``epq_clock.advance(seconds)`` instead of sleeping;
- :func:`drain`: wait until every queue is empty and the worker is idle.

    def test_indexing(epq_broker, epq_worker, epq_handlers):
        received = epq_handlers.record("index_endpoint")
        epq.actors.index_endpoint.send(endpoint_id=str(uuid4()), source="API")
        drain(epq_broker, epq_worker)
        assert received[0].source is epq.EndpointIndexSource.API

When the plugin loads and ``EPQ_BROKER_URL`` is unset, it sets it to ``stub://`` so that an
``import epq.actors`` during collection binds to a stub broker instead of starting a server.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeGuard

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from . import _runtime, handlers
from .schedule import promote_due
from .settings import reset_settings
from .state import FakeClock, MemoryStateStore

if TYPE_CHECKING:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

__all__ = ["FakeClock", "HandlerRegistry", "drain", "epq_broker", "epq_clock", "epq_handlers", "epq_worker"]


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("EPQ_BROKER_URL", "stub://")


def drain(broker: dramatiq.Broker, worker: dramatiq.Worker, *, timeout_ms: int = 30_000) -> None:
    """Wait until no job is waiting, running, or scheduled for a time that has come.

    Jobs scheduled for later (by the state store's clock, which ``epq_clock`` may stop) are left
    in the schedule. On the stub broker a job that was dead-lettered raises its exception here,
    so a failing handler fails the test that drains it.
    """
    deadline = time.monotonic() + timeout_ms / 1000
    store = getattr(broker, "epq_state", None)
    while True:
        remaining = max(1, int((deadline - time.monotonic()) * 1000))
        for queue in sorted(broker.get_declared_queues()):
            if queue.endswith((".DQ", ".XQ")):
                continue
            if isinstance(broker, StubBroker):
                broker.join(queue, timeout=remaining, fail_fast=True)
            elif _is_rabbitmq(broker):
                broker.join(queue, min_successes=3, idle_time=50, timeout=remaining)
            else:
                broker.join(queue, timeout=remaining)
        worker.join()
        if store is None:
            return
        moved, next_due = promote_due(broker, store)
        if moved or (store.schedule_claimed() and time.monotonic() < deadline):
            if not moved:  # the worker's own promoter is publishing what it claimed
                time.sleep(0.005)
            continue
        now = store.now_ms()
        if next_due is None or next_due > now + _DUE_SOON_MS or time.monotonic() > deadline:
            return
        time.sleep(max(0, next_due - now) / 1000)


def _is_rabbitmq(broker: dramatiq.Broker) -> TypeGuard[RabbitmqBroker]:
    # without importing Dramatiq's RabbitMQ broker (and pika) into every test run that loads this
    # plugin: if its module is not loaded, no broker is one
    rabbitmq = sys.modules.get("dramatiq.brokers.rabbitmq")
    return rabbitmq is not None and isinstance(broker, rabbitmq.RabbitmqBroker)


#: Scheduled jobs due this soon (a short retry backoff, say) are waited for by :func:`drain`.
_DUE_SOON_MS = 100


class HandlerRegistry:
    """The handler registry of one test."""

    def register(self, kind: str, fn: Callable[[Any], Any]) -> None:
        """Use ``fn`` as the handler of ``kind`` for this test."""
        handlers.register(kind, fn)

    def record(self, kind: str) -> list[Any]:
        """Register a handler that appends each request it receives to the returned list."""
        received: list[Any] = []
        handlers.register(kind, received.append)
        return received


@pytest.fixture
def epq_broker() -> Iterator[StubBroker]:
    """A fresh stub broker with the epq actors bound to it."""
    reset_settings()
    runtime = _runtime.install("stub://")
    broker = runtime.broker
    assert isinstance(broker, StubBroker)
    yield broker
    broker.flush_all()
    _runtime.reset()
    reset_settings()


@pytest.fixture
def epq_worker(epq_broker: StubBroker) -> Iterator[dramatiq.Worker]:
    """A worker on ``epq_broker`` (2 threads), started before the test and stopped after."""
    worker = dramatiq.Worker(epq_broker, worker_timeout=50, worker_threads=2)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def epq_handlers() -> Iterator[HandlerRegistry]:
    """An empty handler registry for the test; the previous one comes back afterwards."""
    with handlers.isolated_handlers():
        yield HandlerRegistry()


@pytest.fixture
def epq_clock(epq_broker: StubBroker) -> FakeClock:
    """The clock of ``epq_broker``'s state store, stopped at the current time until advanced."""
    runtime = _runtime.current()
    assert runtime is not None
    assert isinstance(runtime.state, MemoryStateStore)
    clock = FakeClock()
    runtime.state.clock = clock
    return clock
