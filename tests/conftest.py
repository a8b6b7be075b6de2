"""Broker fixtures: one per broker, and a lazily parametrized ``broker`` for the contract suite.

Redis and RabbitMQ come from the environment (EPQ_TEST_REDIS_URL, EPQ_TEST_RABBITMQ_URL,
EPQ_TEST_STATE_URL). An unreachable server skips its tests locally and fails them under CI=true.
The stub case uses the ``epq_broker`` fixture of the ``epq.testing`` plugin, as an application
would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pika
import pytest
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from epq import _runtime
from epq.settings import reset_settings

pytest_plugins = ["pytester"]

REDIS_URL = os.environ.get("EPQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
STATE_URL = os.environ.get("EPQ_TEST_STATE_URL", "redis://127.0.0.1:6379/14")
RABBITMQ_URL = os.environ.get("EPQ_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _unreachable(what: str, exc: BaseException) -> None:
    message = f"{what} is unreachable: {exc!r}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: servers are required)")
    pytest.skip(message)


def redis_available(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=None)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        _unreachable(f"Redis at {url}", exc)
    return client


def rabbitmq_available(url: str) -> None:
    params = pika.URLParameters(url)
    params.socket_timeout = 2
    try:
        pika.BlockingConnection(params).close()
    except (pika.exceptions.AMQPError, OSError) as exc:
        _unreachable(f"RabbitMQ at {url}", exc)


@pytest.fixture(autouse=True)
def _clean_epq_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts with no EPQ_* variables but EPQ_BROKER_URL=stub://, nothing set up."""
    for name in list(os.environ):
        if name.startswith("EPQ_") and not name.startswith("EPQ_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("EPQ_BROKER_URL", "stub://")
    _runtime.reset()
    reset_settings()
    yield
    _runtime.reset()
    reset_settings()


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    """A client on the test database, flushed before and after the test."""
    client = redis_available(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def state_client() -> Iterator[redis.Redis]:
    """A client on the state database used next to RabbitMQ, flushed before and after."""
    client = redis_available(STATE_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def redis_broker(redis_client: redis.Redis) -> Iterator[dramatiq.Broker]:
    broker = _runtime.install(REDIS_URL).broker
    yield broker
    broker.flush_all()
    broker.close()


@pytest.fixture
def rabbitmq_broker(state_client: redis.Redis) -> Iterator[dramatiq.Broker]:
    rabbitmq_available(RABBITMQ_URL)
    broker = _runtime.install(RABBITMQ_URL, state_url=STATE_URL).broker
    assert isinstance(broker, RabbitmqBroker)
    for queue in list(broker.get_declared_queues()):
        broker.declare_queue(queue, ensure=True)
    broker.flush_all()
    yield broker
    broker.flush_all()
    broker.close()


@pytest.fixture(
    params=[
        "stub",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    ]
)
def broker(request: pytest.FixtureRequest) -> dramatiq.Broker:
    """The contract suite's broker: stub, Redis, then RabbitMQ (resolved lazily)."""
    name = "epq_broker" if request.param == "stub" else f"{request.param}_broker"
    broker: dramatiq.Broker = request.getfixturevalue(name)
    return broker


@pytest.fixture
def worker(broker: dramatiq.Broker) -> Iterator[dramatiq.Worker]:
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Any]:
    """Start worker subprocesses (tests.workers.Worker); stopped after the test."""
    from tests.workers import Worker

    workers: list[Worker] = []

    def start(argv: list[str], env: dict[str, str], key: str | None = None) -> Worker:
        worker = Worker(argv, env, tmp_path, key)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
