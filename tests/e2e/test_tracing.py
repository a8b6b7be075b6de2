"""OpenTelemetry traces: the consumer span of each attempt of a job has the trace id of the
enqueue's producer span and that span as its parent: in process on the stub broker, and across
processes on Redis and RabbitMQ, after a retry and for a delayed run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import epq
from epq.settings import reset_settings
from epq.testing import drain
from tests.e2e.test_metrics import broker_env
from tests.support.helpers import ENDPOINT, wait_for
from tests.support.metrics_jobs import run_job, span_json
from tests.support.workers import BIN, ROOT

TRACING_HANDLERS = "tests.support.tracing_handlers"
EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _provider() -> None:
    """This process's spans go to ``EXPORTER`` (a process sets its provider once)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


def enqueue(broker: dramatiq.Broker) -> tuple[str, str]:
    """A job that fails once (retried 50 ms later), and one delayed 300 ms; their ids."""
    svc = epq.QueueService(broker)
    retried = svc.enqueue_register_job(
        {"endpoint_id": ENDPOINT, "job_id": "retried", "job_metadata": {"fail": "once"}}
    )
    later = datetime.now(timezone.utc) + timedelta(milliseconds=300)
    delayed = svc.enqueue_register_job(
        {"endpoint_id": ENDPOINT, "job_id": "delayed", "job_metadata": {}, "run_at": later}
    )
    return retried.job.id, delayed.job.id


def check(
    producers: list[dict[str, Any]], consumers: list[dict[str, Any]], retried: str, delayed: str
) -> None:
    """Each attempt's consumer span continues its job's producer span."""
    by_job = {p["attributes"]["messaging.message.id"]: p for p in producers}
    assert set(by_job) == {retried, delayed}
    attempts: dict[str, list[int]] = {retried: [], delayed: []}
    for span in consumers:
        job = span["attributes"]["messaging.message.id"]
        producer = by_job[job]
        assert span["name"] == "process default"
        assert span["trace_id"] == producer["trace_id"]
        assert span["parent_id"] == producer["span_id"]
        attempts[job].append(span["attributes"]["epq.job.attempt"])
    assert sorted(attempts[retried]) == [1, 2]
    assert attempts[delayed] == [1]
    for producer in producers:
        assert producer["name"] == "send default"
        assert producer["kind"] == "PRODUCER"
        assert producer["attributes"]["messaging.system"] == "dramatiq"
        assert producer["attributes"]["messaging.destination.name"] == "default"


@pytest.fixture
def tracing_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """EPQ_TRACING=1 (the suite runs with 0), for the brokers set up after it."""
    monkeypatch.setenv("EPQ_TRACING", "1")
    reset_settings()


def test_the_consumer_spans_continue_the_enqueue_span_on_the_stub_broker(
    exporter: InMemorySpanExporter, tracing_on: None, request: pytest.FixtureRequest
) -> None:
    epq_broker = request.getfixturevalue("epq_broker")
    epq_worker = request.getfixturevalue("epq_worker")
    request.getfixturevalue("epq_handlers").register("register_job", run_job)
    retried, delayed = enqueue(epq_broker)
    assert wait_for(lambda: len(exporter.get_finished_spans()) >= 5, timeout=10)
    drain(epq_broker, epq_worker, fail_fast=False)
    spans = [span_json(s) for s in exporter.get_finished_spans()]
    check(
        [s for s in spans if s["kind"] == "PRODUCER"],
        [s for s in spans if s["kind"] == "CONSUMER"],
        retried,
        delayed,
    )


@pytest.mark.slow
@pytest.mark.timeout(120)  # (worker processes booting on a busy machine)
@pytest.mark.parametrize(
    "name",
    [pytest.param("redis", marks=pytest.mark.redis), pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)],
)
def test_the_consumer_spans_continue_the_enqueue_span_across_processes(
    name: str,
    exporter: InMemorySpanExporter,
    tracing_on: None,
    start_worker: Any,
    request: pytest.FixtureRequest,
) -> None:
    broker = request.getfixturevalue(f"{name}_broker")
    argv = [str(BIN / "dramatiq"), "epq.actors", TRACING_HANDLERS, "-p", "1", "-t", "2"]
    env = {**broker_env(name), "EPQ_HANDLERS": TRACING_HANDLERS, "EPQ_TRACING": "1"}
    worker = start_worker(argv, env)
    retried, delayed = enqueue(broker)
    key = f"{worker.key}:spans"
    assert wait_for(lambda: worker.results.llen(key) >= 3, timeout=30), worker.log.read_text()
    consumers = [json.loads(raw) for raw in worker.results.lrange(key, 0, -1)]
    producers = [span_json(s) for s in exporter.get_finished_spans()]
    check(producers, consumers, retried, delayed)


def test_without_opentelemetry_nothing_of_it_is_imported_and_messages_carry_no_context() -> None:
    code = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
import epq, epq.actors
job = epq.actors.register_job.send(
    endpoint_id="6f1d1c1e-4a5b-4c3d-9e8f-0a1b2c3d4e5f", job_id="j", job_metadata={}
)
assert "epq_trace" not in job.options, job.options
assert not [m for m in sys.modules if m.startswith("opentelemetry")]
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPQ_")}
    subprocess.run(
        [sys.executable, "-c", code], env={**env, "EPQ_BROKER_URL": "stub://"}, cwd=ROOT, check=True
    )
