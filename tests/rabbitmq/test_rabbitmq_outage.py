"""A RabbitMQ node stopped for a few seconds while a delayed job becomes due: the promoter's
publish fails, the job goes back to the schedule due a second later (not when its claim's lease
of 30 s ends), and it is published within a couple of seconds of the node coming back, then runs.

The node is one of this test's own (``tests/support/servers.py``), whose application is stopped
and started again (``brokers/rabbitmq-app``); the session's shared node is never touched."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import dramatiq
import pytest
import redis

import epq
from epq.schedule import CLAIM_LEASE_MS
from epq.testing import HandlerRegistry, backend, install
from tests.conftest import SERVERS, STATE_URL, _unavailable
from tests.support.helpers import VALID, wait_for
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
