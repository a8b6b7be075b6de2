"""The contract every broker honours: written once, run on stub, Redis and RabbitMQ."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import pytest
from dramatiq.middleware import CurrentMessage

import epq
import epq.actors
from epq.testing import HandlerRegistry, drain
from tests.support.helpers import ENDPOINT, FACADE, VALID, actor, message_count, total_waiting, wait_for


class Recorder:
    """A handler that remembers each request and the message it came in."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.messages: list[dramatiq.Message[Any]] = []
        self.lock = threading.Lock()

    def __call__(self, request: Any) -> None:
        with self.lock:
            self.requests.append(request)
            self.messages.append(CurrentMessage.get_current_message())


@pytest.mark.parametrize("kind", list(VALID))
def test_send_runs_the_kinds_handler_with_the_validated_request(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry, kind: str
) -> None:
    # Given a handler for the kind
    recorder = Recorder()
    epq_handlers.register(kind, recorder)
    # When the job is sent with plain JSON-able fields
    message = actor(kind).send(**VALID[kind])
    drain(broker, worker)
    # Then the handler got the request model, equal to one built from the same fields
    assert recorder.requests == [actor(kind).kind.model.model_validate(VALID[kind])]
    assert recorder.messages[0].message_id == message.message_id
    assert total_waiting(broker) == 0


@pytest.mark.parametrize("kind", list(VALID))
def test_facade_returns_a_job_insert_result_and_the_job_runs(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry, kind: str
) -> None:
    received = epq_handlers.record(kind)
    model = actor(kind).kind.model
    before = datetime.now(timezone.utc) - timedelta(seconds=1)

    result = getattr(epq.QueueService(broker), FACADE[kind])(model.model_validate(VALID[kind]))
    drain(broker, worker)

    assert isinstance(result, epq.JobInsertResult)
    assert result.unique_skipped_as_duplicate is False
    job = result.job
    assert (job.kind, job.queue, job.priority, job.state) == (kind, "default", 2, epq.JobState.AVAILABLE)
    assert job.max_attempts == (7 if kind == "index_endpoint" else 3)
    assert job.attempt == 0
    # the args give back the request (enqueue options left unset are not part of them)
    assert model.model_validate(job.args) == model.model_validate(VALID[kind])
    assert not {"queue_name", "run_at", "priority"} & job.args.keys()
    assert before <= job.created_at == job.scheduled_at <= datetime.now(timezone.utc)
    assert len(received) == 1


def test_facade_accepts_a_mapping_and_refuses_the_wrong_model(broker: dramatiq.Broker) -> None:
    svc = epq.QueueService(broker)
    assert svc.enqueue_register_job(VALID["register_job"]).job.kind == "register_job"
    with pytest.raises(TypeError, match="RegisterJobRequest"):
        svc.enqueue_register_job(epq.EnqueueIndexEndpointRequest(**VALID["index_endpoint"]))


@pytest.mark.parametrize("queue", ["execution", "events", "maintenance"])
def test_queue_override_lands_on_a_served_queue_and_runs(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry, queue: str
) -> None:
    recorder = Recorder()
    epq_handlers.register("register_source", recorder)

    result = epq.QueueService(broker).enqueue_register_source(
        {**VALID["register_source"], "queue_name": queue}
    )

    assert result.job.queue == queue
    assert message_count(broker, queue) == 1
    assert message_count(broker, "default") == 0
    # and a worker started with the default settings serves that queue
    worker = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        drain(broker, worker)
    finally:
        worker.stop()
    assert [m.queue_name for m in recorder.messages] == [queue]


def test_per_request_priority_is_carried_by_the_job(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    recorder = Recorder()
    epq_handlers.register("index_endpoint", recorder)

    high = epq.QueueService(broker).enqueue_index_endpoint({**VALID["index_endpoint"], "priority": 1})
    default = epq.QueueService(broker).enqueue_index_endpoint({**VALID["index_endpoint"], "source": "HOOK"})
    drain(broker, worker)

    assert (high.job.priority, default.job.priority) == (epq.JobPriority.HIGH, epq.JobPriority.NORMAL)
    by_id = {m.message_id: m.options["epq_priority"] for m in recorder.messages}
    assert by_id == {high.job.id: 1, default.job.id: 2}


def test_send_with_options_takes_a_message_id_and_a_priority_that_the_record_agrees_with(
    broker: dramatiq.Broker,
) -> None:
    # Dramatiq's own options on send_with_options: the job's id, and epq's priority option
    message = epq.actors.register_job.send_with_options(
        kwargs=VALID["register_job"], message_id="chosen-id", epq_priority=1
    )
    assert message.message_id == "chosen-id"
    record = epq.QueueService(broker).get_job("chosen-id")
    assert record is not None
    assert record.priority is epq.JobPriority.HIGH  # as the lane it waits in


# ---- bad input: a clear error naming the field, and nothing enqueued ------------------------

NAIVE = datetime(2030, 1, 1, 12, 0)
BAD_INPUTS = [
    ("index_endpoint", {"endpoint_id": "not-a-uuid"}, "endpoint_id"),
    ("index_endpoint", {"source": "CRON"}, "source"),
    ("index_endpoint", {"priority": 5}, "priority"),
    ("index_endpoint", {"priority": 0}, "priority"),
    ("index_endpoint", {"priority": True}, "priority"),
    ("index_endpoint", {"run_at": NAIVE}, "run_at"),
    ("index_endpoint", {"queue_name": "nowhere"}, "queue_name"),
    ("index_endpoint", {"source_data": {"blob": "x" * (1024 * 1024)}}, "source_data"),
    ("index_endpoint", {"source_data": {"when": datetime.now(timezone.utc)}}, "source_data.when"),
    ("index_endpoint", {"source_data": {"s": {1, 2}}}, "source_data.s"),
    ("index_endpoint", {"source_data": {"nan": float("nan")}}, "source_data"),
    ("index_endpoint", {"endpont_id": ENDPOINT}, "endpont_id"),
    ("register_job", {"job_metadata": "not an object"}, "job_metadata"),
    ("register_job", {"job_id": ""}, "job_id"),
    ("register_dynamic_schedule", {"schedule_metadata": {"b": b"bytes"}}, "schedule_metadata.b"),
]


@pytest.mark.parametrize(("kind", "change", "field"), BAD_INPUTS, ids=[f"{k}-{f}" for k, _, f in BAD_INPUTS])
def test_bad_input_names_the_field_and_enqueues_nothing(
    broker: dramatiq.Broker, kind: str, change: dict[str, Any], field: str
) -> None:
    fields = {**VALID[kind], **change}

    with pytest.raises(epq.InvalidRequest) as via_send:
        actor(kind).send(**fields)
    with pytest.raises(epq.InvalidRequest) as via_facade:
        epq.QueueService(broker).enqueue(kind, fields)

    for exc in (via_send.value, via_facade.value):
        assert exc.field == field
        assert field in str(exc)
        assert exc.kind == kind
    assert total_waiting(broker) == 0


def test_missing_required_fields_are_all_named(broker: dramatiq.Broker) -> None:
    with pytest.raises(epq.InvalidRequest) as caught:
        epq.actors.register_job.send(endpoint_id=ENDPOINT)
    assert set(caught.value.fields) == {"job_id", "job_metadata"}
    assert total_waiting(broker) == 0


def test_positional_arguments_are_refused(broker: dramatiq.Broker) -> None:
    with pytest.raises(TypeError, match="keyword arguments"):
        epq.actors.index_endpoint.send(ENDPOINT, "API")
    assert total_waiting(broker) == 0


# ---- the worker side: validation, missing handlers, retries ------------------------------


def _raw_send(broker: dramatiq.Broker, kind: str, kwargs: dict[str, Any], **options: Any) -> None:
    """Put a message on the wire without the call-site checks (a foreign or older producer)."""
    broker.enqueue(
        dramatiq.Message(queue_name="default", actor_name=kind, args=(), kwargs=kwargs, options=options)
    )


def test_a_payload_that_fails_validation_in_the_worker_is_dead_lettered_at_once(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    received = epq_handlers.record("register_job")
    _raw_send(broker, "register_job", {"endpoint_id": "nope", "job_id": "j"}, backoff_ms=[1])

    assert wait_for(lambda: message_count(broker, "default.XQ") == 1)
    time.sleep(0.2)  # a retry, if there were one, would be back by now (backoff 1 ms)
    assert received == []
    assert message_count(broker, "default.XQ") == 1
    assert message_count(broker, "default") + message_count(broker, "default.DQ") == 0


def test_a_kind_without_handler_is_dead_lettered_at_once(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    epq.actors.register_source.send_with_options(kwargs=VALID["register_source"], backoff_ms=[1])

    assert wait_for(lambda: message_count(broker, "default.XQ") == 1)
    time.sleep(0.2)
    assert message_count(broker, "default.XQ") == 1
    assert message_count(broker, "default") + message_count(broker, "default.DQ") == 0


def test_a_failing_job_is_retried_then_succeeds(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    calls: list[int] = []

    def flaky(request: epq.RegisterJobRequest) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first attempt fails")

    epq_handlers.register("register_job", flaky)
    epq.actors.register_job.send_with_options(kwargs=VALID["register_job"], backoff_ms=[10])

    assert wait_for(lambda: len(calls) == 2)
    drain(broker, worker)
    assert len(calls) == 2
    assert message_count(broker, "default.XQ") == 0


@pytest.mark.parametrize(("kind", "attempts"), [("register_job", 3), ("index_endpoint", 7)])
def test_attempts_count_the_river_way_then_dead_letter(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry, kind: str, attempts: int
) -> None:
    # "attempts N" is the first run plus N - 1 retries
    calls: list[int] = []

    def always_fails(request: Any) -> None:
        calls.append(1)
        raise RuntimeError("boom")

    epq_handlers.register(kind, always_fails)
    actor(kind).send_with_options(kwargs=VALID[kind], backoff_ms=[5])

    assert wait_for(lambda: message_count(broker, "default.XQ") == 1, timeout=20)
    time.sleep(0.1)
    assert len(calls) == attempts


def test_a_past_run_at_runs_now_and_a_future_one_is_scheduled(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    received = epq_handlers.record("register_dynamic_trigger")
    now = datetime.now(timezone.utc)
    svc = epq.QueueService(broker)

    past = svc.enqueue_register_dynamic_trigger(
        {**VALID["register_dynamic_trigger"], "run_at": now - timedelta(hours=1)}
    )
    future = svc.enqueue_register_dynamic_trigger(
        {**VALID["register_dynamic_trigger"], "trigger_id": "later", "run_at": now + timedelta(seconds=1)}
    )

    assert past.job.state is epq.JobState.AVAILABLE
    assert future.job.state is epq.JobState.SCHEDULED
    assert future.job.scheduled_at == now + timedelta(seconds=1)
    assert wait_for(lambda: len(received) == 1, timeout=5)
    assert received[0].trigger_id == "t-1"
    assert wait_for(lambda: len(received) == 2, timeout=10)
    assert datetime.now(timezone.utc) >= now + timedelta(seconds=1)


def _register_job(n: int) -> dict[str, Any]:
    return {**VALID["register_job"], "job_id": f"job-{n}", "job_metadata": {"n": n, "big": 2**60 + 1}}


def test_a_jobs_args_are_read_back_while_it_waits_and_once_cancelled(broker: dramatiq.Broker) -> None:
    svc = epq.QueueService(broker)
    waiting = svc.enqueue_register_job(_register_job(1)).job.id
    cancelled = svc.enqueue_register_job(_register_job(2)).job.id

    svc.cancel_job(cancelled)

    assert svc.get_job(waiting).args == _register_job(1)  # type: ignore[union-attr]
    assert svc.get_job(cancelled).args == _register_job(2)  # type: ignore[union-attr]


def test_a_jobs_args_are_read_back_while_it_runs_once_completed_and_once_dead(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    svc = epq.QueueService(broker)
    seen_running: dict[str, Any] = {}

    def handler(request: epq.RegisterJobRequest) -> None:
        job_id = CurrentMessage.get_current_message().message_id
        seen_running[request.job_id] = svc.get_job(job_id).args  # type: ignore[union-attr]
        if request.job_id == "job-2":
            raise RuntimeError("never works")

    epq_handlers.register("register_job", handler)
    done = epq.actors.register_job.send(**_register_job(1)).message_id
    dead = epq.actors.register_job.send_with_options(kwargs=_register_job(2), backoff_ms=[5]).message_id

    assert wait_for(lambda: svc.get_job(dead).state is epq.JobState.DISCARDED, timeout=20)  # type: ignore[union-attr]
    assert wait_for(lambda: svc.get_job(done).state is epq.JobState.COMPLETED)  # type: ignore[union-attr]
    assert seen_running == {"job-1": _register_job(1), "job-2": _register_job(2)}
    assert svc.get_job(done).args == _register_job(1)  # type: ignore[union-attr]
    assert svc.get_job(dead).args == _register_job(2)  # type: ignore[union-attr]
