"""Cheaper ways to make message ids and encode messages, for the enqueue paths.

- :func:`new_ids` and :func:`new_id` make random (version 4) UUID strings, like Dramatiq's
  ``generate_unique_id``, from one read of the OS's random source for many ids.
- :func:`new_message` makes a Dramatiq message without the frozen dataclass's slow ``__init__``.
- :func:`encode` encodes an epq message as Dramatiq's default JSON encoder does (the same JSON
  once decoded; non-ASCII text stays UTF-8 in the payload), reusing the payload JSON the actor
  already made (the payload is the bulk of a message).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any

import dramatiq
from dramatiq.encoder import JSONEncoder

from .options import UNIQUE_KEY

# The fields of Dramatiq's Message, in order: what new_message fills in directly.
_MESSAGE_FIELDS = ("queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp")
_DIRECT = tuple(
    f.name for f in dataclasses.fields(dramatiq.Message)
) == _MESSAGE_FIELDS and "__slots__" not in vars(dramatiq.Message)

# The variant of an RFC 4122 UUID: the top two bits of the 17th hex digit are 10.
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}
# Compact separators and ASCII escapes: the output of Dramatiq's JSONEncoder.
_to_json = json.JSONEncoder(separators=(",", ":")).encode


def flat_json(mapping: dict[str, Any], *, ascii: bool = True, sort: bool = False) -> str | None:
    """The compact JSON of a mapping whose values are all strings, ints or None, as ``json.dumps``
    with ``separators=(",", ":")`` and that ``ensure_ascii`` and ``sort_keys`` writes it, to the
    byte (a few times faster for such small mappings); None for any other mapping."""
    quote = encode_basestring_ascii if ascii else encode_basestring
    parts = []
    for name in sorted(mapping) if sort else mapping:
        value = mapping[name]
        kind = type(value)
        if type(name) is not str:
            return None
        if kind is str:
            parts.append(f"{quote(name)}:{quote(value)}")
        elif kind is int or value is None:
            parts.append(f"{quote(name)}:{'null' if value is None else value}")
        else:
            return None
    return "{" + ",".join(parts) + "}"


def new_ids(n: int) -> list[str]:
    """``n`` random version-4 UUIDs as strings (``xxxxxxxx-xxxx-4xxx-[89ab]xxx-xxxxxxxxxxxx``)."""
    raw = os.urandom(16 * n).hex()
    out = []
    for i in range(0, 32 * n, 32):
        h = raw[i : i + 32]
        out.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}")
    return out


# Ids made ahead, 256 at a time (one read of the random source, which is a system call, for
# many), by this process: a forked child (however it was forked) must not make its parent's.
_ahead: list[str] = []
_ahead_pid = os.getpid()


def new_id() -> str:
    """One random version-4 UUID string (see ``new_ids``)."""
    global _ahead, _ahead_pid
    if _ahead_pid != os.getpid():
        _ahead, _ahead_pid = [], os.getpid()
    try:
        return _ahead.pop()  # atomic: two threads never get the same id
    except IndexError:
        _ahead.extend(new_ids(256))
        return _ahead.pop()


def new_message(
    queue_name: str, actor_name: str, kwargs: dict[str, Any], options: dict[str, Any], message_id: str
) -> dramatiq.Message[Any]:
    """``dramatiq.Message(queue_name=..., actor_name=..., args=(), kwargs=..., options=...,
    message_id=...)``, stamped now, made a few times faster: Dramatiq's message is a frozen
    dataclass, which sets each field through ``object.__setattr__``; its fields go into it
    at once here (the usual way if Dramatiq's message ever changes its fields)."""
    if not _DIRECT:  # pragma: no cover - the Dramatiq epq pins
        return dramatiq.Message(
            queue_name=queue_name,
            actor_name=actor_name,
            args=(),
            kwargs=kwargs,
            options=options,
            message_id=message_id,
        )
    message: dramatiq.Message[Any] = object.__new__(dramatiq.Message)
    message.__dict__.update(
        {
            "queue_name": queue_name,
            "actor_name": actor_name,
            "args": (),
            "kwargs": kwargs,
            "options": options,
            "message_id": message_id,
            "message_timestamp": int(time.time() * 1000),
        }
    )
    return message


def encode(message: dramatiq.Message[Any], kwargs_json: str | None = None) -> bytes:
    """``message.encode()``, faster when the encoder is Dramatiq's default JSON one: the same
    bytes without ``kwargs_json``; with it (the JSON of ``message.kwargs``, as ``epq.checks.check_payload``
    makes it), the same JSON once decoded, without encoding the payload again."""
    if type(dramatiq.get_encoder()) is not JSONEncoder:
        return message.encode()
    if kwargs_json is None or message.args:
        fields = {
            "queue_name": message.queue_name,
            "actor_name": message.actor_name,
            "args": message.args,
            "kwargs": message.kwargs,
            "options": message.options,
            "message_id": message.message_id,
            "message_timestamp": message.message_timestamp,
        }  # Message.asdict(), in its order
        return _to_json(fields).encode()
    options = message.options
    return (
        f'{{"queue_name":{_quote(message.queue_name)},"actor_name":{_quote(message.actor_name)},'
        f'"args":[],"kwargs":{kwargs_json},"options":{flat_json(options) or _to_json(options)},'
        f'"message_id":{_quote(message.message_id)},"message_timestamp":{int(message.message_timestamp)}}}'
    ).encode()


def _quote(text: Any) -> str:
    """``_to_json(text)``, the shorter way when it is a string (as the encoder itself takes)."""
    return encode_basestring_ascii(text) if type(text) is str else _to_json(text)


_ARGS, _KEY, _ID = "@@epq:args@@", "@@epq:key@@", "@@epq:id@@"
_PLACES = re.compile("(@@epq:(?:args|key|id)@@)")


def data_template(message: dramatiq.Message[Any], lock_key: str) -> tuple[str, str, str, str, str] | None:
    """How to make the encoded message of each job like ``message`` (same queue, kind, options and
    timestamp, but for its id, which is also its ``redis_message_id``, and its ``lock_key``) from
    its payload JSON: fragments ``f1 .. f5`` such that ``encode`` would give
    ``f1 + payload + f2 + lock_key + f3 + id + f4 + id + f5``. None when that cannot be relied on:
    another encoder, positional args, or a lock key that JSON would escape."""
    if type(dramatiq.get_encoder()) is not JSONEncoder or message.args:
        return None
    if lock_key and _to_json(lock_key) != f'"{lock_key}"':
        return None
    options = dict(message.options)  # the same keys in the same order, two of them marked
    options["redis_message_id"] = _ID
    if lock_key:
        options[UNIQUE_KEY] = _KEY
    probe: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=message.queue_name,
        actor_name=message.actor_name,
        args=(),
        kwargs={},
        options=options,
        message_id=_ID,
        message_timestamp=message.message_timestamp,
    )
    parts = _PLACES.split(encode(probe, _ARGS).decode())
    if lock_key and parts[1::2] == [_ARGS, _KEY, _ID, _ID]:
        return parts[0], parts[2], parts[4], parts[6], parts[8]
    if not lock_key and parts[1::2] == [_ARGS, _ID, _ID]:
        return parts[0], parts[2], "", parts[4], parts[6]
    return None  # pragma: no cover - the options of epq's bulk messages always split so
