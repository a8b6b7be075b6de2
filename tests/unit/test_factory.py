"""The broker factory and epq.setup(): schemes, masking, unreachable servers, idempotence."""

from __future__ import annotations

import dramatiq
import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker

import epq
from epq.backends.base import Backend, DurableDelays
from epq.backends.memory import MemoryRecords, MemoryStateStore
from epq.backends.urls import mask_url, scheme_of
from epq.middleware.boot import EpqMiddleware
from epq.middleware.retries import EpqRetries
from epq.testing import backend, install
from tests.conftest import RABBITMQ_URL, REDIS_URL, STATE_URL, rabbitmq_available

UNREACHABLE_REDIS = "redis://:s3cret-pw@127.0.0.1:1/0"
UNREACHABLE_RABBIT = "amqp://guest:s3cret-pw@127.0.0.1:1/%2F"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("amqp://user:pw@rabbit:5672/%2F", "amqp://user:***@rabbit:5672/%2F"),
        ("rediss://u:p%40ss@[::1]:6380/1", "rediss://u:***@[::1]:6380/1"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("stub://", "stub://"),
        ("redis://host:6379/0?password=s3cret", "redis://host:6379/0?password=***"),
        (
            "redis://host/0?db=1&Password=a%26b&socket_timeout=2",
            "redis://host/0?db=1&Password=***&socket_timeout=2",
        ),
        ("rediss://u:pw@host/0?password=pw", "rediss://u:***@host/0?password=***"),
        ("amqp://user:pw@rabbit/%2F?heartbeat=10", "amqp://user:***@rabbit/%2F?heartbeat=10"),
    ],
)
def test_mask_url_hides_passwords(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_a_password_given_as_a_query_parameter_is_masked_in_errors() -> None:
    with pytest.raises(epq.BrokerUnavailable) as caught:
        epq.setup("redis://127.0.0.1:1/0?password=s3cret-pw")
    assert "redis://127.0.0.1:1/0?password=***" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)


@pytest.mark.parametrize("url", ["kafka://:pw@host:9092", "http://x", "no-scheme-here", ""])
def test_unknown_scheme_is_a_clear_error_without_the_password(url: str) -> None:
    with pytest.raises(epq.ConfigurationError, match="unsupported broker URL scheme") as caught:
        scheme_of(url)
    assert "pw" not in str(caught.value)
    assert "redis://" in str(caught.value)


def test_setup_builds_the_stub_broker_with_epq_middleware_and_binds_the_actors() -> None:
    broker = epq.setup("stub://")

    assert isinstance(broker, StubBroker)
    assert isinstance(broker, DurableDelays)
    assert dramatiq.get_broker() is broker
    kinds = {type(m) for m in broker.middleware}
    assert {EpqRetries, EpqMiddleware} <= kinds
    assert not any(type(m) is dramatiq.middleware.Retries for m in broker.middleware)
    from epq import actors

    assert actors.index_endpoint.broker is broker
    assert {"default", "execution", "events", "maintenance"} <= broker.get_declared_queues()


def test_setup_is_idempotent_and_rebinds_on_a_new_url() -> None:
    first = epq.setup("stub://")
    assert epq.setup("stub://") is first
    fresh = install("stub://")
    assert fresh is not first
    from epq import actors

    assert actors.register_job.broker is fresh
    assert epq.setup() is fresh  # EPQ_BROKER_URL=stub:// in the tests' environment


def test_queues_setting_decides_the_declared_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPQ_QUEUES", "default, bulk")
    broker = install("stub://")
    assert {"default", "bulk"} <= broker.get_declared_queues()
    assert "events" not in broker.get_declared_queues()
    from epq import actors

    with pytest.raises(epq.InvalidRequest, match="queue_name"):
        actors.register_job.send(
            endpoint_id="6f1d1c1e-4a5b-4c3d-9e8f-0a1b2c3d4e5f",
            job_id="j",
            job_metadata={},
            queue_name="events",
        )


def test_history_bounds_reach_the_record_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPQ_COMPLETED_MAX", "7")
    monkeypatch.setenv("EPQ_DEAD_MAX", "5")
    records = backend(install("stub://")).records
    assert (records.completed_max, records.dead_max) == (7, 5)  # type: ignore[attr-defined]


@pytest.mark.redis
def test_redis_url_builds_a_redis_broker_with_durable_delays(redis_client: object) -> None:
    broker = epq.setup(REDIS_URL)
    assert isinstance(broker, RedisBroker)
    assert isinstance(broker, DurableDelays)
    assert broker.client.ping()


def test_unreachable_redis_is_a_clear_error_with_the_password_masked() -> None:
    with pytest.raises(epq.BrokerUnavailable) as caught:
        epq.setup(UNREACHABLE_REDIS)
    text = str(caught.value)
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in text
    assert "s3cret-pw" not in text
    assert "s3cret-pw" not in repr(caught.value)


@pytest.mark.redis  # the state store is reachable, so the error is about RabbitMQ
def test_unreachable_rabbitmq_is_a_clear_error_with_the_password_masked() -> None:
    with pytest.raises(epq.BrokerUnavailable) as caught:
        epq.setup(UNREACHABLE_RABBIT, state_url=REDIS_URL)
    text = str(caught.value)
    assert "RabbitMQ at amqp://guest:***@127.0.0.1:1/%2F" in text
    assert "s3cret-pw" not in text


def test_rabbitmq_without_a_state_url_is_refused_at_setup() -> None:
    with pytest.raises(epq.ConfigurationError, match="EPQ_STATE_URL") as caught:
        epq.setup("amqp://guest:s3cret-pw@127.0.0.1:5672/%2F")
    assert "s3cret-pw" not in str(caught.value)


def test_a_state_url_that_is_not_redis_is_refused() -> None:
    with pytest.raises(epq.ConfigurationError, match="must name a Redis"):
        epq.setup(UNREACHABLE_RABBIT, state_url="amqp://x:y@host/")


@pytest.mark.rabbitmq
def test_rabbitmq_url_with_state_url_builds_a_rabbitmq_broker(state_client: object) -> None:
    rabbitmq_available(RABBITMQ_URL)
    broker = epq.setup(RABBITMQ_URL, state_url=STATE_URL)
    try:
        assert isinstance(broker, RabbitmqBroker)
        assert isinstance(broker, DurableDelays)
        assert broker.confirm_delivery is True
    finally:
        broker.close()


def test_settings_broker_url_is_used_by_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPQ_BROKER_URL", UNREACHABLE_REDIS)
    with pytest.raises(epq.BrokerUnavailable, match=r"127\.0\.0\.1:1"):
        epq.setup()


def _backend(url: str) -> Backend:
    state = MemoryStateStore()
    return Backend(mask_url(url), state, MemoryRecords(state))


def test_enqueue_on_a_broker_that_went_away_is_broker_unavailable() -> None:
    # Given a Redis broker whose server stops answering after setup
    import redis

    broker = RedisBroker(client=redis.Redis.from_url(UNREACHABLE_REDIS, socket_connect_timeout=0.5))
    broker.epq = _backend(UNREACHABLE_REDIS)  # what epq keeps beside a broker it built
    broker.declare_queue("default")
    import epq.actors  # the actors are bound (to a stub broker, as EPQ_BROKER_URL says)

    assert isinstance(epq.actors.register_job, dramatiq.Actor)
    # When a job is enqueued on it
    with pytest.raises(epq.BrokerUnavailable) as caught:
        epq.QueueService(broker).enqueue_register_job(
            {"endpoint_id": "6f1d1c1e-4a5b-4c3d-9e8f-0a1b2c3d4e5f", "job_id": "j", "job_metadata": {}}
        )
    # Then the error names the masked URL and keeps the driver's error as its cause
    assert "redis://:***@127.0.0.1:1/0" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)
    assert isinstance(caught.value.__cause__, redis.ConnectionError)


def test_a_rabbitmq_driver_error_at_enqueue_is_broker_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    # pika's errors are mapped too, though the enqueue path no longer imports pika: the
    # RabbitMQ broker names them (epq_driver_errors)
    import pika.exceptions

    from epq.backends.rabbitmq.broker import EpqRabbitmqBroker

    # Given an epq RabbitMQ broker (never connected) whose publish fails in the driver
    broker = EpqRabbitmqBroker(url=UNREACHABLE_RABBIT, confirm_delivery=True)
    broker.epq = _backend(UNREACHABLE_RABBIT)
    broker.declare_queue("default")
    import epq.actors  # the actors are bound (to a stub broker, as EPQ_BROKER_URL says)

    assert isinstance(epq.actors.register_job, dramatiq.Actor)

    def publish_fails(message: dramatiq.Message[object], *, delay: int | None = None) -> None:
        raise pika.exceptions.AMQPChannelError("channel closed by the server")

    monkeypatch.setattr(broker, "enqueue", publish_fails)
    # When a job is enqueued on it
    with pytest.raises(epq.BrokerUnavailable) as caught:
        epq.QueueService(broker).enqueue_register_job(
            {"endpoint_id": "6f1d1c1e-4a5b-4c3d-9e8f-0a1b2c3d4e5f", "job_id": "j", "job_metadata": {}}
        )
    # Then the error names the masked URL and keeps pika's error as its cause
    assert "amqp://guest:***@127.0.0.1:1/%2F" in str(caught.value)
    assert isinstance(caught.value.__cause__, pika.exceptions.AMQPChannelError)
