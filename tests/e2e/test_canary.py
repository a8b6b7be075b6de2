"""The canary (tests/support/canary.py) fails a run that flushes or purges data it did not create."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import redis

from tests.conftest import RABBITMQ_URL, SERVERS, ensure_server

pytestmark = [pytest.mark.redis, pytest.mark.rabbitmq]

INNER = textwrap.dedent(
    """
    import os
    from pathlib import Path

    import pika
    import redis

    from tests.support.canary import CANARY


    def test_what_a_careless_suite_does(request):
        canary = request.config.stash[CANARY]
        Path("planted.txt").write_text(canary.name)
        action = os.environ["CANARY_TEST_ACTION"]
        if action == "flushdb 13":
            redis.Redis.from_url(canary.redis_url, db=13).flushdb()
        elif action == "purge":
            connection = pika.BlockingConnection(pika.URLParameters(canary.rabbitmq_url))
            connection.channel().queue_purge(canary.name)
            connection.close()
    """
)


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch, pytester: pytest.Pytester) -> Iterator[tuple[str, str]]:
    """A Redis of the test's own and this worker's RabbitMQ node, watched instead of the defaults."""
    server = SERVERS.server("redis", "canary")
    ensure_server(server.url)
    ensure_server(RABBITMQ_URL)
    for name in ("EPQ_TEST_REDIS_URL", "EPQ_TEST_STATE_URL", "EPQ_TEST_RESULTS_URL", "EPQ_TEST_RABBITMQ_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EPQ_TEST_CANARY_REDIS", server.url)
    monkeypatch.setenv("EPQ_TEST_CANARY_RABBITMQ", RABBITMQ_URL)
    pytester.makepyfile(test_inner=INNER)
    yield server.url, RABBITMQ_URL
    for db in range(16):
        redis.Redis.from_url(server.url, db=db).flushdb()  # our own server


def run_inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, action: str) -> pytest.RunResult:
    monkeypatch.setenv("CANARY_TEST_ACTION", action)
    return pytester.runpytest("-p", "tests.support.canary", "-p", "no:cacheprovider")


def leftovers(redis_url: str, rabbitmq_url: str, name: str) -> list[str]:
    """Whatever the canary left behind on the watched servers."""
    left = [f"db {db}" for db in range(16) if redis.Redis.from_url(redis_url, db=db).exists(name)]
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        connection.channel().queue_declare(name, passive=True)
        left.append(f"queue {name}")
    except pika.exceptions.ChannelClosedByBroker:
        pass
    finally:
        connection.close()
    return left


def test_a_run_that_touches_nothing_passes_and_leaves_nothing_behind(
    watched: tuple[str, str], pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_inner(pytester, monkeypatch, "nothing")

    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        ["canary: 16 Redis databases and a RabbitMQ queue on the default servers untouched"]
    )
    assert leftovers(*watched, Path(pytester.path / "planted.txt").read_text()) == []


def test_a_flushed_redis_database_fails_the_run(
    watched: tuple[str, str], pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_inner(pytester, monkeypatch, "flushdb 13")

    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*canary: the test suite touched data it did not create*", f"gone: Redis {watched[0]} db 13: key *"]
    )
    assert "db 12" not in result.stdout.str()
    assert leftovers(*watched, Path(pytester.path / "planted.txt").read_text()) == []


def test_a_purged_rabbitmq_queue_fails_the_run(
    watched: tuple[str, str], pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_inner(pytester, monkeypatch, "purge")

    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([f"gone: RabbitMQ {watched[1]}: the message in queue epq-test-canary-*"])
    assert leftovers(*watched, Path(pytester.path / "planted.txt").read_text()) == []
