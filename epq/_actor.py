"""``EpqActor``: a Dramatiq actor that validates its request at the call site."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any

import dramatiq
from pydantic import ValidationError

from . import insert
from ._messages import new_id, new_message
from .cancellation import JobCancelled, handler_scope
from .checks import Checked, check_request
from .controls import Discard
from .errors import DuplicateJob, HandlerNotFound, InvalidPayload, InvalidRequest
from .handlers import get_handler
from .kinds import JobKind
from .models import JobInsertResult, _Request
from .options import ARGS_JSON, PRIORITY
from .outbox import pending
from .payloads import to_request
from .records import DEFAULT_OUTPUT_MAX_BYTES, output_json


def make_job_function(
    kind: JobKind,
    strict: Callable[[], bool] = lambda: False,
    output_max_bytes: Callable[[], int] = lambda: DEFAULT_OUTPUT_MAX_BYTES,
) -> Callable[..., Any]:
    """The function a kind's actor runs in the worker: the payload upgraded and validated (see
    :mod:`epq.payloads`; fields the kind's model does not know are dropped unless ``strict()``),
    then the handler called; what it returns is the job's output, checked here (JSON of at most
    ``output_max_bytes()``: else :class:`epq.controls.InvalidOutput`, and the job is dead)."""

    def run(*args: Any, **payload: Any) -> Any:
        if args:
            raise InvalidPayload(
                f"{kind.name} takes keyword arguments only; the message has {len(args)} positional"
            )
        request = to_request(kind, payload, strict=strict())
        fn = get_handler(kind.name)
        if fn is None:
            raise HandlerNotFound(
                f"no handler registered for {kind.name}; register one with "
                f"@epq.handler({kind.name!r}) in a module named in EPQ_HANDLERS (in a test: "
                f"import that module, or use epq_handlers.register({kind.name!r}, fn))"
            )
        with handler_scope():  # (where epq.cancellation may interrupt it)
            output = fn(request)
        if output is not None:
            output_json(kind.name, output, output_max_bytes())  # (JobRecords keeps it)
        return output

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
        self,
        kind: JobKind,
        *,
        broker: dramatiq.Broker,
        extra_options: dict[str, Any] | None = None,
        strict_payload: bool = False,
        output_max_bytes: int = DEFAULT_OUTPUT_MAX_BYTES,
    ) -> None:
        self.kind = kind
        #: Whether a payload with fields the kind's model does not know is dead-lettered (else
        #: the fields are dropped and logged); ``EPQ_STRICT_PAYLOAD_KINDS``.
        self.strict_payload = strict_payload
        #: The largest JSON of a handler's return value a job keeps (``EPQ_OUTPUT_MAX_BYTES``).
        self.output_max_bytes = output_max_bytes
        super().__init__(
            make_job_function(kind, lambda: self.strict_payload, lambda: self.output_max_bytes),
            broker=broker,
            actor_name=kind.name,
            queue_name=kind.queue,
            priority=int(kind.priority),
            options={
                "max_attempts": kind.max_attempts,
                "max_retries": kind.max_attempts - 1,
                "backoff_ms": list(kind.backoff_ms),
                "throws": (InvalidPayload, HandlerNotFound, Discard, JobCancelled),
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

    def send(self, *args: Any, **kwargs: Any) -> dramatiq.Message[Any]:
        return self.enqueue_request(self.validate(args, kwargs))

    def send_with_options(
        self,
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: timedelta | int | None = None,
        tx: object | None = None,
        **options: Any,
    ) -> dramatiq.Message[Any]:
        """``send`` with a ``delay`` (ms, or a timedelta) or message ``options``; or, with ``tx``
        (the application's open transaction: see ``QueueService``), written to the outbox in it
        (``delay`` becomes the request's ``run_at``; no other options), the message returned
        being the one a relay will enqueue once it commits."""
        request = self.validate(args, kwargs)
        if tx is None:
            return self.enqueue_request(request, delay=delay, **options)
        if options:
            problems = [
                {"field": name, "message": "not an option an enqueue with tx= takes"} for name in options
            ]
            raise InvalidRequest(self.actor_name, problems)
        ((plan, result),) = pending.enqueue(self.broker, tx, [(self, request)], many=False, delay=delay)
        if result.unique_skipped_as_duplicate:
            raise DuplicateJob(self.actor_name, result.job.id)
        return plan.message

    def send_many(
        self, requests: Iterable[_Request | Mapping[str, Any]], *, tx: object | None = None
    ) -> list[JobInsertResult]:
        """Enqueue many jobs of this kind in a few round trips: one ``JobInsertResult`` per
        request, in order (``QueueService.enqueue_many`` for mixed kinds). A duplicate is
        reported, not raised; an invalid request raises ``InvalidRequest`` and enqueues nothing.
        With ``tx``, written to the outbox in that transaction (see ``QueueService``)."""
        pairs = [(self, r) for r in requests]
        if tx is not None:
            return [result for _, result in pending.enqueue(self.broker, tx, pairs)]
        return insert.insert_many(self.broker, pairs)

    def message_for(
        self, request: _Request, *, broker: dramatiq.Broker, message_id: str | None = None, **options: Any
    ) -> dramatiq.Message[Any]:
        """Build the message for a validated request (queue, priority and payload checked); its
        id is ``message_id``, or a new one."""
        checked = self.check(request, broker)
        options[ARGS_JSON] = checked.payload_json  # the record reuses it (see JobRecords)
        return self.message_from(checked, message_id=message_id, **options)

    def check(self, request: _Request, broker: dramatiq.Broker) -> Checked:
        """What a validated request's message needs, checked against the broker (see
        :func:`epq.checks.check_request`)."""
        return check_request(self.kind, request, broker)

    def message_from(
        self, checked: Checked, *, message_id: str | None = None, **options: Any
    ) -> dramatiq.Message[Any]:
        """The message of a checked request (see ``check``)."""
        options.setdefault(PRIORITY, checked.priority)
        return new_message(checked.queue, self.actor_name, checked.payload, options, message_id or new_id())

    def enqueue_request(
        self,
        request: _Request,
        *,
        broker: dramatiq.Broker | None = None,
        delay: timedelta | int | None = None,
        **options: Any,
    ) -> dramatiq.Message[Any]:
        """Insert an already validated request (see :func:`epq.insert.insert_one`); returns the
        message sent."""
        return insert.insert_one(self, request, broker or self.broker, delay=delay, **options).message
