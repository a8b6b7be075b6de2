"""RabbitMQ queues declared without priorities (``x-max-priority``) by plain Dramatiq: a clear
error, then ``epq migrate-queues``, which finishes on the next run if interrupted."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import pika
import pytest
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker

import epq
from epq.settings import reset_settings
from epq.testing import HandlerRegistry, install
from tests.conftest import RABBITMQ_URL, STATE_URL, rabbitmq_available
from tests.e2e.test_cli import run_epq
from tests.support.helpers import StartLog, keyed_request, message_count, soon, wait_for


@pytest.fixture
def legacy_queue(state_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A served queue that plain Dramatiq declared (no x-max-priority), holding a p4 and a p1 job."""
    rabbitmq_available(RABBITMQ_URL)
    name = f"epq-legacy-{uuid.uuid4().hex[:8]}"
    plain = RabbitmqBroker(url=RABBITMQ_URL)
    plain.declare_queue(name, ensure=True)
    for n, priority in ((0, 4), (1, 1)):
        plain.enqueue(
            dramatiq.Message(
                queue_name=name,
                actor_name="register_job",
                args=(),
                kwargs=keyed_request("register_job", n, None),
                options={"epq_priority": priority},
            )
        )
    plain.close()
    monkeypatch.setenv("EPQ_QUEUES", f"default,{name}")
    reset_settings()
    yield name
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    for queue in (name, f"{name}.DQ", f"{name}.XQ", f"{name}.epq-migrating", f"{name}.DQ.epq-migrating"):
        channel.queue_delete(queue)
    connection.close()


def _queue_arguments(name: str) -> dict[str, Any]:
    """A queue's arguments, read back the only way AMQP allows: declare it with them again."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        channel = connection.channel()
        channel.queue_declare(name, durable=True, arguments=_epq_arguments(name))
        return _epq_arguments(name)
    except pika.exceptions.ChannelClosedByBroker:
        return {}
    finally:
        if connection.is_open:
            connection.close()


def _epq_arguments(name: str) -> dict[str, Any]:
    base = name.removesuffix(".DQ")
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{base}.XQ", "x-max-priority": 4}


@pytest.mark.rabbitmq
def test_a_rabbitmq_queue_without_priorities_is_a_clear_error_then_migrates(
    legacy_queue: str, state_client: redis.Redis, epq_handlers: HandlerRegistry
) -> None:
    env = {
        "EPQ_BROKER_URL": RABBITMQ_URL,
        "EPQ_STATE_URL": STATE_URL,
        "EPQ_QUEUES": f"default,{legacy_queue}",
    }
    broker = install(RABBITMQ_URL, state_url=STATE_URL)
    svc = epq.QueueService(broker)
    on_legacy = {**keyed_request("register_job", 2, 1), "queue_name": legacy_queue}
    # When epq enqueues on the old queue, it refuses with the queue's name and the way out
    with pytest.raises(epq.ConfigurationError, match=rf"{legacy_queue}.*epq migrate-queues"):
        svc.enqueue_register_job(on_legacy)
    # (a job scheduled for later too: it would fail only when due)
    with pytest.raises(epq.ConfigurationError, match=legacy_queue):
        svc.enqueue_register_job({**on_legacy, "run_at": soon()})
    # and nothing of the refused jobs is left behind (no record, no lock, no schedule entry)
    assert state_client.keys("epq:schedule*") == []
    assert state_client.keys("epq:job:*") == state_client.keys("epq:unique:*") == []
    # and a worker serving it refuses to boot, with the same message
    with pytest.raises(epq.ConfigurationError, match=legacy_queue):
        dramatiq.Worker(broker, queues=[legacy_queue], worker_threads=1).start()

    # When the operator migrates (workers stopped)
    out = run_epq("migrate-queues", "--json", env=env)
    assert out.returncode == 0, out.stderr
    report = {m["queue"]: m for m in json.loads(out.stdout)}
    # Then the queue was re-created with its two messages, and the others were left alone
    assert report[legacy_queue] == {"queue": legacy_queue, "migrated": True, "messages": 2}
    assert report[f"{legacy_queue}.DQ"] == {"queue": f"{legacy_queue}.DQ", "migrated": True, "messages": 0}
    assert _queue_arguments(f"{legacy_queue}.DQ") == _epq_arguments(f"{legacy_queue}.DQ")
    assert report["default"]["migrated"] is False
    assert _queue_arguments(legacy_queue) == _epq_arguments(legacy_queue)
    # and the kept jobs run by priority, after a new one enqueued there
    log = StartLog(epq_handlers)
    later = svc.enqueue_register_job(
        {**keyed_request("register_job", 3, 4), "queue_name": legacy_queue}
    ).job.id
    worker = dramatiq.Worker(broker, queues=[legacy_queue], worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        assert wait_for(lambda: len(log.started) == 3, timeout=15)
    finally:
        worker.stop()
    assert log.priorities == [1, 4, 4]
    assert log.started[-1] == later
    # and running the migration again changes nothing
    again = run_epq("migrate-queues", env=env)
    assert again.returncode == 0, again.stderr
    assert f"{legacy_queue}: up to date" in again.stdout


@pytest.mark.rabbitmq
def test_an_interrupted_migration_finishes_on_the_next_run(legacy_queue: str) -> None:
    # Given a migration that crashed after re-creating the queue, its messages still in holding
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    holding = f"{legacy_queue}.epq-migrating"
    channel.queue_declare(holding, durable=True, arguments={"x-max-priority": 4})
    while (got := channel.basic_get(legacy_queue, auto_ack=False))[0] is not None:
        channel.basic_publish("", holding, got[2], pika.BasicProperties(delivery_mode=2))
        channel.basic_ack(got[0].delivery_tag)
    channel.queue_delete(legacy_queue)
    channel.queue_declare(legacy_queue, durable=True, arguments=_epq_arguments(legacy_queue))
    connection.close()
    broker = install(RABBITMQ_URL, state_url=STATE_URL)
    # When the migration runs again
    from epq.backends.rabbitmq.migrate import migrate_queues

    report = {m.queue: m for m in migrate_queues(broker)}
    # Then the held messages are back in the queue, and the holding queue is gone
    assert (report[legacy_queue].migrated, report[legacy_queue].messages) == (False, 2)
    assert message_count(broker, legacy_queue) == 2
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        connection.channel().queue_declare(holding, passive=True)
    connection.close()
