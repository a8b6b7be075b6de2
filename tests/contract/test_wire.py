"""Malformed messages on the wire: refused with a reason, dead-lettered and shown, on every broker,
while the consumer stays up and the good jobs behind them run."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker
from dramatiq.errors import ActorNotFound

import epq
import epq.actors
from epq import wire
from epq.testing import HandlerRegistry, drain
from tests.support.helpers import VALID, message_count, push_raw, wait_for


def good(**changes: Any) -> dict[str, Any]:
    """The fields of a well-formed register_job message."""
    fields: dict[str, Any] = {
        "queue_name": "default",
        "actor_name": "register_job",
        "args": [],
        "kwargs": dict(VALID["register_job"]),
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": 1_700_000_000_000,
    }
    fields.update(changes)
    return fields


def encoded(fields: Any) -> bytes:
    return json.dumps(fields).encode()


MALFORMED: dict[str, tuple[bytes, str]] = {
    "not JSON": (b"{this is not json", "not JSON"),
    "invalid UTF-8": (b'{"queue_name": "\xff\xfe"}', "not UTF-8"),
    "not an object": (encoded([1, 2, 3]), "not a JSON object but array"),
    "a field missing": (encoded({k: v for k, v in good().items() if k != "kwargs"}), "no kwargs"),
    "no message id": (encoded({k: v for k, v in good().items() if k != "message_id"}), "no message_id"),
    "a field of the wrong type": (encoded(good(args={"a": 1})), "args must be an array, not object"),
    "options not an object": (encoded(good(options=[1])), "options must be an object, not array"),
    "bad retries": (encoded(good(options={"retries": "three"})), "options.retries must be an integer"),
    "bad backoff": (encoded(good(options={"backoff_ms": "soon"})), "options.backoff_ms must be"),
    "an unexpected field": (encoded({**good(), "extra": 1}), "unexpected field 'extra'"),
    "unknown actor": (encoded(good(actor_name="no_such_actor")), "unknown actor 'no_such_actor'"),
    "over 1 MiB": (
        encoded(good(kwargs={**VALID["register_job"], "job_metadata": {"x": "a" * (1100 * 1024)}})),
        "payload is .* bytes, over the 1048576-byte limit",
    ),
    "over what a worker reads": (b" " * (7 * 1024 * 1024), "over the .*-byte limit"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_decode_refuses_with_the_reason(case: str) -> None:
    data, reason = MALFORMED[case]
    with pytest.raises(wire.MalformedMessage, match=reason):
        wire.decode(data, actors={"register_job"})


def test_decode_takes_a_payload_the_call_site_takes_however_dramatiq_escapes_it() -> None:
    # 1 MiB minus a little of two-byte UTF-8 text: Dramatiq's encoder writes it as \u escapes,
    # three times as long on the wire
    kwargs = {**VALID["register_job"], "job_metadata": {"x": "é" * 500_000}}
    message = dramatiq.Message(
        queue_name="default", actor_name="register_job", args=(), kwargs=kwargs, options={}
    )
    assert len(message.encode()) > 2 * wire.MAX_MESSAGE_BYTES
    assert wire.decode(message.encode(), actors={"register_job"}) == message


def test_decode_takes_options_as_dramatiq_sets_them() -> None:
    options = {"eta": None, "time_limit": 1.5, "retries": 2, "traceback": "x", "redis_message_id": "r"}
    message = dramatiq.Message(queue_name="default", actor_name="a", args=(), kwargs={}, options=options)
    assert wire.decode(message.encode(), actors={"a"}).options == options


def test_decode_takes_what_dramatiq_sends() -> None:
    message = dramatiq.Message(
        queue_name="default", actor_name="register_job", args=(), kwargs={"a": 1}, options={"retries": 2}
    )
    assert wire.decode(message.encode(), actors={"register_job"}) == message


def test_a_refused_message_keeps_its_id_and_actor_for_its_record() -> None:
    fields = good(options={"retries": "x"})
    with pytest.raises(wire.MalformedMessage) as caught:
        wire.decode(encoded(fields), actors={"register_job"})
    assert (caught.value.message_id, caught.value.actor_name) == (fields["message_id"], "register_job")
    assert caught.value.preview.startswith("{")


def _dead_lettered(broker: dramatiq.Broker) -> int:
    return message_count(broker, "default.XQ")


def test_malformed_messages_are_dead_lettered_with_their_reasons_and_the_jobs_behind_them_run(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given one malformed message of each kind at the head of the queue, and 20 good jobs behind
    received = epq_handlers.record("register_job")
    worker.pause()
    for data, _ in MALFORMED.values():
        push_raw(broker, "default", data)
    svc = epq.QueueService(broker)
    for n in range(20):
        svc.enqueue_register_job({**VALID["register_job"], "job_id": f"behind-{n}"})
    # When the worker runs
    worker.resume()
    drain(broker, worker)
    # Then every good job ran, and each malformed message is dead, with its reason, where
    # operators look
    assert len(received) == 20
    dead = svc.list_dead()
    reasons = sorted(record.errors[-1].message for record in dead)
    assert len(reasons) == len(MALFORMED)
    for case, (_, reason) in MALFORMED.items():
        assert any(re.search(reason, text) for text in reasons), case
    assert {record.errors[-1].error_type for record in dead} == {"MalformedMessage"}
    assert [row["dead"] for row in svc.stats() if row["queue"] == "default"] == [len(MALFORMED)]
    assert wait_for(lambda: _dead_lettered(broker) == len(MALFORMED))
    # and none can be run again by mistake
    with pytest.raises(epq.InvalidPayload, match="malformed"):
        svc.retry_dead(dead[0].id)


@pytest.mark.redis
def test_a_redis_message_without_its_id_in_the_options_runs_once_and_is_acked(
    redis_broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    assert isinstance(redis_broker, RedisBroker)
    received = epq_handlers.record("register_job")
    rid = str(uuid.uuid4())
    push_raw(redis_broker, "default", encoded(good()), rid=rid)  # no redis_message_id option
    worker = dramatiq.Worker(redis_broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        drain(redis_broker, worker)
    finally:
        worker.stop()
    assert len(received) == 1
    client = redis_broker.client
    assert not client.hexists("dramatiq:default.msgs", rid)  # acked: it will not run again
    assert client.scard(f"dramatiq:__acks__.{redis_broker.broker_id}.default") == 0


def test_dead_letters_without_a_record_are_counted_where_operators_look(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given a plain Dramatiq actor (no job records) whose message is dead-lettered
    @dramatiq.actor(broker=broker, queue_name="default", max_retries=0)
    def plain_fails() -> None:
        raise RuntimeError("plain actor failed")

    plain_fails.send()
    drain(broker, worker, fail_fast=False)
    svc = epq.QueueService(broker)
    # Then no record lists it, but the dead-letter counts do
    assert svc.list_dead() == []
    assert wait_for(lambda: svc.dead_letter_counts().get("default") == 1)
    # and purge empties the dead-letter queue too
    svc.purge_dead()
    assert svc.dead_letter_counts().get("default") == 0


def test_an_epq_job_whose_message_is_corrupted_dies_with_its_record_and_frees_its_key(
    epq_broker: dramatiq.Broker, epq_worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given an enqueued job whose message gets corrupted on its way (a bad retries option)
    received = epq_handlers.record("register_job")
    epq_worker.pause()
    svc = epq.QueueService(epq_broker)
    job_id = svc.enqueue_register_job(VALID["register_job"]).job.id
    data = epq_broker.queues["default"].get_nowait()  # type: ignore[attr-defined]
    epq_broker.queues["default"].task_done()  # type: ignore[attr-defined]
    fields = json.loads(data)
    fields["options"]["retries"] = "three"
    push_raw(epq_broker, "default", encoded(fields))
    # When the worker takes it
    epq_worker.resume()
    drain(epq_broker, epq_worker)
    # Then the job's own record says why it died, it never ran, and its unique key is free
    record = svc.get_job(job_id)
    assert record is not None
    assert record.state is epq.JobState.DISCARDED
    assert "options.retries must be an integer" in record.errors[-1].message
    assert received == []
    assert not svc.enqueue_register_job(VALID["register_job"]).unique_skipped_as_duplicate


def test_on_the_stub_a_message_of_an_unknown_actor_is_a_dead_letter_that_join_raises(
    epq_broker: dramatiq.Broker, epq_worker: dramatiq.Worker
) -> None:
    # Given a well-formed message of an actor the broker does not have, on a queue the worker serves
    message = dramatiq.Message(queue_name="default", actor_name="gone", args=(), kwargs={}, options={})
    epq_broker.enqueue(message)
    # Then the stub's join fails fast with Dramatiq's error, as for a plain StubBroker
    with pytest.raises(ActorNotFound, match=r"^gone$"):
        epq_broker.join("default", fail_fast=True)
    # and the message is among the stub's dead letters
    assert epq_broker.dead_letters == [message]  # type: ignore[attr-defined]


def test_a_message_whose_eta_is_not_a_number_runs_as_dramatiqs_worker_runs_it(
    epq_broker: dramatiq.Broker, epq_worker: dramatiq.Worker
) -> None:
    # Given a message sent by another program with an eta Dramatiq cannot read
    ran: list[bool] = []

    @dramatiq.actor(broker=epq_broker, queue_name="default")
    def record() -> None:
        ran.append(True)

    push_raw(epq_broker, "default", record.message_with_options(eta="not-a-number").encode())
    # Then it is not refused: Dramatiq's worker runs it at once (and warns)
    epq_broker.join("default", fail_fast=True)
    epq_worker.join()
    assert ran == [True]
