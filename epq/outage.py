"""The outage rule: a message leaves the broker only once its outcome is durably written.

A worker writes a job's outcome to the state store (its record, the retry in the schedule, the
record of a dead letter) before it acks, fails or dead-letters the message. When the state store
cannot be reached, the worker thread that holds the message waits for it to come back
(:func:`until_written`) and then writes the outcome: the message stays unacknowledged in the
meantime, so nothing is lost and nothing is dead-lettered because epq's own infrastructure
failed. If the worker stops while it waits, the message is given back to its queue untouched
(:func:`requeue_instead`, carried out by epq's consumers), to run again later.

Only errors that mean "unreachable" are waited out (connection refused or lost, timeouts, a Redis
still loading its data after a restart); any other error is a bug or a misconfiguration and is
raised at once. Times are milliseconds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .backends.base import InFlight, in_flight
from .backends.errors import STORE_ERRORS, store_unreachable
from .errors import StateUnavailable, describe_error

logger = logging.getLogger("epq.outage")

T = TypeVar("T")

#: The waits between tries while the state store is unreachable; the last one repeats.
BACKOFF_MS = (50, 100, 250, 500, 1000)

_stopping = threading.Event()


class WorkerStopping(StateUnavailable):
    """The worker began to stop while the state store was unreachable: the write was not made, and
    the message it was for goes back to its queue."""


def worker_booting() -> None:
    """A worker is starting in this process: waiting for the state store is allowed."""
    _stopping.clear()


def worker_stopping() -> None:
    """The worker is shutting down: threads waiting for the state store give up (their messages
    go back to their queues)."""
    _stopping.set()


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or the error it wraps) means the state store cannot be reached now."""
    if isinstance(exc, WorkerStopping):
        return False
    if isinstance(exc, StateUnavailable):
        return exc.__cause__ is not None and unreachable(exc.__cause__)
    return store_unreachable(exc)


def backoff_ms(tries: int) -> int:
    """How long to wait before the next try, after ``tries`` failed ones (``BACKOFF_MS``)."""
    return BACKOFF_MS[min(tries, len(BACKOFF_MS) - 1)]


def until_written(write: Callable[[], T], what: str) -> T:
    """Run ``write`` until it succeeds, waiting while the state store is unreachable. Other errors
    (bugs, not outages) are raised at once.

    Raises:
      WorkerStopping: the worker began to stop before the store came back (the caller's message
        must then go back to its queue: see :func:`write_or_give_back`).
    """
    tries = 0
    while True:
        try:
            return write()
        except Exception as exc:
            if not unreachable(exc):
                raise
            if _stopping.is_set():
                raise WorkerStopping(
                    f"the state store is unreachable while {what} and the worker is stopping: "
                    f"{describe_error(exc)}"
                ) from exc
            if tries == 0:
                logger.warning(
                    "The state store is unreachable while %s (%s); the message waits until it is back",
                    what,
                    describe_error(exc),
                )
            _stopping.wait(backoff_ms(tries) / 1000)
            tries += 1
            if tries % 20 == 0:
                logger.warning("Still waiting for the state store while %s (%d tries)", what, tries)


def write_or_give_back(message: Any, write: Callable[[], T], what: str) -> bool:
    """:func:`until_written` for a write a message's outcome depends on: when the worker stops
    before the state store comes back, the message goes back to its queue (:func:`requeue_instead`)
    and False is returned. Other errors are raised."""
    try:
        until_written(write, what)
    except WorkerStopping:
        logger.warning("Giving %s job %s back to its queue: the state store is unreachable",
                       message.actor_name, message.message_id)  # fmt: skip
        requeue_instead(message)
        return False
    return True


def written_if_possible(write: Callable[[], T], what: str) -> T | None:
    """:func:`until_written` for a write made after the message is settled (a lock released
    after a dead letter): when the worker stops first, it is left undone with a warning (the
    lock then ends with its TTL) instead of raising into Dramatiq's hooks."""
    try:
        return until_written(write, what)
    except WorkerStopping as exc:
        logger.warning("Left undone: %s (%s)", what, exc)
        return None


def requeue_instead(message: Any) -> None:
    """Have ``message`` (a worker's message proxy) go back to its queue, neither acked nor
    dead-lettered, when the worker is done with it."""
    in_flight(message).requeue = True


def must_requeue(message: Any) -> bool:
    """Whether :func:`requeue_instead` was called for ``message``."""
    state = getattr(message, "epq", None)
    return isinstance(state, InFlight) and state.requeue


class state_errors:
    """Turn state-store errors into :class:`StateUnavailable` (which Dramatiq does not swallow).
    (A class, not a generator: it wraps every insert's write, and is cheaper so.)"""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None and isinstance(exc, STORE_ERRORS):
            raise StateUnavailable(
                f"the state store failed while {self.what}: {describe_error(exc)}"
            ) from exc


class GivesBack:
    """Consumer mixin (before Dramatiq's consumer): a message :func:`requeue_instead` marked goes
    back to its queue (``give_back``, each broker's own way) instead of being acked or
    dead-lettered."""

    def ack(self, message: Any) -> None:
        if must_requeue(message):
            self.give_back(message)
        else:
            super().ack(message)  # type: ignore[misc]

    def nack(self, message: Any) -> None:
        if must_requeue(message):
            self.give_back(message)
        else:
            super().nack(message)  # type: ignore[misc]

    def give_back(self, message: Any) -> None:
        raise NotImplementedError  # pragma: no cover - every epq consumer has one
