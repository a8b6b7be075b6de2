"""``EpqActor``: a Dramatiq actor that validates its request at the call site."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

import dramatiq
import pydantic_core
import redis
from pydantic import ValidationError

from ._messages import new_id
from .brokers import display_url, unreachable_errors
from .errors import (
    BrokerUnavailable,
    ConfigurationError,
    DuplicateJob,
    EnqueueFailed,
    HandlerNotFound,
    InvalidPayload,
    InvalidRequest,
    StateUnavailable,
    describe_error,
    short_field,
)
from .handlers import get_handler
from .kinds import JobKind
from .middleware import JobRecords, Uniqueness, find_middleware
from .models import MAX_NESTING, JobInsertResult, JobPriority, JobRecord, JobState, _Request
from .records import ARGS_JSON_OPTION
from .wire import MAX_PAYLOAD_BYTES


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def make_job_function(kind: JobKind) -> Callable[..., Any]:
    """The function a kind's actor runs in the worker: validate, then call the handler."""

    def run(*args: Any, **payload: Any) -> Any:
        if args:
            raise InvalidPayload(
                f"{kind.name} takes keyword arguments only; the message has {len(args)} positional"
            )
        try:
            request = kind.model.model_validate(payload)
        except ValidationError as exc:
            raise InvalidPayload(str(InvalidRequest.from_validation_error(kind.name, exc))) from exc
        fn = get_handler(kind.name)
        if fn is None:
            raise HandlerNotFound(
                f"no handler registered for {kind.name}; register one with "
                f"@epq.handler({kind.name!r}) in a module named in EPQ_HANDLERS (in a test: "
                f"import that module, or use epq_handlers.register({kind.name!r}, fn))"
            )
        return fn(request)

    run.__name__ = run.__qualname__ = kind.name
    run.__module__ = "epq.actors"
    return run


class EpqActor(dramatiq.Actor[..., Any]):
    """An epq job kind as a Dramatiq actor.

    ``send(**fields)`` (or ``send(request)``) validates the fields into the kind's request
    model first: a bad request raises :class:`epq.InvalidRequest` naming the field, and
    nothing reaches the broker. ``queue_name``, ``priority`` and ``run_at`` in the request
    pick the queue, the priority and the time the job runs.
    """

    def __init__(
        self, kind: JobKind, *, broker: dramatiq.Broker, extra_options: dict[str, Any] | None = None
    ) -> None:
        self.kind = kind
        super().__init__(
            make_job_function(kind),
            broker=broker,
            actor_name=kind.name,
            queue_name=kind.queue,
            priority=int(kind.priority),
            options={
                "max_attempts": kind.max_attempts,
                "max_retries": kind.max_attempts - 1,
                "backoff_ms": list(kind.backoff_ms),
                "throws": (InvalidPayload, HandlerNotFound),
                **(extra_options or {}),
            },
        )

    def validate(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> _Request:
        """Turn ``send``'s arguments into the kind's request model."""
        model = self.kind.model
        if args:
            if len(args) == 1 and isinstance(args[0], model) and not kwargs:
                return args[0]
            raise TypeError(
                f"{self.actor_name}.send() takes keyword arguments (the fields of "
                f"{model.__name__}) or one {model.__name__}, not positional arguments"
            )
        try:
            return model.model_validate(kwargs or {})
        except ValidationError as exc:
            raise InvalidRequest.from_validation_error(self.actor_name, exc) from None

    def message_with_options(
        self, *, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> dramatiq.Message[Any]:
        return self.message_for(self.validate(args, kwargs), broker=self.broker, **options)

    def send_with_options(
        self,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: timedelta | int | None = None,
        **options: Any,
    ) -> dramatiq.Message[Any]:
        return self.enqueue_request(self.validate(args, kwargs), delay=delay, **options)

    def send_many(self, requests: Iterable[_Request | Mapping[str, Any]]) -> list[JobInsertResult]:
        """Enqueue many jobs of this kind in a few round trips: one ``JobInsertResult`` per
        request, in order (``QueueService.enqueue_many`` for mixed kinds). A duplicate is
        reported, not raised; an invalid request raises ``InvalidRequest`` and enqueues nothing."""
        from . import _runtime, bulk

        runtime = _runtime.current()
        if runtime is None or runtime.broker is not self.broker:
            raise ConfigurationError("send_many needs the broker epq.setup() built")
        return bulk.enqueue_many(runtime, [(self, r) for r in requests])

    def message_for(
        self, request: _Request, *, broker: dramatiq.Broker, message_id: str | None = None, **options: Any
    ) -> dramatiq.Message[Any]:
        """Build the message for a validated request (queue, priority and payload checked); its
        id is ``message_id``, or a new one."""
        checked = self.check(request, broker)
        options[ARGS_JSON_OPTION] = checked.payload_json  # the record reuses it
        return self.message_from(checked, message_id=message_id, **options)

    def check(self, request: _Request, broker: dramatiq.Broker) -> Checked:
        """What a validated request's message needs, checked against the broker: its queue is
        served, its payload is strict JSON within the size limit (else ``InvalidRequest``)."""
        kind = self.kind
        queue = request.queue_name or kind.queue
        declared = broker.get_declared_queues()
        if queue not in declared:
            served = ", ".join(sorted(q for q in declared if not q.endswith((".DQ", ".XQ"))))
            raise InvalidRequest(
                kind.name,
                [{"field": "queue_name", "message": f"no worker serves queue {queue!r} (queues: {served})"}],
            )
        priority = int(request.priority or kind.priority)  # both validated already
        payload = request.model_dump(mode="json")
        return Checked(queue, priority, payload, _check_payload(kind.name, payload, request))

    def message_from(
        self, checked: Checked, *, message_id: str | None = None, **options: Any
    ) -> dramatiq.Message[Any]:
        """The message of a checked request (see ``check``)."""
        options.setdefault("epq_priority", checked.priority)
        return dramatiq.Message(
            queue_name=checked.queue,
            actor_name=self.actor_name,
            args=(),
            kwargs=checked.payload,
            options=options,
            message_id=message_id or new_id(),
        )

    def enqueue_request(
        self,
        request: _Request,
        *,
        broker: dramatiq.Broker | None = None,
        delay: timedelta | int | None = None,
        **options: Any,
    ) -> dramatiq.Message[Any]:
        """Validate-free enqueue of an already validated request; returns the message sent."""
        target = broker or self.broker
        message = self.message_for(request, broker=target, **options)
        store = getattr(target, "epq_state", None)
        now_ms = store.now_ms() if store is not None else int(time.time() * 1000)
        delay_ms = _delay_ms(self.kind.name, request, delay, now_ms)
        try:
            target.enqueue(message, delay=delay_ms)
        except (StateUnavailable, ConfigurationError, EnqueueFailed):
            self._release_after_failed_publish(target, message)
            raise
        except unreachable_errors(target) as exc:
            if not _whole_or_nothing(target, delay_ms, exc):
                self._release_after_failed_publish(target, message)
            raise BrokerUnavailable(
                f"could not enqueue {self.actor_name} on {display_url(target)}: {describe_error(exc)}"
            ) from exc
        finally:
            # the payload JSON went with the copy the broker enqueued; the caller's copy keeps
            # none, so that a message made from it (say with other kwargs) cannot carry it
            message.options.pop(ARGS_JSON_OPTION, None)
        return message

    @staticmethod
    def _release_after_failed_publish(broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> None:
        # If the state store is down too, the record and the lock expire with their TTLs; the
        # first failure ends the cleanup, so a store that does not answer costs one timeout.
        with contextlib.suppress(redis.RedisError, OSError):
            records = find_middleware(broker, JobRecords)
            if records is not None:
                records.records.delete(message.message_id)
            uniqueness = find_middleware(broker, Uniqueness)
            key = uniqueness.lock_key(broker, message) if uniqueness is not None else None
            if uniqueness is not None and key is not None:
                uniqueness.release(message, key)

    def record_for(self, message: dramatiq.Message[Any], request: _Request) -> JobRecord:
        """The job record of a message this actor just enqueued."""
        created = datetime.fromtimestamp(message.message_timestamp / 1000, tz=timezone.utc)
        return JobRecord(**self.record_fields(message, request, created))

    def record_fields(
        self, message: dramatiq.Message[Any], request: _Request, created: datetime
    ) -> dict[str, Any]:
        """``record_for``'s fields, unvalidated (``created``: the message's timestamp)."""
        scheduled = request.run_at if request.run_at and request.run_at > created else created
        return {
            "id": message.message_id,
            "kind": self.actor_name,
            "queue": message.queue_name,
            "priority": message.options["epq_priority"],
            "args": message.kwargs,
            "state": JobState.SCHEDULED if scheduled > created else JobState.AVAILABLE,
            "attempt": 0,
            "max_attempts": int(self.options["max_attempts"]),
            "created_at": created,
            "scheduled_at": scheduled,
        }

    def record_for_duplicate(self, dup: DuplicateJob, request: _Request) -> JobRecord:
        """The record of the job that holds ``request``'s unique key, from what its lock records.

        ``args`` are this request's (they agree with the holder's on every unique-key field).
        """
        parts = dup.holder.split("|")
        now = _utcnow()
        try:
            created, scheduled = _from_ms(int(parts[1])), _from_ms(int(parts[2]))
            queue, priority = parts[3], JobPriority(int(parts[4]))
        except (IndexError, ValueError):
            created = scheduled = now
            queue, priority = (
                request.queue_name or self.kind.queue,
                JobPriority(request.priority or self.kind.priority),
            )
        return JobRecord(
            id=dup.existing_job_id,
            kind=self.actor_name,
            queue=queue,
            priority=priority,
            args=request.model_dump(mode="json"),
            state=JobState.SCHEDULED if scheduled > now else JobState.AVAILABLE,
            max_attempts=int(self.options["max_attempts"]),
            created_at=created,
            scheduled_at=scheduled,
        )


def _whole_or_nothing(broker: dramatiq.Broker, delay_ms: int | None, exc: BaseException) -> bool:
    """Whether a failed enqueue was one script call that took the lock, wrote the record and
    enqueued the message (Redis with epq's state in it, no delay) and failed on the connection:
    the script ran whole, its reply lost, or not at all. Either way there is nothing to take
    back (taking back an enqueued job would leave it without its record and lock), and a server
    that did not answer would not answer the cleanup either."""
    fused = bool(getattr(broker, "epq_records_fused", False)) and not delay_ms
    return fused and isinstance(exc, (redis.ConnectionError, redis.TimeoutError))


class Checked(NamedTuple):
    """A request checked for its message (``EpqActor.check``)."""

    queue: str
    priority: int
    payload: dict[str, Any]
    payload_json: str  # compact JSON of ``payload``


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def _delay_ms(kind: str, request: _Request, delay: timedelta | int | None, now_ms: int) -> int | None:
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


def _check_payload(kind: str, payload: dict[str, Any], request: _Request) -> str:
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
