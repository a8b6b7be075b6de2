"""End to end: a real worker process (`dramatiq epq.actors`, configured by the environment only)
runs jobs sent from this process, on Redis, RabbitMQ and the embedded default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import redis

import epq
from epq.backends import embedded
from epq.testing import install
from tests.conftest import RABBITMQ_URL, REDIS_URL, STATE_URL, rabbitmq_available
from tests.support.helpers import FACADE, VALID
from tests.support.workers import BIN, Worker

pytestmark = pytest.mark.slow

DRAMATIQ = [str(BIN / "dramatiq"), "epq.actors", "--processes", "1", "--threads", "2"]


def _send_every_kind(broker_url: str | None, state_url: str | None = None) -> dict[str, str]:
    """Send one job of each kind (one through the facade, on the events queue); return id -> kind.

    With no ``broker_url``, epq is set up from the settings (the embedded default when they name
    no broker)."""
    if broker_url is None:
        epq.setup()
    else:
        install(broker_url, state_url=state_url)
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
    broker = install(RABBITMQ_URL, state_url=STATE_URL)
    broker.flush_all()
    worker = start_worker(DRAMATIQ, {"EPQ_BROKER_URL": RABBITMQ_URL, "EPQ_STATE_URL": STATE_URL})
    sent = _send_every_kind(RABBITMQ_URL, STATE_URL)
    _check(worker.collect(len(sent)), sent, worker)


@pytest.mark.embedded
@pytest.mark.redis  # the worker's handlers report to the results Redis
def test_dramatiq_worker_on_the_embedded_default(
    start_worker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Neither side names a broker: both use the embedded Redis under the user's state dir.
    state_home = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state_home))
    monkeypatch.delenv("EPQ_BROKER_URL")
    worker = start_worker(DRAMATIQ, {"XDG_STATE_HOME": str(state_home)})
    try:
        sent = _send_every_kind(None)
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
    broker = install(REDIS_URL)
    svc = epq.QueueService(broker)
    on_default = svc.enqueue_register_job(VALID["register_job"]).job.id
    on_events = svc.enqueue_register_job(
        {**VALID["register_job"], "job_id": "e", "queue_name": "events"}
    ).job.id

    reports = worker.collect(1)

    assert [r["job_id"] for r in reports] == [on_events]
    assert worker.results.blpop([worker.key], timeout=1) is None
    assert redis_client.llen("dramatiq:default.P2") == 1  # the priority-2 lane
    assert (
        on_default in redis_client.hkeys("dramatiq:default.msgs")[0].decode()
        or redis_client.hlen("dramatiq:default.msgs") == 1
    )


@pytest.mark.rabbitmq
def test_epq_worker_serves_only_the_queues_it_is_given_on_rabbitmq(
    start_worker: Any, state_client: redis.Redis
) -> None:
    from tests.support.helpers import message_count

    rabbitmq_available(RABBITMQ_URL)
    broker = install(RABBITMQ_URL, state_url=STATE_URL)
    try:
        for queue in ("default", "events"):
            broker.declare_queue(queue, ensure=True)  # type: ignore[call-arg]
            broker.flush(queue)
        worker = start_worker(
            [str(BIN / "epq"), "worker", "--processes", "1", "--threads", "2", "-Q", "events"],
            {"EPQ_BROKER_URL": RABBITMQ_URL, "EPQ_STATE_URL": STATE_URL},
        )
        svc = epq.QueueService(broker)
        svc.enqueue_register_job(VALID["register_job"])
        on_events = svc.enqueue_register_job({**VALID["register_job"], "job_id": "e", "queue_name": "events"})

        assert [r["job_id"] for r in worker.collect(1)] == [on_events.job.id]
        assert worker.results.blpop([worker.key], timeout=1) is None
        assert message_count(broker, "default") == 1
    finally:
        broker.flush_all()
