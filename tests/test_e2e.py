"""End to end: a real worker process (`dramatiq epq.actors`, configured by the environment only)
runs jobs sent from this process, on Redis, RabbitMQ and the embedded default."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import epq
from epq import _runtime
from epq.brokers import embedded
from tests.conftest import RABBITMQ_URL, REDIS_URL, STATE_URL, rabbitmq_available, redis_available
from tests.test_contract import FACADE, VALID

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RESULTS_URL = os.environ.get("EPQ_TEST_RESULTS_URL", "redis://127.0.0.1:6379/13")
BIN = Path(sys.executable).parent


class Worker:
    """A worker subprocess and the results it reports."""

    def __init__(self, argv: list[str], env: dict[str, str], tmp_path: Path) -> None:
        self.results = redis_available(RESULTS_URL)
        self.key = f"epq:e2e:{uuid.uuid4()}"
        self.log = tmp_path / "worker.log"
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EPQ_") or k.startswith("EPQ_TEST_")},
            "EPQ_HANDLERS": "tests.e2e_handlers",
            "EPQ_TEST_RESULTS_URL": RESULTS_URL,
            "EPQ_TEST_RESULTS_KEY": self.key,
            "PYTHONPATH": str(ROOT),
            **env,
        }
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, env=full_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def collect(self, n: int, timeout: float = 45.0) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        while len(got) < n:
            item = self.results.blpop([self.key], timeout=timeout)
            assert item is not None, (
                f"only {len(got)} of {n} jobs reported; worker log:\n{self.log.read_text()}"
            )
            got.append(json.loads(item[1]))
        return got

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.results.delete(self.key)
        self.results.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Any]:
    workers: list[Worker] = []

    def start(argv: list[str], env: dict[str, str]) -> Worker:
        worker = Worker(argv, env, tmp_path)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


DRAMATIQ = [str(BIN / "dramatiq"), "epq.actors", "--processes", "1", "--threads", "2"]


def _send_every_kind(broker_url: str, state_url: str | None = None) -> dict[str, str]:
    """Send one job of each kind (one through the facade, on the events queue); return id -> kind."""
    _runtime.install(broker_url, state_url=state_url)
    from epq import actors

    sent = {}
    for kind in VALID:
        message = getattr(actors, kind).send(**VALID[kind])
        sent[message.message_id] = kind
    result = getattr(epq.QueueService(), FACADE["register_job"])(
        {**VALID["register_job"], "job_id": "via-facade", "queue_name": "events", "priority": 1}
    )
    sent[result.job.id] = "register_job"
    return sent


def _check(reports: list[dict[str, Any]], sent: dict[str, str], worker: Worker) -> None:
    assert {r["job_id"]: r["kind"] for r in reports} == sent
    assert all(r["pid"] != os.getpid() for r in reports)
    by_kind = {r["kind"]: r for r in reports if r["request"].get("job_id") != "via-facade"}
    for kind, fields in VALID.items():
        for name, value in fields.items():
            assert by_kind[kind]["request"][name] == value
    assert [r["queue"] for r in reports if r["request"].get("job_id") == "via-facade"] == ["events"]
    assert worker.proc.poll() is None, worker.log.read_text()


@pytest.mark.redis
def test_dramatiq_worker_on_redis(start_worker: Any, redis_client: redis.Redis) -> None:
    worker = start_worker(DRAMATIQ, {"EPQ_BROKER_URL": REDIS_URL})
    sent = _send_every_kind(REDIS_URL)
    _check(worker.collect(len(sent)), sent, worker)


@pytest.mark.rabbitmq
def test_dramatiq_worker_on_rabbitmq(start_worker: Any, state_client: redis.Redis) -> None:
    rabbitmq_available(RABBITMQ_URL)
    broker = _runtime.install(RABBITMQ_URL, state_url=STATE_URL).broker
    broker.flush_all()
    worker = start_worker(DRAMATIQ, {"EPQ_BROKER_URL": RABBITMQ_URL, "EPQ_STATE_URL": STATE_URL})
    sent = _send_every_kind(RABBITMQ_URL, STATE_URL)
    _check(worker.collect(len(sent)), sent, worker)


@pytest.mark.embedded
def test_dramatiq_worker_on_the_embedded_default(
    start_worker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Neither side names a broker: both use the embedded Redis under the user's state dir.
    state_home = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state_home))
    monkeypatch.delenv("EPQ_BROKER_URL")
    try:
        worker = start_worker(DRAMATIQ, {"XDG_STATE_HOME": str(state_home)})
        sent = _send_every_kind(_runtime.default_broker_url())
        _check(worker.collect(len(sent)), sent, worker)
    finally:
        worker.stop()
        embedded.stop_server(state_home / "epq" / "redis.db")


@pytest.mark.redis
def test_epq_worker_serves_only_the_queues_it_is_given(start_worker: Any, redis_client: redis.Redis) -> None:
    worker = start_worker(
        [str(BIN / "epq"), "worker", "--processes", "1", "--threads", "2", "-Q", "events"],
        {"EPQ_BROKER_URL": REDIS_URL},
    )
    broker = _runtime.install(REDIS_URL).broker
    svc = epq.QueueService(broker)
    on_default = svc.enqueue_register_job(VALID["register_job"]).job.id
    on_events = svc.enqueue_register_job(
        {**VALID["register_job"], "job_id": "e", "queue_name": "events"}
    ).job.id

    reports = worker.collect(1)

    assert [r["job_id"] for r in reports] == [on_events]
    assert worker.results.blpop([worker.key], timeout=1) is None
    assert redis_client.llen("dramatiq:default") == 1
    assert (
        on_default in redis_client.hkeys("dramatiq:default.msgs")[0].decode()
        or redis_client.hlen("dramatiq:default.msgs") == 1
    )
