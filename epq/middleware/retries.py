"""``EpqRetries``: Dramatiq's ``Retries`` with River's attempt counting and per-kind backoff.

Times are milliseconds, as everywhere in Dramatiq.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.errors import Retry
from dramatiq.middleware import Retries, TimeLimitExceeded

from ..backends.base import backend_of, in_flight
from ..cancellation import JobCancelled
from ..controls import Discard, Snooze
from ..options import SNOOZES
from ..outage import WorkerStopping, must_requeue, requeue_instead, until_written, written_if_possible
from .common import find_middleware, option
from .job_records import JobRecords
from .uniqueness import Uniqueness

logger = logging.getLogger("epq")

#: How much of a failed attempt's traceback a retried message carries (its end).
TRACEBACK_CHARS = 8000
#: Jitter applied to every backoff delay: the delay is drawn from [1 - J, 1 + J] * base.
BACKOFF_JITTER = 0.25


def backoff_delay_ms(schedule: Sequence[int], retry_number: int) -> int:
    """The delay before retry ``retry_number`` (1-based): the schedule's entry, ±25 % jitter.

    Past the end of the schedule its last entry repeats.
    """
    base = schedule[min(retry_number, len(schedule)) - 1]
    return int(base * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER))


class EpqRetries(Retries):
    """Retries with River's attempt counting and per-kind backoff schedules.

    Actor options (a message option of the same name wins):
      max_attempts(int): total runs allowed, the first one included.
      backoff_ms(list[int]): delay before retry 1, 2, …; the last entry repeats.
      throws(tuple[type[Exception], ...]): errors that dead-letter at once, never retried.

    A handler's ``epq.Discard`` dead-letters at once too; its ``epq.Snooze`` schedules the job
    again without spending an attempt (``epq.controls``). A job cancelled while it ran
    (``epq.JobCancelled``, or a request to cancel it found before a retry or snooze is scheduled:
    ``epq.cancellation``) is recorded ``cancelled``, its key freed, and never retried.

    Actors without ``max_attempts`` get Dramatiq's own ``Retries`` behaviour.
    """

    @property
    def actor_options(self) -> set[str]:
        return set(super().actor_options) | {"max_attempts", "backoff_ms"}

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None or must_requeue(message):
            return  # (epq's own hooks could not reach the state store: the job did not run)
        actor = broker.get_actor(message.actor_name)
        max_attempts = option(message, actor, "max_attempts")
        if max_attempts is None:
            super().after_process_message(broker, message, result=result, exception=exception)  # type: ignore[no-untyped-call]
            return

        records = find_middleware(broker, JobRecords)
        if isinstance(exception, JobCancelled) or in_flight(message).cancel_requested:
            # (a run that failed as it was cancelled keeps its error on the record)
            failure = (
                None
                if isinstance(exception, (JobCancelled, Snooze))
                else _described(exception, message, actor)
            )
            if failure is not None:
                message.options["traceback"] = _traceback_of(exception)
            self._settle(message, lambda: _cancel(broker, message, records, failure), undo={})
            return
        message.options["requeue_timestamp"] = int(time.time() * 1000)
        if isinstance(exception, Snooze):
            snooze, snoozes = exception, int(message.options.get(SNOOZES, 0))
            message.options[SNOOZES] = snoozes + 1
            outcome = lambda: self._snooze(broker, message, snooze, records)  # noqa: E731
            self._settle(message, outcome, undo={SNOOZES: snoozes})
            return

        attempt = int(message.options.get("retries", 0)) + 1
        message.options["retries"] = attempt
        message.options["traceback"] = _traceback_of(exception)
        failure = _described(exception, message, actor)
        outcome = lambda: self._retry_or_discard(  # noqa: E731
            broker, message, actor, failure, attempt, int(max_attempts), records
        )
        self._settle(message, outcome, undo={"retries": attempt - 1})

    @staticmethod
    def _settle(message: MessageProxy, outcome: Callable[[], None], *, undo: dict[str, int]) -> None:
        """Write a failed run's outcome; if the worker stops while the state store is away, the
        message goes back to its queue with ``undo`` (its options as they were: the run not
        counted)."""
        try:
            outcome()
        except WorkerStopping:
            # the worker stopped while the state store was away: the outcome is not written, so
            # the message goes back to its queue, this run not counted
            message.options.update(undo)
            logger.warning("Giving %s job %s back to its queue: the state store is unreachable",
                           message.actor_name, message.message_id)  # fmt: skip
            requeue_instead(message)
        except Exception:
            # the state store answers but cannot take the outcome (a bug, not an outage): the
            # message is dead-lettered rather than acked, so that it is not lost
            logger.exception("Could not write the failed attempt of %s job %s; dead-lettering it",
                             message.actor_name, message.message_id)  # fmt: skip
            message.fail()

    def _snooze(
        self, broker: dramatiq.Broker, message: MessageProxy, snooze: Snooze, records: JobRecords | None
    ) -> None:
        """Schedule a snoozed job again after its delay, its attempt not spent."""
        delay = int(snooze.delay or 0)
        logger.info(
            "Snoozing %s job %s for %d ms (snooze %d; attempts spent: %d)",
            message.actor_name,
            message.message_id,
            delay,
            message.options[SNOOZES],
            int(message.options.get("retries", 0)),
        )
        due_ms = _now_ms(broker) + delay
        if records is not None:
            until_written(lambda: records.snoozed(message, due_ms), "recording a snooze")
        self._schedule_again(broker, message, snooze, delay, records)

    def _retry_or_discard(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        actor: dramatiq.Actor[Any, Any],
        exception: BaseException,
        attempt: int,
        max_attempts: int,
        records: JobRecords | None,
    ) -> None:
        """Write the failed attempt, then schedule the retry or dead-letter the message (each
        write waits for an unreachable state store: see ``epq.outage``)."""
        throws = actor.options.get("throws")
        if isinstance(exception, Discard) or (throws and isinstance(exception, throws)):
            logger.warning(
                "Discarding %s job %s without retry: %s", message.actor_name, message.message_id, exception
            )
            _record_failure(records, message, exception, None)
            message.fail()
            return
        if attempt >= max_attempts:
            logger.warning(
                "%s job %s failed its last attempt (%d of %d); dead-lettering it",
                message.actor_name,
                message.message_id,
                attempt,
                max_attempts,
            )
            _record_failure(records, message, exception, None)
            message.fail()
            return

        if isinstance(exception, Retry) and exception.delay is not None:
            delay = int(exception.delay)
        else:
            delay = backoff_delay_ms(option(message, actor, "backoff_ms") or [self.min_backoff], attempt)
        logger.info(
            "Retrying %s job %s (attempt %d of %d) in %d ms",
            message.actor_name,
            message.message_id,
            attempt + 1,
            max_attempts,
            delay,
        )
        # recorded before the retry exists, so no worker can start it first
        _record_failure(records, message, exception, _now_ms(broker) + delay)
        self._schedule_again(broker, message, exception, delay, records)

    @staticmethod
    def _schedule_again(
        broker: dramatiq.Broker,
        message: MessageProxy,
        exception: BaseException,
        delay: int,
        records: JobRecords | None,
    ) -> None:
        """Enqueue the job again after ``delay`` ms (through epq's durable schedule), waiting while
        the state store is unreachable; a job that cannot be scheduled is dead-lettered. A job
        cancelled while it ran is not: its outcome, just recorded, becomes ``cancelled``."""
        if _cancel_was_requested(broker, message):
            _cancel(broker, message, records)
            return
        try:
            until_written(
                lambda: broker.enqueue(message, delay=delay),  # type: ignore[arg-type]  # a proxy, as in Retries
                "scheduling a retry",
            )
        except WorkerStopping:
            raise
        except Exception:
            # Dramatiq would log this and ack the message: the job would be lost. Dead-letter it
            # instead, so that it can be retried (epq dead retry).
            logger.exception("Could not schedule the retry of %s job %s; dead-lettering it",
                             message.actor_name, message.message_id)  # fmt: skip
            _record_failure(records, message, exception, None)
            message.fail()


def _cancel_was_requested(broker: dramatiq.Broker, message: MessageProxy) -> bool:
    """Whether a request to cancel the job came while its run was ending (the watcher had not
    seen it): asked after the retry or snooze is recorded and before it is scheduled, so that a
    request ``QueueService.cancel_job`` saw ``running`` is found here (see ``epq.cancellation``).
    One round trip per failed run."""
    backend = backend_of(broker)
    if backend is None:
        return False
    found = until_written(
        lambda: backend.state.cancel_requests([message.message_id]), "looking for a cancel request"
    )
    return bool(found)


def _traceback_of(exception: BaseException) -> str:
    """A failed run's traceback as its message and record keep it (the end of it: a retried
    message must stay within the wire's size limit)."""
    return "".join(traceback.format_exception(type(exception), exception, exception.__traceback__, limit=30))[
        -TRACEBACK_CHARS:
    ]


def _cancel(
    broker: dramatiq.Broker,
    message: MessageProxy,
    records: JobRecords | None,
    failure: BaseException | None = None,
) -> None:
    """End a job cancelled while it ran: its uniqueness key freed, then its record ``cancelled``
    (with ``failure``, the error its run ended with, if it failed rather than being interrupted),
    so that a record that says ``cancelled`` has its key free, then the request dropped; its
    message is acked, never retried."""
    logger.info("Cancelled %s job %s while it ran", message.actor_name, message.message_id)
    uniqueness = find_middleware(broker, Uniqueness)
    if uniqueness is not None:
        until_written(lambda: uniqueness.release(message), "freeing a cancelled job's uniqueness key")
    if records is not None:
        until_written(lambda: records.cancelled(message, failure), "recording a cancelled job")
    in_flight(message).cancelled = True
    backend = backend_of(broker)
    if backend is not None:
        forget = backend.state.forget_cancel
        written_if_possible(lambda: forget(message.message_id), "dropping a cancel request")


def _described(
    exception: BaseException, message: MessageProxy, actor: dramatiq.Actor[Any, Any]
) -> BaseException:
    """The exception as its record shows it: Dramatiq's time limit interrupts a handler with a
    ``TimeLimitExceeded`` that says nothing, so the record says which limit it ran past."""
    if isinstance(exception, TimeLimitExceeded) and not str(exception):
        limit = option(message, actor, "time_limit")
        of = f" of {limit / 1000:g} s" if limit else ""
        return TimeLimitExceeded(f"interrupted: the handler ran past its time limit{of}")
    return exception


def _now_ms(broker: dramatiq.Broker) -> int:
    """The state store's time (the schedule's clock), else the local one."""
    backend = backend_of(broker)
    return backend.state.now_ms() if backend is not None else int(time.time() * 1000)


def _record_failure(
    records: JobRecords | None, message: Any, exception: BaseException, due_ms: int | None
) -> None:
    """Write a failed attempt, waiting while the state store is unreachable (the outage rule)."""
    if records is not None:
        until_written(
            lambda: records.attempt_failed(message, exception, retry_due_ms=due_ms),
            "recording a failed attempt",
        )
