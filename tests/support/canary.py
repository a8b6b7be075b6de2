"""A canary on the machine's default servers: the test suite must not touch data it did not make.

When Redis on 127.0.0.1:6379 and RabbitMQ on 127.0.0.1:5672 answer, the controlling pytest
process (not the xdist workers) plants, at session start, a uniquely named key in every Redis
database and a uniquely named durable queue holding one persistent message on vhost ``/``. At
session end it checks that all of them are still there, fails the run with a message naming what
went missing otherwise, and removes exactly what it planted.

An unreachable default server is not an error, under CI neither: the suite does not need these
servers, so there is nothing of the developer's there to protect (and a suite that wrongly used
one would fail on its own). A server named by an EPQ_TEST_*_URL variable is not watched: the
developer gave it to the suite to flush. EPQ_TEST_CANARY_REDIS and EPQ_TEST_CANARY_RABBITMQ
watch other servers instead (the canary's own tests use that).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pika
import pytest
import redis

DEFAULT_REDIS = "redis://127.0.0.1:6379"
DEFAULT_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/%2F"
REDIS_DATABASES = 16


@dataclass
class Canary:
    """What was planted this run, and what the check found missing."""

    name: str
    redis_url: str
    rabbitmq_url: str
    redis_dbs: list[int] = field(default_factory=list)
    queue: str | None = None
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


CANARY = pytest.StashKey[Canary]()


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    default_port = 6379 if parts.scheme.startswith(("redis", "rediss")) else 5672
    return (parts.hostname or "127.0.0.1", parts.port or default_port)


def _given_to_the_suite(url: str) -> bool:
    """True if an EPQ_TEST_*_URL names the same server: the suite was told to flush it."""
    watched = _address(url)
    return any(
        name.startswith("EPQ_TEST_") and name.endswith("_URL") and value and _address(value) == watched
        for name, value in os.environ.items()
    )


def _redis(url: str, db: int) -> redis.Redis:
    return redis.Redis.from_url(url, db=db, socket_connect_timeout=2, socket_timeout=5)


def _rabbitmq(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.socket_timeout = 2
    params.blocked_connection_timeout = 5
    return pika.BlockingConnection(params)


def plant(canary: Canary) -> None:
    if _given_to_the_suite(canary.redis_url):
        canary.notes.append(f"Redis {canary.redis_url} not watched: an EPQ_TEST_*_URL names it")
    else:
        for db in range(REDIS_DATABASES):
            try:
                client = _redis(canary.redis_url, db)
                client.set(canary.name, "planted by the epq test suite's canary; removed at the end")
                client.close()
            except redis.ResponseError:  # fewer databases configured
                break
            except (redis.RedisError, OSError) as exc:
                canary.notes.append(f"Redis {canary.redis_url} not watched: {exc!r}")
                break
            canary.redis_dbs.append(db)
    if _given_to_the_suite(canary.rabbitmq_url):
        canary.notes.append(f"RabbitMQ {canary.rabbitmq_url} not watched: an EPQ_TEST_*_URL names it")
        return
    try:
        connection = _rabbitmq(canary.rabbitmq_url)
    except (pika.exceptions.AMQPError, OSError) as exc:
        canary.notes.append(f"RabbitMQ {canary.rabbitmq_url} not watched: {exc!r}")
        return
    with contextlib.closing(connection):
        channel = connection.channel()
        channel.queue_declare(canary.name, durable=True)
        channel.basic_publish(
            "", canary.name, b"canary", pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        )
    canary.queue = canary.name


def check_and_remove(canary: Canary) -> None:
    """Note in ``canary.missing`` whatever planted thing is gone; remove the rest."""
    for db in canary.redis_dbs:
        try:
            client = _redis(canary.redis_url, db)
            if client.delete(canary.name) != 1:
                canary.missing.append(f"Redis {canary.redis_url} db {db}: key {canary.name}")
            client.close()
        except (redis.RedisError, OSError) as exc:
            canary.missing.append(f"Redis {canary.redis_url} db {db}: unreachable at the end ({exc!r})")
    if canary.queue is None:
        return
    try:
        connection = _rabbitmq(canary.rabbitmq_url)
    except (pika.exceptions.AMQPError, OSError) as exc:
        canary.missing.append(f"RabbitMQ {canary.rabbitmq_url}: unreachable at the end ({exc!r})")
        return
    with contextlib.closing(connection):
        channel = connection.channel()
        try:
            count = channel.queue_declare(canary.queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:  # 404: the queue is gone
            canary.missing.append(f"RabbitMQ {canary.rabbitmq_url}: queue {canary.queue}")
            return
        if count != 1:
            canary.missing.append(f"RabbitMQ {canary.rabbitmq_url}: the message in queue {canary.queue}")
        channel.queue_delete(canary.queue)


def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    if hasattr(config, "workerinput"):  # an xdist worker: the controller watches
        return
    canary = Canary(
        name=f"epq-test-canary-{uuid.uuid4().hex[:12]}",
        redis_url=os.environ.get("EPQ_TEST_CANARY_REDIS") or DEFAULT_REDIS,
        rabbitmq_url=os.environ.get("EPQ_TEST_CANARY_RABBITMQ") or DEFAULT_RABBITMQ,
    )
    config.stash[CANARY] = canary
    plant(canary)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    canary = session.config.stash.get(CANARY, None)
    if canary is None:
        return
    check_and_remove(canary)
    if canary.missing:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    canary = config.stash.get(CANARY, None)
    if canary is None:
        return
    for note in canary.notes:
        terminalreporter.write_line(f"canary: {note}")
    if canary.missing:
        terminalreporter.write_sep("=", "canary: the test suite touched data it did not create", red=True)
        for what in canary.missing:
            terminalreporter.write_line(f"gone: {what}", red=True)
    elif canary.redis_dbs or canary.queue:
        queue = " and a RabbitMQ queue" if canary.queue else ""
        watched = f"{len(canary.redis_dbs)} Redis databases{queue}"
        terminalreporter.write_line(f"canary: {watched} on the default servers untouched")
