"""Errors raised by epq.

Every error epq raises on purpose derives from :class:`EpqError`::

    EpqError
    ├── ConfigurationError        bad settings, unknown broker URL scheme, missing EPQ_STATE_URL
    ├── BrokerUnavailable         a broker or state server cannot be reached (URL shown masked)
    │   └── StateUnavailable (dramatiq MiddlewareError)
    │                             the state store failed inside a middleware hook
    ├── InvalidRequest (ValueError)
    │                             a request failed validation at the call site; names the field(s)
    ├── EnqueueFailed (dramatiq MiddlewareError)
    │                             an epq enqueue hook failed unexpectedly; nothing was enqueued
    ├── HandlerError
    │   ├── HandlerNotFound       a job's kind has no registered handler (worker side)
    │   └── HandlerAlreadyRegistered
    ├── InvalidPayload            a message's payload failed validation in the worker
    │   └── PayloadUpgradeFailed  one of the kind's payload upgrades raised or returned no dict
    ├── JobNotFound (LookupError) no record of that job id (never enqueued, or expired)
    └── DuplicateJob (dramatiq MiddlewareError)
                                  a unique job is already enqueued inside its window

Driver errors (redis-py, pika, pydantic) are mapped at the boundary to the most specific
error above with ``raise ... from exc``, so the cause stays available.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dramatiq.middleware import MiddlewareError


class EpqError(Exception):
    """The root of every error epq raises on purpose."""


class ConfigurationError(EpqError):
    """The settings or the arguments given to :func:`epq.setup` cannot work."""


class QueueMismatch(ConfigurationError, MiddlewareError):
    """A broker queue exists with other arguments than epq declares (RabbitMQ without
    ``x-max-priority``); ``epq migrate-queues`` fixes it.

    A ``MiddlewareError``, so that it stops a worker at boot instead of being logged and ignored.
    """


class BrokerUnavailable(EpqError):
    """A broker or state server could not be reached.

    The message names the scheme and host; a password in the URL is always masked.
    """


class StateUnavailable(BrokerUnavailable, MiddlewareError):
    """The state store (Redis) failed while a middleware needed it.

    A ``MiddlewareError``, so Dramatiq propagates it from ``before_*`` hooks instead of logging it
    and carrying on without the lock or the record.
    """


class InvalidRequest(EpqError, ValueError):
    """A request failed validation at the call site; nothing was enqueued.

    Attributes:
      kind: the job kind the request was for.
      fields: the dotted names of the offending fields, in the order they were found.
      errors: one ``{"field", "message"}`` dict per problem.
    """

    def __init__(self, kind: str, errors: Sequence[dict[str, str]]) -> None:
        self.kind = kind
        self.errors = list(errors)
        self.fields = [e["field"] for e in self.errors]
        details = "; ".join(f"{e['field']}: {e['message']}" for e in self.errors)
        super().__init__(f"invalid {kind} request: {details}")

    @property
    def field(self) -> str:
        """The first offending field."""
        return self.fields[0] if self.fields else ""

    @classmethod
    def from_validation_error(cls, kind: str, exc: Any) -> InvalidRequest:
        """Build from a :class:`pydantic.ValidationError`, keeping one entry per error (field
        names cut to ``MAX_FIELD_NAME`` characters)."""
        errors = []
        for err in exc.errors(include_url=False):
            parts = [str(part) for part in err.get("loc", ())]
            message = str(err.get("msg", "invalid"))
            if err.get("type") == "recursion_depth_exceeded":
                parts, message = parts[:1], f"nested deeper than {MAX_NESTING} levels"
            errors.append({"field": short_field(".".join(parts) or "request"), "message": message})
        return cls(kind, errors)


#: Seconds epq's Redis clients wait for a reply (every command: epq sends no blocking ones). A
#: Redis that accepts connections but does not answer (stopped, swapping, stuck) fails an enqueue
#: after this long with ``BrokerUnavailable``, instead of blocking the caller.
REDIS_REPLY_TIMEOUT_S = 5.0


def describe_error(exc: BaseException) -> str:
    """One line that says what a driver error was: ``ConnectionError: Error 111 connecting to
    127.0.0.1:6390. Connection refused.``. Neither ``repr`` nor ``str`` will do alone: redis-py's
    repr is only ``network:ConnectionError``, and pika's str is often empty (its args say it)."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    if not text:
        text = "; ".join(" ".join(str(arg).split()) for arg in exc.args if str(arg).strip())
    if not text:
        text = "; ".join(repr(arg) for arg in exc.args)
    cause = exc.__cause__ or exc.__context__
    if not text and cause is not None and cause is not exc:
        text = describe_error(cause)
    if not text:
        text = "timed out" if "timeout" in name.lower() else "no details given"
    if name == "TimeoutError" and type(exc).__module__.startswith("redis"):
        text += f" (no reply within {REDIS_REPLY_TIMEOUT_S:g} s)"
    return f"{name}: {text}"


#: The deepest a request field's value may nest (each object or array is one level): far more
#: than any metadata needs, and far below where pydantic and JSON libraries give up (about 250).
MAX_NESTING = 32
#: The longest field name an error shows (a dotted path into nested metadata can be long).
MAX_FIELD_NAME = 80


def short_field(name: str) -> str:
    """``name`` cut to ``MAX_FIELD_NAME`` characters (its start, which says where it is)."""
    return name if len(name) <= MAX_FIELD_NAME else name[: MAX_FIELD_NAME - 3] + "..."


class EnqueueFailed(EpqError, MiddlewareError):
    """One of epq's own enqueue hooks (the uniqueness lock, the job record) failed in a way it
    does not expect: the job was not enqueued.

    A ``MiddlewareError``, so that Dramatiq propagates it instead of logging it and enqueueing the
    job without its lock or its record.
    """


class HandlerError(EpqError):
    """A problem with the handler registry."""


class HandlerNotFound(HandlerError):
    """No handler is registered for a job kind; the job is dead-lettered, not retried."""


class HandlerAlreadyRegistered(HandlerError):
    """A different handler is already registered for this kind."""


class InvalidPayload(EpqError):
    """A message's payload failed validation in the worker; it is dead-lettered, not retried."""


class PayloadUpgradeFailed(InvalidPayload):
    """One of a kind's payload upgrades (``@epq.payload_upgrade``) raised, or returned something
    other than a dict. The job is dead-lettered with its payload as it was sent: fix the upgrade,
    then retry the job (``epq dead retry``).

    Attributes:
      kind: the job kind.
      upgrade: the upgrade's name (``module.qualname``).
      position: which of the kind's upgrades it is (1-based), of ``count``.
      count: how many upgrades the kind has.
    """

    def __init__(self, kind: str, upgrade: str, position: int, count: int, problem: str) -> None:
        self.kind = kind
        self.upgrade = upgrade
        self.position = position
        self.count = count
        super().__init__(f"{kind} payload upgrade {upgrade} ({position} of {count}) failed: {problem}")


class JobNotFound(EpqError, LookupError):
    """No record of that job id: never enqueued here, or its record has expired."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r} (never enqueued, or its record expired)")


class DuplicateJob(EpqError, MiddlewareError):
    """A job with the same kind and unique key is already enqueued inside its window.

    Attributes:
      kind: the job kind.
      existing_job_id: the id of the job that holds the key.
      holder: what the lock records of that job (``id|created ms|scheduled ms|queue|priority``).
    """

    def __init__(self, kind: str, existing_job_id: str, *, holder: str = "") -> None:
        self.kind = kind
        self.existing_job_id = existing_job_id
        self.holder = holder or existing_job_id
        super().__init__(f"duplicate {kind} job: job {existing_job_id} holds its unique key")
