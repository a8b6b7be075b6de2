"""Messages off the wire: what a worker accepts from its queue, and why it refuses the rest.

A worker hands a message to its threads only if epq or Dramatiq could have sent it: UTF-8 JSON of
at most :data:`MAX_MESSAGE_BYTES`, an object with the fields of a Dramatiq message, each of its
type, the options that the middleware read of their types, for an actor the worker knows.
Anything else is refused with a :class:`MalformedMessage` that says why; epq's consumers
dead-letter it at once, with a discarded job record carrying the reason (so ``epq dead list``
and ``epq stats`` show it), instead of letting a wrong type crash a consumer thread, make
Dramatiq drop the message silently, or run it again after every restart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container
from typing import Any

import dramatiq

from .options import DUE_MS, SNOOZES, UNIQUE_KEY

#: The largest payload (the request as JSON) a job may carry: checked at the call site, and again
#: here as the message comes off the wire.
MAX_PAYLOAD_BYTES = 1024 * 1024
#: Room for a message's other fields and options (a retried job carries the end of the traceback
#: of its last failure).
ENVELOPE_BYTES = 64 * 1024
#: A message this large is taken without measuring its payload.
MAX_MESSAGE_BYTES = MAX_PAYLOAD_BYTES + ENVELOPE_BYTES
#: The largest message a worker reads at all: Dramatiq's encoder writes non-ASCII text as
#: ``\uXXXX`` escapes, up to 6 bytes for one byte of the payload's UTF-8.
MAX_WIRE_BYTES = 6 * MAX_PAYLOAD_BYTES + ENVELOPE_BYTES
#: How long a consumer waits before it takes a malformed message again when its record could not
#: be written (the state store is unreachable).
REFUSE_RETRY_MS = 1_000
#: How much of a refused message its record keeps, for operators to see what it was.
PREVIEW_CHARS = 2000
#: Message ids that can name a job record.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

# The fields of a Dramatiq message and their JSON types.
_FIELDS: dict[str, type] = {
    "queue_name": str,
    "actor_name": str,
    "args": list,
    "kwargs": dict,
    "options": dict,
    "message_id": str,
    "message_timestamp": int,
}
# Options a worker's middleware reads, and their JSON types (others are the actor's business).
_INT_OPTIONS = ("retries", "max_retries", "max_attempts", SNOOZES)
# (Dramatiq takes floats for these; ``eta`` is not among them: Dramatiq's worker runs a message
# whose eta is null or not a number at once, with a warning)
_NUMBER_OPTIONS = (
    "min_backoff",
    "max_backoff",
    "time_limit",
    "max_age",
    DUE_MS,
    "requeue_timestamp",
)
_STR_OPTIONS = ("redis_message_id", UNIQUE_KEY)


class MalformedMessage(Exception):
    """A message a worker refuses; ``reason`` says why (one line).

    Attributes:
      reason: why it was refused.
      message_id: its id, when it has a usable one.
      actor_name: its actor's name, when it has one.
      preview: the start of the message as text, for its record.
    """

    def __init__(self, reason: str, data: bytes, fields: Any = None) -> None:
        super().__init__(reason)
        self.reason = reason
        fields = fields if isinstance(fields, dict) else {}
        message_id = fields.get("message_id")
        self.message_id = message_id if isinstance(message_id, str) and _ID.fullmatch(message_id) else None
        actor_name = fields.get("actor_name")
        self.actor_name = actor_name if isinstance(actor_name, str) else None
        self.preview = data[:PREVIEW_CHARS].decode("utf-8", "replace")


class UnknownActor(MalformedMessage):
    """A well-formed message for an actor the worker does not have (Dramatiq's ``ActorNotFound``
    case)."""


def _payload_bytes(args: list[Any], kwargs: dict[str, Any]) -> int:
    text = json.dumps(kwargs if not args else [args, kwargs], ensure_ascii=False, separators=(",", ":"))
    return len(text.encode("utf-8", "surrogatepass"))


def _is(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


_NAMES = {str: "a string", int: "an integer", list: "an array", dict: "an object"}


def decode(data: bytes, actors: Container[str] | None = None) -> dramatiq.Message[Any]:
    """The message ``data`` encodes, checked as the module docstring says.

    ``actors``: the actor names the worker knows (None: any).

    Raises:
      MalformedMessage: why the message is refused.
    """
    if len(data) > MAX_WIRE_BYTES:
        raise MalformedMessage(f"message is {len(data)} bytes, over the {MAX_WIRE_BYTES}-byte limit", data)
    try:
        fields = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"not UTF-8 (byte {exc.start}: {exc.reason})", data) from None
    except ValueError as exc:
        raise MalformedMessage(f"not JSON ({exc})", data) from None
    if not isinstance(fields, dict):
        raise MalformedMessage(f"not a JSON object but {_type_name(fields)}", data)
    for name, kind in _FIELDS.items():
        if name not in fields:
            raise MalformedMessage(f"no {name}", data, fields)
        if not _is(fields[name], kind):
            got = _type_name(fields[name])
            raise MalformedMessage(f"{name} must be {_NAMES[kind]}, not {got}", data, fields)
    extra = sorted(set(fields) - set(_FIELDS))
    if extra:
        raise MalformedMessage(f"unexpected field {extra[0]!r}", data, fields)
    options = fields["options"]
    for name in _INT_OPTIONS:
        if name in options and not _is(options[name], int):
            got = _type_name(options[name])
            raise MalformedMessage(f"options.{name} must be an integer, not {got}", data, fields)
    for name in _NUMBER_OPTIONS:
        value = options.get(name)
        if value is not None and not (_is(value, int) or isinstance(value, float)):
            got = _type_name(value)
            raise MalformedMessage(f"options.{name} must be a number, not {got}", data, fields)
    for name in _STR_OPTIONS:
        if name in options and not _is(options[name], str):
            got = _type_name(options[name])
            raise MalformedMessage(f"options.{name} must be a string, not {got}", data, fields)
    backoff = options.get("backoff_ms")
    if backoff is not None and not (
        isinstance(backoff, list) and backoff and all(_is(b, int) for b in backoff)
    ):
        raise MalformedMessage("options.backoff_ms must be a non-empty array of integers", data, fields)
    if len(data) > MAX_MESSAGE_BYTES:  # measured as the call site measures it: UTF-8 JSON
        size = _payload_bytes(fields["args"], fields["kwargs"])
        if size > MAX_PAYLOAD_BYTES:
            reason = f"payload is {size} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit"
            raise MalformedMessage(reason, data, fields)
    if actors is not None and fields["actor_name"] not in actors:
        raise UnknownActor(f"unknown actor {fields['actor_name']!r}", data, fields)
    return dramatiq.Message(**fields)
