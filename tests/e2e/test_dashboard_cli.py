"""``epq dashboard`` as a command: it serves the pages on loopback over the broker it names, asks
for the token when one is set, and prints the broker's URL masked; without the ``dashboard``
extra it says what to install."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import dramatiq
import pytest

from tests.conftest import REDIS_URL
from tests.support.helpers import wait_for

pytestmark = pytest.mark.redis
EPQ = str(Path(sys.executable).parent / "epq")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path, headers=headers or {})
        return connection.getresponse().status
    except OSError:
        return 0
    finally:
        connection.close()


def test_the_command_serves_the_dashboard_and_asks_for_the_token(
    redis_broker: dramatiq.Broker, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPQ_")}
    env.update(EPQ_BROKER_URL=REDIS_URL, EPQ_DASHBOARD_TOKEN="tok-1")
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        process = subprocess.Popen([EPQ, "dashboard", "--port", str(port)], env=env, stderr=err)
    try:
        bearer = {"Authorization": "Bearer tok-1"}
        assert wait_for(lambda: get(port, "/queues", bearer) == 200, timeout=20), stderr.read_text()
        assert get(port, "/queues") == 303  # to the login page
        assert get(port, "/login") == 200
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)
    printed = stderr.read_text()
    assert f"epq: dashboard on http://127.0.0.1:{port}/ (a token or basic auth asked)" in printed
    password = REDIS_URL.split("://", 1)[1].rpartition("@")[0].partition(":")[2]
    if password:
        assert password not in printed


@pytest.mark.parametrize("module", ["uvicorn", "starlette", "jinja2"])
def test_without_the_extra_the_command_says_what_to_install(module: str) -> None:
    code = (
        f"import sys; sys.modules[{module!r}] = None; from epq.cli import main; sys.exit(main(['dashboard']))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPQ_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr == (
        f"epq: error: epq dashboard needs the dashboard extra ({module} is not installed): "
        "pip install 'epq[dashboard]'\n"
    )
