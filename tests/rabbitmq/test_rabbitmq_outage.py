"""A RabbitMQ node stopped for a few seconds while a delayed job becomes due: the promoter's
publish fails, the job goes back to the schedule due a second later (not when its claim's lease
of 30 s ends), and it is published within a couple of seconds of the node coming back, then runs.
A memory alarm on the node while a serial key is handed over: the consumer's acks still go
through.

The node is one of this test's own (``tests/support/servers.py``), whose application is stopped
and started again, or alarmed (``brokers/rabbitmq-app``); the session's shared node is never
touched."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import pytest
import redis

import epq
from epq.schedule import CLAIM_LEASE_MS
from epq.settings import reset_settings
from epq.testing import HandlerRegistry, backend, install
from tests.conftest import SERVERS, STATE_URL, _unavailable
from tests.support.helpers import VALID, message_count, wait_for
from tests.support.servers import PrivateServer, ServerUnavailable


@pytest.fixture
def own_node() -> Iterator[PrivateServer]:
    """A RabbitMQ node of this test's own, stopped at the end."""
    node = SERVERS.server("rabbitmq", "outage")
    try:
        node.ensure_started()
    except ServerUnavailable as exc:
        _unavailable(f"a RabbitMQ node of the test's own could not start: {exc}")
    yield node
    node.stop()


@pytest.mark.timeout(180)  # (a node of its own boots in 5-30 s, depending on the machine's load)
def test_a_job_due_while_the_broker_is_down_is_published_soon_after_it_is_back(
    own_node: PrivateServer, state_client: redis.Redis, epq_handlers: HandlerRegistry
) -> None:
    # Given a worker on the node
    broker = install(f"amqp://guest:guest@127.0.0.1:{own_node.port}/%2F", state_url=STATE_URL)
    received = epq_handlers.record("register_job")
    worker = dramatiq.Worker(broker, worker_timeout=100, worker_threads=2)
    worker.start()
    try:
        store = backend().state
        # When the node goes down, a job due half a second later is scheduled (the schedule is in
        # the state store: enqueueing it needs no broker), and stays due for 2 s, its publish failing
        own_node.rabbitmq_app("stop")
        run_at = datetime.now(timezone.utc) + timedelta(milliseconds=500)
        epq.QueueService(broker).enqueue_register_job({**VALID["register_job"], "run_at": run_at})
        time.sleep(2.5)
        assert store.schedule_size() == 1  # (not lost, not published)
        # and the node comes back
        own_node.rabbitmq_app("start")
        back_at = time.monotonic()

        # Then it is published within a couple of seconds (not after the claim's lease) and runs
        assert wait_for(lambda: store.schedule_size() == 0, timeout=CLAIM_LEASE_MS / 1000)
        published_after = time.monotonic() - back_at
        assert published_after < 3.5, f"published {published_after:.1f} s after the node came back"
        assert wait_for(lambda: len(received) == 1, timeout=30)
    finally:
        worker.stop()
        broker.close()


@pytest.mark.timeout(180)
def test_a_memory_alarm_holds_the_next_job_of_a_key_but_not_the_acks_of_the_consumer(
    own_node: PrivateServer,
    state_client: redis.Redis,
    epq_handlers: HandlerRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given serial keys, a worker that takes one job at a time, endpoint A's first job running
    # (held), its second waiting for its turn, and endpoint B's first job waiting in the queue
    monkeypatch.setenv("EPQ_SERIAL_KINDS", "all")
    monkeypatch.setenv("EPQ_QUEUE_CONCURRENCY", "default=1")
    reset_settings()
    broker = install(f"amqp://guest:guest@127.0.0.1:{own_node.port}/%2F", state_url=STATE_URL)
    broker.flush_all()  # (the node is this module's own: what another test left on it goes)
    gate, started = threading.Event(), []

    def handler(request: Any) -> None:
        started.append(request.job_id)
        if request.job_id == "a0":
            gate.wait(30)

    epq_handlers.register("register_job", handler)
    svc = epq.QueueService(broker)
    ids = [svc.enqueue_register_job({**VALID["register_job"], "job_id": job}).job.id for job in ("a0", "a1")]
    worker = dramatiq.Worker(broker, worker_timeout=100, worker_threads=2)
    worker.start()
    try:
        assert wait_for(lambda: started == ["a0"], timeout=30), (started, _states(svc, ids))
        other = {
            **VALID["register_job"],
            "job_id": "b0",
            "endpoint_id": "22222222-2222-4222-8222-222222222222",
        }
        svc.enqueue_register_job(other)
        assert wait_for(lambda: message_count(broker, "default") == 1, timeout=10)  # (b0, promoted)
        # When RabbitMQ raises a memory alarm (it blocks every connection that publishes) and
        # the first job ends, handing its key over
        own_node.rabbitmq_app("alarm")
        gate.set()
        # Then the consumer's ack of that job still gets through (its connection never publishes),
        # freeing its one slot: B's job is delivered and runs during the alarm; A's next job,
        # published on a connection of its own, waits for the alarm to clear
        assert wait_for(lambda: "b0" in started, timeout=15), started
        assert "a1" not in started
        own_node.rabbitmq_app("calm")
        assert wait_for(lambda: started == ["a0", "b0", "a1"], timeout=45), started
        assert wait_for(lambda: backend().state.schedule_claimed() == 0, timeout=10)
    finally:
        gate.set()
        worker.stop()
        broker.close()
        reset_settings()


def _states(svc: epq.QueueService, ids: list[str]) -> list[str]:
    return [str(job.state) if (job := svc.get_job(i)) is not None else "none" for i in ids]
