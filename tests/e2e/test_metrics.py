"""Prometheus metrics after a known run, scraped over HTTP, exact: from an in-process worker on
the stub broker; from a real ``dramatiq epq.actors -p 2`` worker (``EPQ_METRICS_PORT``) and from
``epq metrics`` on Redis and RabbitMQ. And a duplicate start, made by killing a worker.

The known run (``register_job``): 16 immediate jobs, of which 2 fail once and are retried and 1
is discarded at once; 4 scheduled an hour ahead; 5 enqueues refused as duplicates of earlier ones
(refused in the test process, and counted in the state store, so the worker's scrape shows them).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import epq
from epq import metrics
from epq.cli import main
from epq.settings import reset_settings
from epq.testing import backend, drain
from tests.conftest import RABBITMQ_URL, REDIS_URL, STATE_URL
from tests.support.helpers import ENDPOINT, wait_for
from tests.support.metrics_jobs import run_job
from tests.support.workers import BIN, HOLD_HANDLERS, ROOT

METRICS_HANDLERS = "tests.support.metrics_handlers"
KIND = "register_job"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# ---- the known run and what it must show --------------------------------------------------------

#: Worker-side: 16 starts + 2 retries; 13 + 2 completed, 2 retried, 1 discarded.
WORKER_EXPECTED = {
    ("epq_jobs_started_total", (("kind", KIND),)): 18,
    ("epq_jobs_processed_total", (("kind", KIND), ("outcome", "completed"))): 15,
    ("epq_jobs_processed_total", (("kind", KIND), ("outcome", "retried"))): 2,
    ("epq_jobs_processed_total", (("kind", KIND), ("outcome", "discarded"))): 1,
    ("epq_job_duration_seconds_count", (("kind", KIND),)): 18,
    ("epq_enqueue_to_start_seconds_count", (("kind", KIND),)): 18,
}
#: Store-side: 15 completed, 1 dead, 4 scheduled; locks held by the 15 completed and 4 scheduled
#: jobs (the dead job's is freed); nothing waits, so no lag.
STORE_EXPECTED = {
    ("epq_jobs", (("priority", "2"), ("queue", "default"), ("state", "completed"))): 15,
    ("epq_jobs", (("priority", "2"), ("queue", "default"), ("state", "discarded"))): 1,
    ("epq_jobs", (("priority", "2"), ("queue", "default"), ("state", "scheduled"))): 4,
    ("epq_oldest_waiting_seconds", (("priority", "2"), ("queue", "default"))): 0,
    ("epq_scheduled_jobs", ()): 4,
    ("epq_scheduled_due_jobs", ()): 0,
    ("epq_dead_jobs", (("queue", "default"),)): 1,
    ("epq_unique_locks", (("kind", KIND),)): 19,
    ("epq_duplicates_refused_total", (("kind", KIND),)): 5,  # (counted by the enqueuing process)
}


def request(n: int, **metadata: Any) -> dict[str, Any]:
    return {"endpoint_id": ENDPOINT, "job_id": f"job-{n}", "job_metadata": {"n": n, **metadata}}


def known_run(broker: dramatiq.Broker) -> None:
    """Enqueue the known run (see the module docstring)."""
    svc = epq.QueueService(broker)
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    fail = {0: {"fail": "once"}, 1: {"fail": "once"}, 2: {"fail": "discard"}}
    results = [svc.enqueue_register_job(request(n, **fail.get(n, {}))) for n in range(16)]
    results += [svc.enqueue_register_job({**request(100 + n), "run_at": later}) for n in range(4)]
    results += [svc.enqueue_register_job(request(n)) for n in range(3, 8)]  # the duplicates
    assert sum(r.unique_skipped_as_duplicate for r in results) == 5


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def up(url: str) -> bool:
    try:
        scrape(url)
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_exact(samples: Samples, expected: dict[Any, float], prefix: tuple[str, ...]) -> None:
    """Every expected sample has its value; every other sample of those families is 0."""
    for key, value in expected.items():
        assert samples.get(key, 0) == value, (key, samples.get(key))
    for key, value in samples.items():
        if key[0].startswith(prefix) and key not in expected and not key[0].endswith(("_created", "_sum")):
            if key[0].endswith("_bucket"):
                continue
            assert value == 0, (key, value)


def matches(samples: Samples, expected: dict[Any, float]) -> bool:
    return all(samples.get(key, 0) == value for key, value in expected.items())


@pytest.fixture
def producer_metrics() -> Iterator[CollectorRegistry]:
    """This process records the metrics (as an application with ``EPQ_METRICS=1``), on a registry
    of the test's own."""
    metrics.disable()
    registry = CollectorRegistry()
    metrics.enable(registry)
    yield registry
    metrics.disable()


STORE_FAMILIES = (
    "epq_jobs",
    "epq_oldest",
    "epq_scheduled",
    "epq_dead",
    "epq_unique",
    "epq_duplicates_refused",
)
WORKER_FAMILIES = ("epq_jobs_started", "epq_jobs_processed", "epq_job_duration", "epq_enqueue_to")


# ---- stub: an in-process worker -----------------------------------------------------------------


def test_the_known_run_on_the_stub_broker(
    producer_metrics: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    # Given the stub broker set up with EPQ_METRICS=1, and its worker
    monkeypatch.setenv("EPQ_METRICS", "1")
    reset_settings()
    broker = request.getfixturevalue("epq_broker")
    request.getfixturevalue("epq_handlers").register(KIND, run_job)
    worker = request.getfixturevalue("epq_worker")
    # When the known run is enqueued and drained
    known_run(broker)
    drain(broker, worker, fail_fast=False)
    metrics.flush()  # (a worker writes what it counted every FLUSH_S seconds)
    # Then the worker-side metrics, served over HTTP, are exact
    port = free_port()
    server = metrics.serve(producer_metrics, port, "127.0.0.1")
    try:
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    assert_exact(samples, WORKER_EXPECTED, WORKER_FAMILIES)
    assert samples.get(("epq_duplicate_starts_total", (("kind", KIND),)), 0) == 0
    # And so are the store-side ones
    stores = backend(broker)
    port = free_port()
    server = metrics.serve(metrics.store_registry(stores.state, stores.records), port, "127.0.0.1")
    try:
        assert_exact(scrape(f"http://127.0.0.1:{port}/metrics"), STORE_EXPECTED, STORE_FAMILIES)
    finally:
        server.shutdown()
        server.server_close()


# ---- Redis and RabbitMQ: a real worker and `epq metrics` ----------------------------------------


def broker_env(name: str) -> dict[str, str]:
    if name == "redis":
        return {"EPQ_BROKER_URL": REDIS_URL}
    return {"EPQ_BROKER_URL": RABBITMQ_URL, "EPQ_STATE_URL": STATE_URL}


def serve_store_metrics(env: dict[str, str], tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``epq metrics`` on a free port; its process and URL once it answers."""
    port = free_port()
    with open(tmp_path / "epq-metrics.log", "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "epq"), "metrics", "--port", str(port), "--host", "127.0.0.1"],
            env={**_clean_env(), **env},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/metrics"
    assert wait_for(lambda: up(url), timeout=20), (tmp_path / "epq-metrics.log").read_text()
    return proc, url


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EPQ_") or k.startswith("EPQ_TEST_")}


@pytest.mark.slow
@pytest.mark.timeout(120)  # (worker processes booting on a busy machine)
@pytest.mark.parametrize(
    "name",
    [pytest.param("redis", marks=pytest.mark.redis), pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)],
)
def test_the_known_run_on_a_real_worker_and_epq_metrics(
    name: str,
    start_worker: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    broker = request.getfixturevalue(f"{name}_broker")
    # Given a worker of two processes serving /metrics
    port = free_port()
    env = {**broker_env(name), "EPQ_HANDLERS": METRICS_HANDLERS, "EPQ_METRICS_PORT": str(port),
           "EPQ_METRICS_HOST": "127.0.0.1"}  # fmt: skip
    argv = [str(BIN / "dramatiq"), "epq.actors", METRICS_HANDLERS, "-p", "2", "-t", "2"]
    worker = start_worker(argv, env)
    url = f"http://127.0.0.1:{port}/metrics"
    assert wait_for(lambda: up(url), timeout=30), worker.log.read_text()
    # When the known run is enqueued and the worker has finished it
    known_run(broker)
    expected = {**WORKER_EXPECTED, **STORE_EXPECTED}
    assert wait_for(lambda: matches(scrape(url), expected), timeout=30), worker.log.read_text()
    # Then every metric the worker serves is exact (its processes' counts added up, and the
    # duplicates this process refused, which it counted into the state store)
    assert_exact(scrape(url), expected, WORKER_FAMILIES + STORE_FAMILIES)
    # And `epq metrics` serves the same store-side metrics
    proc, store_url = serve_store_metrics(broker_env(name), tmp_path)
    try:
        assert_exact(scrape(store_url), STORE_EXPECTED, STORE_FAMILIES)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(120)  # (two worker boots and, on Redis, the dead worker's heartbeat timeout)
@pytest.mark.parametrize(
    "name",
    [pytest.param("redis", marks=pytest.mark.redis), pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)],
)
def test_a_job_started_again_after_a_worker_was_killed_is_a_duplicate_start(
    name: str, start_worker: Any, request: pytest.FixtureRequest
) -> None:
    broker = request.getfixturevalue(f"{name}_broker")
    argv = [str(BIN / "dramatiq"), "epq.actors", HOLD_HANDLERS, "-p", "1", "-t", "1"]
    env = {**broker_env(name), "EPQ_HANDLERS": HOLD_HANDLERS, "EPQ_METRICS_HOST": "127.0.0.1"}
    # Given a worker that started a job and hangs in it, and another worker, idle, serving metrics
    doomed = start_worker(argv, {**env, "EPQ_TEST_HOLD": "1"})
    job = epq.QueueService(broker).enqueue_register_job(request_of(1)).job
    assert wait_for(lambda: doomed.results.llen(f"{doomed.key}:started") == 1, timeout=30), (
        doomed.log.read_text()
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    survivor = start_worker(argv, {**env, "EPQ_METRICS_PORT": str(port)}, key=doomed.key)
    assert wait_for(lambda: up(url), timeout=30), survivor.log.read_text()
    # When the first is killed, and the other gets the job again
    doomed.kill9()
    survivor.collect(1, timeout=45)
    # Then that worker counts a duplicate start, and the job completed once
    expected = {
        ("epq_duplicate_starts_total", (("kind", KIND),)): 1,
        ("epq_jobs_processed_total", (("kind", KIND), ("outcome", "completed"))): 1,
        ("epq_jobs_started_total", (("kind", KIND),)): 1,
    }
    assert wait_for(lambda: matches(scrape(url), expected), timeout=10), scrape(url)
    assert epq.QueueService(broker).get_job(job.id).state.value == "completed"  # type: ignore[union-attr]


def request_of(n: int) -> dict[str, Any]:
    return request(n)


def test_metrics_off_load_no_prometheus_client() -> None:
    code = "import epq.actors, sys; assert 'prometheus_client' not in sys.modules"
    env = {**_clean_env(), "EPQ_BROKER_URL": "stub://"}
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True)


# ---- the lag, on every broker's enqueue paths ---------------------------------------------------


def test_the_oldest_waiting_job_is_the_first_enqueued_until_it_starts(broker: dramatiq.Broker) -> None:
    # Given jobs enqueued one by one and in bulk, and no worker
    svc = epq.QueueService(broker)
    first = svc.enqueue_register_job(request(1)).job
    svc.enqueue_many([("register_job", request(n)) for n in range(2, 5)])
    svc.enqueue_register_job({**request(5), "priority": 1})
    stores = backend(broker)
    # Then the oldest waiting job of each queue and priority is known, since it was due
    recorded = svc.get_job(first.id)
    assert recorded is not None
    first_ms = round(recorded.scheduled_at.timestamp() * 1000)
    assert stores.records.oldest_waiting()[("default", 2)] == first_ms
    assert set(stores.records.oldest_waiting()) == {("default", 2), ("default", 1)}
    samples = scrape_registry(metrics.store_registry(stores.state, stores.records))
    lag = samples[("epq_oldest_waiting_seconds", (("priority", "2"), ("queue", "default")))]
    assert 0 <= lag < 60
    assert samples[("epq_jobs", (("priority", "2"), ("queue", "default"), ("state", "available")))] == 4


def scrape_registry(registry: CollectorRegistry) -> Samples:
    port = free_port()
    server = metrics.serve(registry, port, "127.0.0.1")
    try:
        return scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
        server.server_close()


# ---- the commands -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.redis
def test_epq_worker_serves_metrics_on_the_port_it_is_given(
    redis_broker: dramatiq.Broker, start_worker: Any
) -> None:
    port = free_port()
    argv = [str(BIN / "epq"), "worker", "--metrics-port", str(port), "-p", "1", "-t", "1"]
    env = {**broker_env("redis"), "EPQ_HANDLERS": METRICS_HANDLERS, "EPQ_METRICS_HOST": "127.0.0.1"}
    worker = start_worker(argv, env)
    url = f"http://127.0.0.1:{port}/metrics"
    assert wait_for(lambda: up(url), timeout=30), worker.log.read_text()
    epq.QueueService(redis_broker).enqueue_register_job(request(1))
    completed = ("epq_jobs_processed_total", (("kind", KIND), ("outcome", "completed")))
    assert wait_for(lambda: scrape(url).get(completed) == 1, timeout=20), worker.log.read_text()
    assert scrape(url)[("epq_jobs", (("priority", "2"), ("queue", "default"), ("state", "completed")))] == 1


def test_epq_metrics_once_prints_the_store_metrics(
    epq_broker: dramatiq.Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    epq.QueueService(epq_broker).enqueue_register_job(request(1))
    assert main(["metrics", "--once"]) == 0
    out = capsys.readouterr().out
    assert 'epq_jobs{priority="2",queue="default",state="available"} 1.0' in out
    assert "epq_scheduled_jobs 0.0" in out
    assert 'epq_unique_locks{kind="register_job"} 1.0' in out


def test_a_snoozed_attempt_is_counted_as_snoozed(
    producer_metrics: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setenv("EPQ_METRICS", "1")
    reset_settings()
    broker = request.getfixturevalue("epq_broker")
    runs: list[int] = []

    def snoozes_once(req: Any) -> None:
        runs.append(1)
        if len(runs) == 1:
            raise epq.Snooze(0.05)

    request.getfixturevalue("epq_handlers").register(KIND, snoozes_once)
    worker = request.getfixturevalue("epq_worker")
    epq.QueueService(broker).enqueue_register_job(request_of(1))
    assert wait_for(lambda: len(runs) == 2, timeout=10)
    drain(broker, worker)
    metrics.flush()
    samples = scrape_registry(producer_metrics)
    assert samples[("epq_jobs_processed_total", (("kind", KIND), ("outcome", "snoozed")))] == 1
    assert samples[("epq_jobs_processed_total", (("kind", KIND), ("outcome", "completed")))] == 1
    assert samples.get(("epq_jobs_processed_total", (("kind", KIND), ("outcome", "retried"))), 0) == 0
