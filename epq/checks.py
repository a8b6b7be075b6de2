"""What a validated request must pass before it becomes a message: its queue is served, its
payload is strict JSON within the size and nesting limits, and its delay is a delay.

Each failure is an :class:`~epq.errors.InvalidRequest` naming the field; nothing reaches the
broker. Single and bulk enqueue both check here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from datetime import timedelta
from typing import Any, NamedTuple

import dramatiq
import pydantic_core

from .backends.base import is_served, served_queues
from .errors import MAX_NESTING, InvalidRequest, short_field
from .kinds import JobKind
from .models import ENQUEUE_OPTION_FIELDS, _Request
from .wire import MAX_PAYLOAD_BYTES


class Checked(NamedTuple):
    """A request checked for its message (``check_request``)."""

    queue: str
    priority: int
    payload: dict[str, Any]
    payload_json: str  # compact JSON of ``payload``


def check_request(
    kind: JobKind, request: _Request, broker: dramatiq.Broker, declared: Collection[str] | None = None
) -> Checked:
    """What a validated request's message needs, checked against the broker: its queue is
    served, its payload is strict JSON within the size limit (else ``InvalidRequest``).
    ``declared``: the broker's declared queues, when the caller read them already (for many
    requests)."""
    queue = request.queue_name or kind.queue
    if not is_served(broker, queue, declared):
        served = ", ".join(served_queues(broker))
        problem = f"no worker serves queue {queue!r} (queues: {served})"
        raise InvalidRequest(kind.name, [{"field": "queue_name", "message": problem}])
    priority = int(request.priority or kind.priority)  # both validated already
    # (enqueue options left unset are not part of the payload: its handler's model has them None;
    # nor is the uniqueness mode, which only the enqueue reads)
    unset = {name for name in ENQUEUE_OPTION_FIELDS if getattr(request, name) is None}
    payload = request.model_dump(mode="json", exclude=unset | {"unique_mode"})
    return Checked(queue, priority, payload, check_payload(kind.name, payload, request))


def delay_ms(kind: str, request: _Request, delay: timedelta | int | None, now_ms: int) -> int | None:
    """The delay in ms before the job may run, by the broker's state clock (``now_ms``)."""
    if delay is not None and request.run_at is not None:
        raise InvalidRequest(kind, [{"field": "run_at", "message": "give run_at or delay, not both"}])
    if isinstance(delay, timedelta):
        delay = int(delay.total_seconds() * 1000)
    if delay is not None:
        if delay < 0:
            raise InvalidRequest(kind, [{"field": "delay", "message": "must not be negative"}])
        return delay or None
    if request.run_at is not None:
        # Rounded up, so that a job never starts before its run_at.
        ms = math.ceil(request.run_at.timestamp() * 1000) - now_ms
        return ms if ms > 0 else None
    return None


_REPLACEMENT = "\ufffd".encode()  # U+FFFD in UTF-8


def check_payload(kind: str, payload: dict[str, Any], request: _Request) -> str:
    """Refuse payloads that are not strict JSON, hold text that is not valid UTF-8 (a lone
    surrogate, as ``os.fsdecode`` makes of a file name's stray byte), nest deeper than
    ``MAX_NESTING`` or are larger than ``MAX_PAYLOAD_BYTES``; return the payload as compact JSON
    (UTF-8 text, not ASCII escapes). ``payload`` is ``request`` dumped as JSON values (where a
    key's lone surrogate is already replaced by U+FFFD: ``request`` still has it)."""
    try:
        # the common case: one fast dump, which writes NaN and Infinity as such (so a payload
        # with neither word is strict JSON) and fails on a lone surrogate; a payload with few
        # brackets cannot nest deeply. The passes below only run to name a field.
        whole = pydantic_core.to_json(payload, inf_nan_mode="constants")
        if (
            len(whole) <= MAX_PAYLOAD_BYTES
            and b"NaN" not in whole
            and b"Infinity" not in whole
            and whole.count(b"{") + whole.count(b"[") <= MAX_NESTING + 1  # +1: the payload itself
            and _REPLACEMENT not in whole  # a key's lone surrogate, replaced in the dump
        ):
            return whole.decode()
    except pydantic_core.PydanticSerializationError:
        pass
    for name in payload:
        problem = _text_problem(name, getattr(request, name, None), 0)
        if problem is not None:
            raise InvalidRequest(kind, [{"field": short_field(problem[0]), "message": problem[1]}])
    sizes: dict[str, int] = {}
    for name, value in payload.items():
        try:
            sizes[name] = len(json.dumps(value, allow_nan=False, separators=(",", ":")).encode())
        except ValueError:
            raise InvalidRequest(
                kind, [{"field": name, "message": "NaN and Infinity are not valid JSON"}]
            ) from None
    total = sum(sizes.values()) + sum(len(k) + 4 for k in sizes) + 2
    if total > MAX_PAYLOAD_BYTES:
        largest = max(sizes, key=lambda k: sizes[k])
        raise InvalidRequest(
            kind,
            [
                {
                    "field": largest,
                    "message": f"payload is {total} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit "
                    f"({largest} alone is {sizes[largest]} bytes)",
                }
            ],
        )
    return json.dumps(payload, separators=(",", ":"))


def _text_problem(path: str, value: Any, depth: int) -> tuple[str, str] | None:
    """The first problem of a JSON value that the fast dump cannot name: ``(field, message)`` for
    text (a value or a key) that is not valid UTF-8, or nesting deeper than ``MAX_NESTING``."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError as exc:
                return path, "is " + _not_utf8(value, exc)
        return None
    if isinstance(value, dict | list):
        if depth >= MAX_NESTING:
            return path.split(".", 1)[0], f"nested deeper than {MAX_NESTING} levels"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and not key.isascii():
                try:
                    key.encode()
                except UnicodeEncodeError as exc:
                    return path, "has a key that is " + _not_utf8(key, exc)
            problem = _text_problem(f"{path}.{key}", item, depth + 1)
            if problem is not None:
                return problem
    return None


def _not_utf8(text: str, exc: UnicodeEncodeError) -> str:
    bad = text[exc.start : exc.end]
    return (
        f"not valid UTF-8 text: {ascii(bad)[1:-1]} at character {exc.start} is a lone surrogate "
        "(as os.fsdecode makes of a byte that is not UTF-8); decode such bytes with "
        "errors='replace' or send them base64-encoded"
    )
