"""Broker fixtures: one per broker, and a lazily parametrized ``broker`` for the contract suite.

Redis and RabbitMQ are the suite's own throwaway servers (``tests/support/servers.py``): each
test process starts a private ``redis-server`` and RabbitMQ node on free ports when its first
test needs them, and stops them at the end. EPQ_TEST_REDIS_URL, EPQ_TEST_STATE_URL,
EPQ_TEST_RESULTS_URL and EPQ_TEST_RABBITMQ_URL name other servers instead (the suite flushes
those databases and purges its queues there). A server that cannot be started (its binary is
missing) or reached skips its tests locally and fails them under CI=true. The outbox tests use
the PostgreSQL of EPQ_TEST_POSTGRES_URL (default: 127.0.0.1:5432, database ``test``), in a schema
of each test process's own, dropped at the end (``tests/support/postgres.py``); unreachable, it
skips them too (fails under CI=true). The stub case uses the
``epq_broker`` fixture of the ``epq.testing`` plugin, as an application would.

The test modules: ``unit/`` (in-process; a few need a server), ``contract/`` (the ``broker``
fixture's suite, and the stores'), ``redis/`` and ``rabbitmq/`` (one broker's own), ``e2e/``
(worker subprocesses, the command, the README, the embedded Redis); helpers and worker handler
modules in ``support/``. Tests reach epq's internals through ``epq.testing`` only
(``unit/test_test_suite.py``).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import dramatiq
import pika
import psycopg
import pytest
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from epq.settings import reset_settings
from epq.testing import install, reset
from tests.support.postgres import POSTGRES_URL, Schema
from tests.support.servers import ServerUnavailable, Session

pytest_plugins = ["pytester", "tests.support.canary"]

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
GIVEN_URLS = {
    name: os.environ[name]
    for name in ("EPQ_TEST_REDIS_URL", "EPQ_TEST_STATE_URL", "EPQ_TEST_RESULTS_URL", "EPQ_TEST_RABBITMQ_URL")
    if os.environ.get(name)
}
SERVERS = Session.create()
#: This process's schema in the PostgreSQL of the outbox tests (made on first use).
POSTGRES = Schema(POSTGRES_URL)


def _private(kind: str) -> str:
    return SERVERS.server(kind).url


REDIS_URL = GIVEN_URLS.get("EPQ_TEST_REDIS_URL") or f"{_private('redis')}/15"
STATE_URL = GIVEN_URLS.get("EPQ_TEST_STATE_URL") or f"{_private('redis')}/14"
# where worker subprocesses' handlers report (tests/support/workers.py)
RESULTS_URL = GIVEN_URLS.get("EPQ_TEST_RESULTS_URL") or f"{_private('redis')}/13"
RABBITMQ_URL = GIVEN_URLS.get("EPQ_TEST_RABBITMQ_URL") or _private("rabbitmq")


def _unavailable(message: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{message} (CI=true: servers are required)")
    pytest.skip(message)


def _unreachable(what: str, exc: BaseException) -> NoReturn:
    _unavailable(f"{what} is unreachable: {exc!r}")


def ensure_server(url: str) -> None:
    """Start the private server behind ``url`` if it is one; skip (fail under CI) if it cannot."""
    for server in SERVERS.servers.values():
        if url == server.url or url.startswith(server.url + "/"):
            try:
                server.ensure_started()
            except ServerUnavailable as exc:
                _unavailable(f"no private {server.kind} server for the tests: {exc}")


def redis_available(url: str) -> redis.Redis:
    ensure_server(url)
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=None)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        _unreachable(f"Redis at {url}", exc)
    return client


def postgres_available() -> Schema:
    """This process's schema in the outbox tests' PostgreSQL; skip (fail under CI) if the server
    cannot be reached."""
    try:
        POSTGRES.connect().close()
    except psycopg.OperationalError as exc:
        _unreachable(f"PostgreSQL at {POSTGRES_URL}", exc)
    return POSTGRES


def rabbitmq_available(url: str) -> None:
    ensure_server(url)
    params = pika.URLParameters(url)
    params.socket_timeout = 2
    try:
        pika.BlockingConnection(params).close()
    except (pika.exceptions.AMQPError, OSError) as exc:
        _unreachable(f"RabbitMQ at {url}", exc)


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (tox or CI stopping the run) unwinds like Ctrl-C, so fixtures stop their worker
    # subprocesses and pytest_unconfigure stops the servers.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    workers = getattr(config.option, "numprocesses", None)
    if GIVEN_URLS and workers not in (None, 0, 1) and not hasattr(config, "workerinput"):
        raise pytest.UsageError(
            f"{', '.join(sorted(GIVEN_URLS))} point every xdist worker at the same servers, "
            "where they would flush each other's data: run with -n 0, or unset them"
        )


SLOW_TEST_TIMEOUT_S = 180


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (worker subprocesses) get 180 s instead of 60 on a loaded machine."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))


def pytest_unconfigure(config: pytest.Config) -> None:
    try:
        POSTGRES.close()
    finally:
        SERVERS.close()


@pytest.fixture(autouse=True)
def _servers_for_markers(request: pytest.FixtureRequest) -> None:
    """A test marked ``redis`` or ``rabbitmq`` gets that server started (or is skipped)."""
    if request.node.get_closest_marker("redis") or request.node.get_closest_marker("rabbitmq"):
        redis_available(REDIS_URL).close()
        redis_available(STATE_URL).close()
    if request.node.get_closest_marker("rabbitmq"):
        rabbitmq_available(RABBITMQ_URL)
    if request.node.get_closest_marker("postgres"):
        postgres_available()


@pytest.fixture(autouse=True)
def _clean_epq_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts with no EPQ_* variables but EPQ_BROKER_URL=stub:// and EPQ_TRACING=0 (the
    test dependencies install OpenTelemetry; the tracing tests turn it on), nothing set up."""
    for name in list(os.environ):
        if name.startswith("EPQ_") and not name.startswith("EPQ_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("EPQ_BROKER_URL", "stub://")
    monkeypatch.setenv("EPQ_TRACING", "0")
    reset()
    reset_settings()
    yield
    reset()
    reset_settings()


@pytest.fixture
def outbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh outbox table (its name) in this process's schema, named by EPQ_OUTBOX_TABLE, with
    EPQ_OUTBOX_URL set (so a worker's relay reads it): request it before the broker, which reads
    the settings. Dropped after the test."""
    schema = postgres_available()
    table = schema.new_table()
    monkeypatch.setenv("EPQ_OUTBOX_URL", POSTGRES_URL)
    monkeypatch.setenv("EPQ_OUTBOX_TABLE", table)
    reset_settings()
    yield table
    schema.drop_table(table)


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
    broker = install(REDIS_URL)
    yield broker
    broker.flush_all()
    broker.close()


@pytest.fixture
def rabbitmq_broker(state_client: redis.Redis) -> Iterator[dramatiq.Broker]:
    rabbitmq_available(RABBITMQ_URL)
    broker = install(RABBITMQ_URL, state_url=STATE_URL)
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
    """Start worker subprocesses (tests.support.workers.Worker); stopped after the test."""
    from tests.support.workers import Worker

    workers: list[Worker] = []

    def start(argv: list[str], env: dict[str, str], key: str | None = None) -> Worker:
        worker = Worker(argv, env, tmp_path, key)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
