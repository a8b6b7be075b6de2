"""Servers that refuse or stop answering: errors that say why, and bounded waits.

The frozen-server tests run their own redis-server (on a Unix socket in a private directory)
and stop it with SIGSTOP, so that it accepts connections but never answers; SIGCONT resumes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis

import epq
from epq.backends import embedded
from epq.errors import REDIS_REPLY_TIMEOUT_S, describe_error
from epq.testing import backend, reset
from tests.support.helpers import VALID, total_waiting


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed: nothing listens there now


class PrivateRedis:
    """A redis-server of the test's own, on a Unix socket."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="epq-"))  # short: a socket path has ~100 bytes
        self.sock = self.dir / "redis.sock"
        self.url = f"unix://{self.sock}"
        self.process = subprocess.Popen(
            [embedded._redis_executable(), "--port", "0", "--unixsocket", str(self.sock),
             "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self._answers():
            assert time.monotonic() < deadline, "the private redis-server did not start"
            time.sleep(0.02)

    def _answers(self) -> bool:
        client = redis.Redis(unix_socket_path=str(self.sock), socket_timeout=1)
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        finally:
            client.close()

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.thaw()
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    yield server
    reset()
    server.stop()


def test_an_unreachable_redis_says_why() -> None:
    port = _free_port()
    with pytest.raises(epq.BrokerUnavailable) as caught:
        epq.setup(f"redis://127.0.0.1:{port}/0")
    text = str(caught.value)
    assert f"connecting to 127.0.0.1:{port}" in text
    assert "Connection refused" in text
    assert "network:" not in text


def test_an_enqueue_on_a_redis_that_went_away_says_why(private_redis: PrivateRedis) -> None:
    broker = epq.setup(private_redis.url)
    svc = epq.QueueService(broker)
    svc.enqueue_register_job(VALID["register_job"])
    private_redis.stop()
    with pytest.raises(epq.BrokerUnavailable) as caught:
        svc.enqueue_register_source(VALID["register_source"])
    text = str(caught.value)
    assert f"could not enqueue register_source on {private_redis.url}: ConnectionError: " in text
    assert str(private_redis.sock) in text  # redis-py's text: "Error 2 connecting to <socket>..."
    assert "network:" not in text


def test_a_state_store_failure_says_why(epq_broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: Any, **kwargs: Any) -> None:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused.")

    monkeypatch.setattr(backend(epq_broker).records, "create", refused)
    with pytest.raises(epq.StateUnavailable) as caught:
        epq.QueueService(epq_broker).enqueue_register_job(VALID["register_job"])
    assert str(caught.value) == (
        "the state store failed while writing a job record: "
        "ConnectionError: Error 111 connecting to 127.0.0.1:6390. Connection refused."
    )


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (redis.TimeoutError(), f"TimeoutError: timed out (no reply within {REDIS_REPLY_TIMEOUT_S:g} s)"),
        (ConnectionRefusedError(111, "refused"), "ConnectionRefusedError: [Errno 111] refused"),
        (OSError(), "OSError: no details given"),
    ],
)
def test_describe_error_always_says_something(error: BaseException, text: str) -> None:
    assert describe_error(error) == text


@pytest.mark.slow
def test_an_enqueue_on_a_frozen_redis_fails_in_bounded_time_and_never_makes_two_jobs(
    private_redis: PrivateRedis,
) -> None:
    # Given a Redis that accepts connections but does not answer
    broker = epq.setup(private_redis.url)
    svc = epq.QueueService(broker)
    private_redis.freeze()
    # When a job is enqueued: BrokerUnavailable after the reply timeout, not a longer wait
    started = time.monotonic()
    with pytest.raises(epq.BrokerUnavailable, match=rf"no reply within {REDIS_REPLY_TIMEOUT_S:g} s"):
        svc.enqueue_register_job(VALID["register_job"])
    took = time.monotonic() - started
    assert REDIS_REPLY_TIMEOUT_S - 0.5 < took < REDIS_REPLY_TIMEOUT_S + 2
    # Then once it answers again, the same request gives one job at most: the call that timed
    # out ran whole or not at all, and it was not "taken back" half-way
    private_redis.thaw()
    svc.enqueue_register_job(VALID["register_job"])
    assert total_waiting(broker) == 1


@pytest.mark.slow
def test_a_consumer_on_a_frozen_redis_warns_and_tries_again(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    broker = epq.setup(private_redis.url)
    consumer = broker.consume("default", prefetch=1, timeout=100)
    assert next(consumer) is None  # connected, nothing to fetch
    private_redis.freeze()
    with caplog.at_level(logging.WARNING, logger="epq"):
        assert next(consumer) is None  # no error: Dramatiq would log it CRITICAL and restart
    assert [r.levelname for r in caplog.records if "did not answer" in r.getMessage()] == ["WARNING"]
    private_redis.thaw()
    epq.QueueService(broker).enqueue_register_job(VALID["register_job"])
    deadline = time.monotonic() + 5
    message = None
    while message is None and time.monotonic() < deadline:
        message = next(consumer)
    assert message is not None  # the same consumer goes on once Redis answers
    consumer.close()


def test_stats_watch_on_a_server_that_goes_away_ends_in_one_line(private_redis: PrivateRedis) -> None:
    from tests.e2e.test_cli import EPQ

    env = {k: v for k, v in os.environ.items() if not k.startswith("EPQ_")}
    proc = subprocess.Popen(
        [EPQ, "stats", "--watch", "0.1", "--broker-url", private_redis.url],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert "epq stats" in proc.stdout.readline()  # it is watching
    private_redis.stop()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    lines = [line for line in err.splitlines() if not line.startswith("epq: broker ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("epq: error: the broker or state store failed: ConnectionError: ")
