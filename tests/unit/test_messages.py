"""epq's message ids and its fast message encoding (``epq.testing.messages``)."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import dramatiq
import pydantic_core
import pytest
from dramatiq.encoder import PickleEncoder

from epq.testing import messages


def test_ids_are_distinct_version_4_uuids() -> None:
    ids = messages.new_ids(1000) + [messages.new_id() for _ in range(1000)]
    assert len(set(ids)) == 2000
    for text in ids:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_makes_its_parents_next_ids() -> None:
    messages.new_id()  # the parent now holds ids made ahead
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, json.dumps([messages.new_id() for _ in range(50)]).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(json.loads(pipe.read()))
    os.waitpid(pid, 0)
    parent = {messages.new_id() for _ in range(50)}
    assert len(child) == 50
    assert not child & parent


PAYLOADS: list[dict[str, Any]] = [
    {},
    {"endpoint_id": str(uuid.uuid4()), "source": "API", "reason": "", "source_data": {}},
    {"text": 'quotes " and \\ and \n and é and 中文 and \U0001f600', "none": None, "flag": True},
    {"nested": {"list": [1, 2.5, -3, 10**30, {"deep": [None, False]}]}, "big": -(2**70)},
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_fast_encoding_decodes_to_what_dramatiq_encodes(payload: dict[str, Any]) -> None:
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="endpoint-index",
        actor_name="index_endpoint",
        args=(),
        kwargs=payload,
        options={"epq_priority": 2, "epq_unique_key": "epq:unique:x:ab", "redis_message_id": "r"},
    )
    payload_json = pydantic_core.to_json(payload).decode()  # as the actor's payload check makes it
    fast = messages.encode(message, payload_json)
    assert json.loads(fast) == json.loads(message.encode())
    assert dramatiq.Message.decode(fast) == message


@pytest.mark.parametrize("payload", PAYLOADS)
def test_without_the_payload_json_the_fast_encoding_is_dramatiqs_to_the_byte(payload: dict[str, Any]) -> None:
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="q", actor_name="a", args=(1, "x"), kwargs=payload, options={"o": [1, None]}
    )
    assert messages.encode(message) == message.encode()
    assert messages.encode(message, "{}") == message.encode()  # positional args: the payload JSON unused


def test_the_fast_encoding_stands_aside_for_another_encoder() -> None:
    plain: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="q", actor_name="a", args=(), kwargs={}, options={}
    )
    old = dramatiq.get_encoder()
    dramatiq.set_encoder(PickleEncoder())
    try:
        assert messages.encode(plain, "{}") == plain.encode()  # not Dramatiq's JSON encoder
    finally:
        dramatiq.set_encoder(old)


FLAT: list[dict[Any, Any]] = [
    {},
    {"b": "x", "a": 1, "c": None},
    {"text": 'quotes " \\ \n \t \x00 é 中文 \U0001f600 \ud800', "z": -(10**30), "é": "ü"},
    {"epq_priority": 2, "epq_unique_key": "epq:unique:k:ab", "redis_message_id": "r"},
]
NOT_FLAT: list[dict[Any, Any]] = [{"a": True}, {"a": 1.5}, {"a": [1]}, {"a": {}}, {1: "x"}]


@pytest.mark.parametrize("ascii", [True, False])
@pytest.mark.parametrize("sort", [True, False])
def test_flat_json_is_json_dumps_to_the_byte(ascii: bool, sort: bool) -> None:
    # unique keys are digests of such JSON: a byte of difference would change every key
    for mapping in FLAT:
        expected = json.dumps(mapping, separators=(",", ":"), ensure_ascii=ascii, sort_keys=sort)
        assert messages.flat_json(mapping, ascii=ascii, sort=sort) == expected
    for mapping in NOT_FLAT:
        assert messages.flat_json(mapping, ascii=ascii, sort=sort) is None


@pytest.mark.parametrize(
    "payload",
    [
        {"endpoint_id": "d8b0a2c6-6a3c-4c8e-9d8b-1f2e3a4b5c6d", "source": "API", "reason": "x"},
        {"endpoint_id": "é/中", "source": None},
        {"endpoint_id": "e", "job_id": "j", "job_metadata": {"b": [1, 2.5], "a": None}},
    ],
)
def test_a_unique_key_is_the_digest_of_the_sorted_json_of_its_fields(payload: dict[str, Any]) -> None:
    import hashlib

    from epq.middleware.uniqueness import Uniqueness

    unique_by = [name for name in ("source", "endpoint_id", "job_id", "job_metadata") if name in payload]
    fields = {name: payload.get(name) for name in unique_by}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:40]
    assert Uniqueness.key_for("kind", unique_by, payload) == f"epq:unique:kind:{digest}"


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("lock_key", ["epq:unique:index_endpoint:0a1b", ""])
def test_a_data_template_makes_what_the_encoder_makes(payload: dict[str, Any], lock_key: str) -> None:
    options: dict[str, Any] = {"epq_recorded": 1, "epq_priority": 3}
    if lock_key:
        options["epq_unique_key"] = lock_key
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="q-é", actor_name="kind", args=(), kwargs=payload, options=options
    )
    message.options["redis_message_id"] = message.message_id
    template = messages.data_template(message, lock_key)
    assert template is not None
    f1, f2, f3, f4, f5 = template
    payload_json = pydantic_core.to_json(payload).decode()
    made = f1 + payload_json + f2 + lock_key + f3 + message.message_id + f4 + message.message_id + f5
    assert made.encode() == messages.encode(message, payload_json)
    assert dramatiq.Message.decode(made.encode()) == message


def test_no_data_template_when_it_cannot_be_relied_on() -> None:
    message: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="q", actor_name="a", args=(), kwargs={}, options={"epq_unique_key": 'k"ey'}
    )
    assert messages.data_template(message, 'k"ey') is None  # JSON would escape the key
    positional: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="q", actor_name="a", args=(1,), kwargs={}, options={}
    )
    assert messages.data_template(positional, "") is None
    old = dramatiq.get_encoder()
    dramatiq.set_encoder(PickleEncoder())
    try:
        assert messages.data_template(message, "") is None
    finally:
        dramatiq.set_encoder(old)


def test_a_message_made_the_fast_way_is_dramatiqs_message() -> None:
    options: dict[str, Any] = {"epq_recorded": 1}
    made = messages.new_message("q", "kind", {"a": "é"}, options, "an-id")
    same: dramatiq.Message[Any] = dramatiq.Message(
        queue_name="q",
        actor_name="kind",
        args=(),
        kwargs={"a": "é"},
        options=options,
        message_id="an-id",
        message_timestamp=made.message_timestamp,
    )
    assert type(made) is dramatiq.Message
    assert made == same
    assert made.asdict() == same.asdict()
    assert made.encode() == same.encode()
    assert made.copy(queue_name="other").queue_name == "other"
    with pytest.raises(AttributeError):  # frozen as Dramatiq's is
        made.queue_name = "other"  # type: ignore[misc]
