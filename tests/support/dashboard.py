"""The dashboard's test helpers: jobs of every kind of row to show, the dashboard served by uvicorn
in a thread, and the system's Chromium driven by Playwright (``tests/unit/test_dashboard.py``,
``tests/e2e/test_dashboard_browser.py`` and ``tests/support/dashboard_screenshots.py``)."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import uvicorn

import epq
from epq.testing import HandlerRegistry, drain

#: Debian's Chromium (``.ci/run`` installs it); Playwright's own browser builds are not used.
CHROMIUM = os.environ.get("EPQ_TEST_CHROMIUM", "/usr/bin/chromium")
ENDPOINT_A = "00000000-0000-4000-8000-00000000000a"
ENDPOINT_B = "00000000-0000-4000-8000-00000000000b"
ENDPOINT_C = "00000000-0000-4000-8000-00000000000c"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(page: str) -> str:
    """The CSRF token of the first form of a page's HTML."""
    found = CSRF.search(page)
    assert found is not None, "no form with a CSRF token on the page"
    return found.group(1)


class RegistrationRefused(epq.Discard):
    """What the dead jobs' handler raises: a ``Discard``, so they are dead at the first attempt
    (its type and message show on their pages)."""


@dataclass
class Seeded:
    """The ids of the jobs :func:`seed` made, by what they are."""

    dead: list[str] = field(default_factory=list)
    completed: str = ""
    waiting: list[str] = field(default_factory=list)
    scheduled: str = ""


def seed(broker: dramatiq.Broker, handlers: HandlerRegistry) -> Seeded:
    """Jobs to show: two dead ``register_job`` jobs (their handler raised), a completed
    ``register_source`` with an output, then (no worker running any more) three waiting
    ``index_endpoint`` jobs of priorities 1, 1 and 3 (endpoints A, B and C) and a ``register_source``
    of endpoint B scheduled an hour on (each with a unique key of its own)."""

    def refuse(request: Any) -> None:
        raise RegistrationRefused(f"endpoint {request.endpoint_id} refused job {request.job_id}: HTTP 409")

    handlers.register("register_job", refuse)
    handlers.register("register_source", lambda request: {"source": request.source_id, "rows": 128})
    svc = epq.QueueService(broker)
    out = Seeded()
    for n in (1, 2):
        request = {"endpoint_id": ENDPOINT_A, "job_id": f"nightly-{n}", "job_metadata": {"n": n}}
        out.dead.append(svc.enqueue_register_job(request).job.id)
    source = {"endpoint_id": ENDPOINT_B, "source_id": "crm", "source_metadata": {"region": "eu"}}
    out.completed = svc.enqueue_register_source(source).job.id
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=2)
    worker.start()
    try:
        drain(broker, worker, fail_fast=False)
    finally:
        worker.stop()
    for endpoint, priority, reason in (
        (ENDPOINT_A, 1, "created"),
        (ENDPOINT_B, 1, "edited"),
        (ENDPOINT_C, 3, "nightly"),
    ):
        request = {"endpoint_id": endpoint, "source": "API", "reason": reason, "priority": priority}
        out.waiting.append(svc.enqueue_index_endpoint(request).job.id)
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    later_source = {**source, "source_id": "billing", "run_at": later}
    out.scheduled = svc.enqueue_register_source(later_source).job.id
    return out


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free loopback port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the dashboard did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed"
    return None
