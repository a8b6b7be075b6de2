"""epq's Dramatiq middleware.

``EpqRetries`` replaces Dramatiq's ``Retries``: it counts attempts the River way
(``max_attempts`` includes the first run), follows each kind's backoff schedule with ±25 %
jitter, and dead-letters at once the errors named in the actor's ``throws``.
``Uniqueness`` gives each kind its uniqueness window through the state store.
``EpqMiddleware`` loads the handler modules when a worker boots and warns about kinds without
a handler. All hold no per-message state on ``self``: one instance serves every worker thread.

Times are milliseconds, as everywhere in Dramatiq.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import random
import time
import traceback
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from dramatiq.errors import Retry
from dramatiq.middleware import MiddlewareError, Retries, SkipMessage

from ._messages import flat_json
from .backends.base import Holder, RecordStore, StateStore, backend_of, holder_id, unique_lock_key
from .backends.errors import STORE_ERRORS
from .errors import DuplicateJob, EnqueueFailed, StateUnavailable, describe_error
from .handlers import import_handler_modules, missing_kinds
from .outage import (
    WorkerStopping,
    must_requeue,
    requeue_instead,
    unreachable,
    until_written,
    worker_booting,
    worker_stopping,
    write_or_give_back,
    written_if_possible,
)
from .records import NOT_STARTED, OPEN_RECORD_TTL_MS, build_fields
from .wire import MalformedMessage

M = TypeVar("M", bound=dramatiq.Middleware)


@contextlib.contextmanager
def state_errors(what: str) -> Iterator[None]:
    """Turn state-store errors into :class:`StateUnavailable` (which Dramatiq does not swallow)."""
    try:
        yield
    except STORE_ERRORS as exc:
        raise StateUnavailable(f"the state store failed while {what}: {describe_error(exc)}") from exc


@contextlib.contextmanager
def enqueue_hook_errors(hook: str, message: dramatiq.Message[Any]) -> Iterator[None]:
    """Let no unexpected exception out of an epq ``before_enqueue`` hook as such: Dramatiq logs
    and ignores any that is not a ``MiddlewareError``, and would enqueue the job without its lock
    or record. It becomes :class:`EnqueueFailed` (a ``MiddlewareError``), which stops the enqueue."""
    try:
        yield
    except MiddlewareError:
        raise
    except Exception as exc:
        raise EnqueueFailed(
            f"{hook} failed for {message.actor_name} job {message.message_id}, which was not "
            f"enqueued: {describe_error(exc)}"
        ) from exc


logger = logging.getLogger("epq")

#: How much of a failed attempt's traceback a retried message carries (its end).
TRACEBACK_CHARS = 8000
#: Jitter applied to every backoff delay: the delay is drawn from [1 - J, 1 + J] * base.
BACKOFF_JITTER = 0.25


# Sorted keys, compact, unescaped: the unique fields' canonical form (changing it would change
# every lock key).
_canonical_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def _option(message: MessageProxy | dramatiq.Message[Any], actor: dramatiq.Actor[Any, Any], name: str) -> Any:
    """Message option > actor option (Dramatiq's precedence)."""
    if name in message.options:
        return message.options[name]
    return actor.options.get(name)


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
        max_attempts = _option(message, actor, "max_attempts")
        if max_attempts is None:
            super().after_process_message(broker, message, result=result, exception=exception)  # type: ignore[no-untyped-call]
            return

        attempt = int(message.options.get("retries", 0)) + 1
        message.options["retries"] = attempt
        message.options["traceback"] = "".join(
            traceback.format_exception(type(exception), exception, exception.__traceback__, limit=30)
        )[-TRACEBACK_CHARS:]  # (a retried message must stay within the wire's size limit)
        message.options["requeue_timestamp"] = int(time.time() * 1000)
        records = find_middleware(broker, JobRecords)
        try:
            self._retry_or_discard(broker, message, actor, exception, attempt, int(max_attempts), records)
        except WorkerStopping:
            # the worker stopped while the state store was away: the outcome is not written, so
            # the message goes back to its queue, this attempt not counted
            message.options["retries"] = attempt - 1
            logger.warning("Giving %s job %s back to its queue: the state store is unreachable",
                           message.actor_name, message.message_id)  # fmt: skip
            requeue_instead(message)
        except Exception:
            # the state store answers but cannot take the outcome (a bug, not an outage): the
            # message is dead-lettered rather than acked, so that it is not lost
            logger.exception("Could not write the failed attempt of %s job %s; dead-lettering it",
                             message.actor_name, message.message_id)  # fmt: skip
            message.fail()

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
        if throws and isinstance(exception, throws):
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
            delay = backoff_delay_ms(_option(message, actor, "backoff_ms") or [self.min_backoff], attempt)
        logger.info(
            "Retrying %s job %s (attempt %d of %d) in %d ms",
            message.actor_name,
            message.message_id,
            attempt + 1,
            max_attempts,
            delay,
        )
        backend = backend_of(broker)
        now_ms = backend.state.now_ms() if backend is not None else int(time.time() * 1000)
        # recorded before the retry exists, so no worker can start it first
        _record_failure(records, message, exception, now_ms + delay)
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


def _record_failure(
    records: JobRecords | None, message: Any, exception: BaseException, due_ms: int | None
) -> None:
    """Write a failed attempt, waiting while the state store is unreachable (the outage rule)."""
    if records is not None:
        until_written(
            lambda: records.attempt_failed(message, exception, retry_due_ms=due_ms),
            "recording a failed attempt",
        )


class EpqMiddleware(dramatiq.Middleware):
    """Loads handler modules when a worker boots; the home of epq's per-job hooks.

    Parameters:
      handler_modules: modules to import in each worker process (``EPQ_HANDLERS``).
    """

    def __init__(self, *, handler_modules: Sequence[str] = ()) -> None:
        self.handler_modules = tuple(handler_modules)

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        worker_booting()
        import_handler_modules(self.handler_modules)
        missing = missing_kinds()
        if missing:
            logger.warning(
                "No handler registered for %s: their jobs will be dead-lettered. "
                "Register handlers with @epq.handler(kind) in a module named in EPQ_HANDLERS.",
                ", ".join(missing),
            )

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        worker_stopping()  # threads waiting for the state store give their messages back


class Uniqueness(dramatiq.Middleware):
    """Uniqueness windows: one job per kind and unique key inside the window.

    Actor options (a message option of the same name wins for ``unique_for``):
      unique_for(int): the window in milliseconds; 0 or absent turns uniqueness off.
      unique_by(tuple[str, ...]): the payload fields that make up the key.

    The lock is taken in ``before_enqueue`` (one atomic round trip to the state store) and
    holds for ``unique_for`` plus the job's delay. A job's own retries and delayed re-enqueues
    carry the lock's key in ``message.options["epq_unique_key"]`` and pass. The lock is released
    when the job is dead-lettered (``after_nack``) or skipped; after success it holds until the
    window ends.
    """

    #: A bulk enqueue takes the locks itself (see ``epq.bulk``).
    epq_bulk_aware = True

    def __init__(self, store: StateStore) -> None:
        self.store = store

    @property
    def actor_options(self) -> set[str]:
        return {"unique_for", "unique_by"}

    @staticmethod
    def key_for(actor_name: str, unique_by: Sequence[str], kwargs: dict[str, Any]) -> str:
        """The lock key of a payload: kind plus a digest of the unique fields (canonical JSON)."""
        fields = {name: kwargs.get(name) for name in unique_by}
        canonical = flat_json(fields, ascii=False, sort=True) or _canonical_json(fields)
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:40]
        return unique_lock_key(actor_name, digest)

    @staticmethod
    def _window(broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> tuple[int, Sequence[str]] | None:
        """``(unique_for, unique_by)`` of ``message``, or None when its actor has no uniqueness."""
        actor = broker.actors.get(message.actor_name)
        if actor is None:
            return None
        unique_for = _option(message, actor, "unique_for")
        unique_by = actor.options.get("unique_by")
        if not unique_for or not unique_by:
            return None
        return int(unique_for), unique_by

    def lock_key(self, broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> str | None:
        """The key ``message`` locks, or None when its actor has no uniqueness."""
        window = self._window(broker, message)
        return None if window is None else self.key_for(message.actor_name, window[1], message.kwargs)

    def lock_for(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.Message[Any],
        delay: int | None,
        *,
        holder: bool = True,
    ) -> tuple[str, str, int] | None:
        """The lock ``message`` needs: ``(key, holder value, ttl ms)``, or None without uniqueness
        (``holder=False``: '' for the holder value, for a caller that makes it itself).

        The holder value records the job id, its creation and due times, queue and priority, so
        that a duplicate can be answered with the holder's details even without its record.
        """
        window = self._window(broker, message)
        if window is None:
            return None
        window_ms, unique_by = window
        delay_ms = int(delay or 0)
        value = ""
        if holder:
            tail = self.holder_tail(message, self.store.now_ms() + delay_ms)
            value = message.message_id + tail
        return self.key_for(message.actor_name, unique_by, message.kwargs), value, window_ms + delay_ms

    @staticmethod
    def holder_tail(message: dramatiq.Message[Any], due_ms: int) -> str:
        """The holder value of ``message``'s lock after its id (see ``Holder``)."""
        priority = message.options.get("epq_priority", "")
        return Holder.tail(message.message_timestamp, due_ms, message.queue_name, priority)

    def before_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None
    ) -> None:
        if "epq_unique_key" in message.options or in_bulk():
            return  # its own retry or delayed re-enqueue, or epq.bulk took the lock already
        with enqueue_hook_errors("taking the uniqueness lock", message):
            self._take_lock(broker, message, delay)

    def _take_lock(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None) -> None:
        lock = self.lock_for(broker, message, delay)
        if lock is None:
            return
        key, holder, lock_ttl = lock
        actor = broker.actors[message.actor_name]
        recorded_later = "max_attempts" in actor.options and "epq_recorded" not in message.options
        if recorded_later and find_middleware(broker, JobRecords) is not None:
            # JobRecords takes the lock together with writing the record: one round trip for both
            message.options["epq_unique_pending"] = [key, holder, lock_ttl]
            return
        with state_errors("taking a uniqueness lock"):
            current = self.store.acquire_unique(key, holder, lock_ttl)
        if current is not None:
            raise DuplicateJob(message.actor_name, holder_id(current), holder=current)
        message.options["epq_unique_key"] = key

    def release(self, message: dramatiq.Message[Any] | MessageProxy, key: str | None = None) -> bool:
        """Free the lock ``message`` holds (a no-op when another job holds the key)."""
        key = key or message.options.get("epq_unique_key")
        if not key:
            return False
        return self.store.release_unique(key, message.message_id)

    def after_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if written_if_possible(lambda: self.release(message), "releasing a uniqueness lock"):
            logger.info(
                "Released the uniqueness lock of dead-lettered %s job %s",
                message.actor_name,
                message.message_id,
            )

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        written_if_possible(lambda: self.release(message), "releasing a uniqueness lock")


_bulk: contextvars.ContextVar[bool] = contextvars.ContextVar("epq_bulk", default=False)


def in_bulk() -> bool:
    """Whether the current enqueue is part of :func:`epq.bulk.enqueue_many` (which takes the
    locks and writes the records of the whole batch in a few round trips itself)."""
    return _bulk.get()


def refuse_malformed(broker: dramatiq.Broker, queue_name: str, error: MalformedMessage) -> None:
    """Log and record a message a consumer refuses off the wire (see ``epq.wire``), before the
    consumer dead-letters it.

    Raises:
      StateUnavailable: the state store is unreachable; the consumer gives the message back to
        its queue instead of dead-lettering it, and tries again a little later.
    """
    records = find_middleware(broker, JobRecords)
    if records is not None:
        # one try: a consumer thread that waited would stop its broker connection's heartbeats
        try:
            records.record_malformed(queue_name, error)
        except Exception as exc:
            if unreachable(exc):
                raise StateUnavailable(
                    f"cannot record a malformed message on {queue_name!r}: {describe_error(exc)}"
                ) from exc
            raise
    logger.error("Dead-lettering a malformed message on queue %r: %s", queue_name, error.reason)


def find_middleware(broker: dramatiq.Broker, kind: type[M]) -> M | None:
    """The broker's middleware of type ``kind``, if it has one."""
    for middleware in broker.middleware:
        if isinstance(middleware, kind):
            return middleware
    return None


class JobRecords(dramatiq.Middleware):
    """Writes each epq job's state transitions to the job records (River's lifecycle).

    Only actors with the ``max_attempts`` option (the epq kinds) are recorded. Must come after
    :class:`Uniqueness` (a duplicate gets no record). A job cancelled before it started is skipped
    when a worker fetches it.
    """

    #: A bulk enqueue writes the records itself (see ``epq.bulk``).
    epq_bulk_aware = True

    def __init__(
        self, records: RecordStore, store: StateStore, *, completed_ttl_ms: int, discarded_ttl_ms: int
    ) -> None:
        self.records = records
        self.store = store
        self.completed_ttl_ms = completed_ttl_ms
        self.discarded_ttl_ms = discarded_ttl_ms

    @staticmethod
    def _recorded(broker: dramatiq.Broker, message: Any) -> dramatiq.Actor[Any, Any] | None:
        actor = broker.actors.get(message.actor_name)
        return actor if actor is not None and "max_attempts" in actor.options else None

    def before_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None
    ) -> None:
        actor = self._recorded(broker, message)
        if actor is None or in_bulk():
            return  # in bulk, epq.bulk writes the records of the whole batch itself
        with enqueue_hook_errors("writing the job record", message):
            self._write_record(broker, message, delay, actor)

    def _write_record(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.Message[Any],
        delay: int | None,
        actor: dramatiq.Actor[Any, Any],
    ) -> None:
        with state_errors("writing a job record"):
            if "epq_recorded" in message.options:
                if not delay:  # promoted from the schedule: ready to run
                    self.records.move(
                        message.message_id, "available", {}, OPEN_RECORD_TTL_MS, NOT_STARTED[1:]
                    )
                return
            now = self.store.now_ms()
            state = "scheduled" if delay else "available"
            fields = build_fields(message, actor, state, now, now + int(delay or 0))
            # an open record outlives the job's wait, so a cancellation is still there at run time
            ttl = OPEN_RECORD_TTL_MS + int(delay or 0)
            pending = message.options.pop("epq_unique_pending", None)
            backend = backend_of(broker)
            if not delay and backend is not None and backend.fused:
                # the broker takes the lock, writes the record and enqueues in one round trip
                key, holder, lock_ttl = pending if pending is not None else ("", "", 0)
                fields["unique_key"] = key
                message.options["epq_fused"] = {
                    "ttl": ttl,
                    "fields": fields,
                    "lock_key": key,
                    "holder": holder,
                    "lock_ttl": int(lock_ttl),
                }
                if key:
                    message.options["epq_unique_key"] = key
            elif pending is None:
                self.records.create(message.message_id, fields, ttl)
            else:
                key, holder, lock_ttl = pending
                fields["unique_key"] = key
                current = self.records.create_locked(
                    message.message_id, fields, ttl, key, holder, int(lock_ttl)
                )
                if current is not None:
                    raise DuplicateJob(message.actor_name, holder_id(current), holder=current)
                message.options["epq_unique_key"] = key
        message.options["epq_recorded"] = 1

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if self._recorded(broker, message) is None:
            return
        try:
            with state_errors("starting a job"):  # (other errors: a MiddlewareError, so it does not run)
                # (on Redis with the records in the broker's server, on the broker's kept connections)
                fused = getattr(message, "epq_fused_ack", False)
                start = broker.start_record if fused else self.records.start  # type: ignore[attr-defined]
                before = until_written(
                    lambda: start(message.message_id, self.store.now_ms(), OPEN_RECORD_TTL_MS),
                    "starting a job",
                )
        except WorkerStopping:
            requeue_instead(message)  # not started: it goes back to its queue
            raise
        if before == "cancelled":
            logger.info("Skipping cancelled %s job %s", message.actor_name, message.message_id)
            raise SkipMessage(f"job {message.message_id} was cancelled")

    def after_process_message(
        self, broker: dramatiq.Broker, message: MessageProxy, *, result: Any = None, exception: Any = None
    ) -> None:
        # Failures are recorded by EpqRetries, which decides between retry and discard.
        if exception is None and getattr(message, "epq_fused_ack", False):
            message.epq_complete_ttl_ms = self.completed_ttl_ms  # type: ignore[attr-defined]  # the Redis ack completes it
            return
        if exception is None and self._recorded(broker, message) is not None:
            fields = {"finalized_at": str(self.store.now_ms())}
            self._write(
                message,
                lambda: self.records.move(
                    message.message_id, "completed", fields, self.completed_ttl_ms, ("running",)
                ),
                "completing a job",
            )

    @staticmethod
    def _write(message: MessageProxy, write: Any, what: str) -> None:
        """Write a job's outcome before its message is acked (``write_or_give_back``); a state store
        that answers but cannot take it (a bug) is logged, and the message acked as it would be."""
        try:
            write_or_give_back(message, write, what)
        except Exception:
            logger.exception("Could not write the record of %s job %s while %s",
                             message.actor_name, message.message_id, what)  # fmt: skip

    def attempt_failed(self, message: Any, exception: BaseException, *, retry_due_ms: int | None) -> None:
        """Record a failed attempt: ``retryable`` until ``retry_due_ms``, or ``discarded`` if None."""
        now = self.store.now_ms()
        error = {
            "at": now,
            "error_type": type(exception).__name__,
            "message": _clean_text(str(exception)[:2000]),
            "traceback": _clean_text(str(message.options.get("traceback", ""))[-4000:]),
        }
        if retry_due_ms is None:
            fields = {"finalized_at": str(now)}
            self.records.fail(message.message_id, "discarded", error, fields, self.discarded_ttl_ms)
        else:
            fields = {"scheduled_at": str(retry_due_ms)}
            ttl = OPEN_RECORD_TTL_MS + max(0, retry_due_ms - now)
            self.records.fail(message.message_id, "retryable", error, fields, ttl)

    def record_malformed(self, queue_name: str, error: MalformedMessage) -> str:
        """Record a message refused off the wire as a discarded job with the reason; return the
        record's id (the message's own when it has a usable one and a record of it exists or
        can be made under it)."""
        now = self.store.now_ms()
        entry = {"at": now, "error_type": "MalformedMessage", "message": _clean_text(error.reason)[:2000],
                 "traceback": ""}  # fmt: skip
        job_id = error.message_id
        existing = self.records.get(job_id) if job_id is not None else None
        if job_id is not None and existing is not None:
            self.records.fail(job_id, "discarded", entry, {"finalized_at": str(now)}, self.discarded_ttl_ms)
            if existing.get("unique_key"):  # it will not run: its key is free, as for any dead job
                self.store.release_unique(existing["unique_key"], job_id)
            return job_id
        job_id = job_id or f"malformed-{uuid.uuid4()}"
        fields = {
            "kind": error.actor_name or "unknown",
            "queue": q_name(queue_name),
            "priority": "2",
            "args": json.dumps({"malformed_message": error.preview}),
            "state": "discarded",
            "attempt": "0",
            "max_attempts": "0",
            "errors": json.dumps([{**entry, "attempt": 0}]),
            "created_at": str(now),
            "scheduled_at": str(now),
            "finalized_at": str(now),
            "unique_key": "",
            "malformed": "1",
        }
        self.records.create(job_id, fields, self.discarded_ttl_ms)
        return job_id

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        # Skipped by another middleware (not a cancellation), e.g. Dramatiq's AgeLimit: it will not run.
        if self._recorded(broker, message) is not None:
            fields = {"finalized_at": str(self.store.now_ms())}
            allowed = (*NOT_STARTED, "running")
            self._write(
                message,
                lambda: self.records.move(
                    message.message_id, "discarded", fields, self.discarded_ttl_ms, allowed
                ),
                "discarding a skipped job",
            )

    def after_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        # Dead-lettered without being processed (e.g. it could not be decoded for its actor).
        if self._recorded(broker, message) is not None:
            fields = {"finalized_at": str(self.store.now_ms())}
            written_if_possible(
                lambda: self.records.move(
                    message.message_id, "discarded", fields, self.discarded_ttl_ms, NOT_STARTED
                ),
                "recording a dead letter",
            )


def _clean_text(text: str) -> str:
    """Text that survives a UTF-8 round trip (lone surrogates, e.g. from file names, replaced)."""
    return text.encode("utf-8", "replace").decode("utf-8")
