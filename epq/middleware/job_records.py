"""``JobRecords``: each epq job's state transitions, written to the job records (River's
lifecycle), and the record of a message a consumer refuses off the wire."""

from __future__ import annotations

import json
import logging
import sys
import threading
import uuid
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from dramatiq.middleware import SkipMessage

from ..backends.base import Move, NewRecord, RecordStore, StateStore, holder_id, in_flight
from ..errors import DuplicateJob, StateUnavailable, describe_error
from ..options import DUE_MS, RECORDED, SNOOZES, UNIQUE_KEY
from ..outage import (
    WorkerStopping,
    requeue_instead,
    state_errors,
    unreachable,
    until_written,
    write_or_give_back,
    written_if_possible,
)
from ..priority import DEFAULT_LANE
from ..records import (
    NOT_STARTED,
    OPEN_RECORD_TTL_MS,
    SKIPPED,
    lock_key_of,
    message_record_fields,
    new_record_fields,
    output_json,
    payload_json,
)
from ..wire import MalformedMessage
from .common import enqueue_hook_errors, find_middleware
from .uniqueness import Uniqueness, count_refused

logger = logging.getLogger("epq")


def made_available(job_id: str) -> Move:
    """The record move of a job whose message is back from the schedule and on its queue
    (``available``; a job already started, or cancelled, keeps its state)."""
    return Move(job_id, "available", {}, OPEN_RECORD_TTL_MS, NOT_STARTED[1:])


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


class _Start:
    """A worker thread's ask to start a job, in a :class:`_Starts` batch."""

    __slots__ = ("batch", "before", "error", "job_id", "turn")

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.batch: list[_Start] | None = None  # set when this thread is to write these starts
        self.before: str | None = None
        self.error: Exception | None = None
        self.turn = threading.Event()  # its start is written, or it is to write a batch


class _Starts:
    """The starts of jobs that worker threads ask for at the same time, written together: a
    thread that asks while no write is under way writes its own start at once; the asks that
    come while one is under way wait for it, and the first of them then writes them all in one
    round trip (``RecordStore.start_many``). A job alone waits for nothing more than its own
    write."""

    def __init__(self, records: RecordStore, store: StateStore) -> None:
        self.records, self.store = records, store
        self._lock = threading.Lock()
        self._waiting: list[_Start] = []
        self._busy = False  # a write is under way

    def start(self, job_id: str, ttl_ms: int) -> str | None:
        """``RecordStore.start`` of ``job_id`` (at the store's time), with the others asked for."""
        ask = _Start(job_id)
        with self._lock:
            if self._busy:
                self._waiting.append(ask)
            else:
                self._busy = True
                ask.batch = [ask]
        if ask.batch is None:
            try:
                ask.turn.wait()
            except BaseException:  # (interrupted while it waits: Dramatiq's time limit, say)
                self._leave(ask, ttl_ms)
                raise
        if ask.batch is not None:
            self._write(ask.batch, ttl_ms)
        if ask.error is not None:
            raise ask.error
        return ask.before

    def _leave(self, ask: _Start, ttl_ms: int) -> None:
        """An ask whose thread stops waiting leaves the queue; a batch it was given to write is
        written all the same (the threads of the others wait for it)."""
        with self._lock:
            if ask in self._waiting:
                self._waiting.remove(ask)
                return
        if ask.batch is not None:
            self._write(ask.batch, ttl_ms)

    def _write(self, batch: list[_Start], ttl_ms: int) -> None:
        try:
            now = self.store.now_ms()
            if len(batch) == 1:
                befores = [self.records.start(batch[0].job_id, now, ttl_ms)]
            else:
                befores = self.records.start_many([ask.job_id for ask in batch], now, ttl_ms)
            for ask, before in zip(batch, befores, strict=True):
                ask.before = before
        except BaseException as exc:
            for ask in batch:  # (each thread decides: wait out an outage, or fail)
                ask.error = (
                    exc if isinstance(exc, Exception) else StateUnavailable(f"start interrupted: {exc!r}")
                )
            if not isinstance(exc, Exception):
                raise
        finally:
            self._pass_on(batch)

    def _pass_on(self, batch: list[_Start]) -> None:
        """Wake the threads of a written batch, and hand the asks that came meanwhile to the first
        of them to write."""
        with self._lock:
            following, self._waiting = self._waiting, []
            if following:
                following[0].batch = following
            else:
                self._busy = False
        for ask in batch[1:]:
            ask.turn.set()
        if following:
            following[0].turn.set()


class JobRecords(dramatiq.Middleware):
    """Writes each epq job's state transitions to the job records (River's lifecycle).

    Only actors with the ``max_attempts`` option (the epq kinds) are recorded. Must come after
    :class:`Uniqueness` (a duplicate gets no record). A job cancelled before it started is skipped
    when a worker fetches it.
    """

    #: Acts on unplanned messages only: an insert need not call its enqueue hook.
    epq_skips_planned = True
    #: Takes the lock of an epq message enqueued by hand with its record (``Uniqueness`` leaves
    #: such messages to it).
    epq_writes_records = True

    def __init__(
        self, records: RecordStore, store: StateStore, *, completed_ttl_ms: int, discarded_ttl_ms: int
    ) -> None:
        self.records = records
        self.store = store
        self.completed_ttl_ms = completed_ttl_ms
        self.discarded_ttl_ms = discarded_ttl_ms
        self._starts = _Starts(records, store)

    @staticmethod
    def _recorded(broker: dramatiq.Broker, message: Any) -> dramatiq.Actor[Any, Any] | None:
        actor = broker.actors.get(message.actor_name)
        return actor if actor is not None and "max_attempts" in actor.options else None

    def before_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None
    ) -> None:
        actor = self._recorded(broker, message)
        if actor is None:
            return
        options = message.options
        if RECORDED not in options:  # an epq job enqueued by hand (epq.insert writes its own)
            with enqueue_hook_errors("taking the uniqueness lock and writing the job record", message):
                self._write_record(broker, message, delay, actor)
        elif not delay and (DUE_MS in options or "retries" in options or SNOOZES in options):
            # a job back from the schedule, or retried at once: ready to run again
            with enqueue_hook_errors("writing the job record", message), state_errors("writing a job record"):
                self.records.move(*made_available(message.message_id))

    def unrecorded(self, broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> bool:
        """Whether ``message`` is an epq job enqueued by hand that has no record yet."""
        return self._recorded(broker, message) is not None and RECORDED not in message.options

    def new_record(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None
    ) -> NewRecord:
        """The record of an epq message enqueued by hand, with the lock it takes (if its actor has
        a window); the message is marked recorded, with its lock's key."""
        actor = broker.actors[message.actor_name]
        uniqueness = find_middleware(broker, Uniqueness)
        lock = uniqueness.lock_for(broker, message, delay) if uniqueness is not None else None
        if lock is not None:
            message.options[UNIQUE_KEY] = lock[0]  # (the record keeps it)
        now = self.store.now_ms()
        wait = int(delay or 0)
        fields = message_record_fields(message, actor, "scheduled" if wait else "available", now + wait)
        message.options[RECORDED] = 1
        # an open record outlives the job's wait
        return NewRecord(message.message_id, fields, OPEN_RECORD_TTL_MS + wait, *(lock or ()))

    def _write_record(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.Message[Any],
        delay: int | None,
        actor: dramatiq.Actor[Any, Any],
    ) -> None:
        """Take the lock and write the record of an epq message enqueued by hand, in one round
        trip (on Redis with the records beside the queues the broker does it in its enqueue
        script instead: ``EpqRedisBroker.enqueue``)."""
        record = self.new_record(broker, message, delay)
        with state_errors("writing a job record"):
            current = self.records.create(record)
        if current is not None:
            message.options.pop(UNIQUE_KEY, None)
            message.options.pop(RECORDED, None)
            count_refused(self.store, message)
            raise DuplicateJob(message.actor_name, holder_id(current), holder=current)

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        if self._recorded(broker, message) is None:
            return
        try:
            with state_errors("starting a job"):  # (other errors: a MiddlewareError, so it does not run)
                # (on Redis with the records in the broker's server, on the broker's kept connections)
                if in_flight(message).records_here:
                    start = broker.start_record  # type: ignore[attr-defined]
                    write = lambda: start(message.message_id, self.store.now_ms(), OPEN_RECORD_TTL_MS)  # noqa: E731
                else:  # (with the starts other threads ask for at the same time)
                    write = lambda: self._starts.start(message.message_id, OPEN_RECORD_TTL_MS)  # noqa: E731
                before = until_written(write, "starting a job")
        except WorkerStopping:
            requeue_instead(message)  # not started: it goes back to its queue
            raise
        in_flight(message).state_before = before
        if before in SKIPPED:  # (cancelled, or deleted: QueueService.delete_job)
            logger.info("Skipping %s %s job %s", before, message.actor_name, message.message_id)
            raise SkipMessage(f"job {message.message_id} was {before}")

    def after_process_message(
        self, broker: dramatiq.Broker, message: MessageProxy, *, result: Any = None, exception: Any = None
    ) -> None:
        # Failures are recorded by EpqRetries, which decides between retry and discard.
        if exception is None and in_flight(message).records_here:
            in_flight(message).complete_ttl_ms = self.completed_ttl_ms  # the Redis ack completes it
            in_flight(message).output = _output(message, result)
            return
        if exception is None and self._recorded(broker, message) is not None:
            fields = {"finalized_at": str(self.store.now_ms())}
            output = _output(message, result)
            if output:
                fields["output"] = output
            move = Move(message.message_id, "completed", fields, self.completed_ttl_ms, ("running",))
            if in_flight(message).batched:
                in_flight(message).outcome = move  # its consumer writes it, then acks
                return
            self._write(message, lambda: self.records.move(*move), "completing a job")

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
        error = _error_entry(now, message, exception)
        if retry_due_ms is None:
            fields = _leaving(message, {"finalized_at": str(now)})
            self.records.fail(message.message_id, "discarded", error, fields, self.discarded_ttl_ms)
            in_flight(message).dead_recorded = True
        else:
            fields = _leaving(message, {"scheduled_at": str(retry_due_ms)})
            ttl = OPEN_RECORD_TTL_MS + max(0, retry_due_ms - now)
            self.records.fail(message.message_id, "retryable", error, fields, ttl)

    def snoozed(self, message: Any, due_ms: int) -> None:
        """Record a snooze (``epq.Snooze``): ``scheduled`` until ``due_ms``, the attempt it ran as
        given back (the attempts its message has spent), one more snooze."""
        fields = {
            "scheduled_at": str(due_ms),
            "attempt": str(int(message.options.get("retries", 0))),
            "snoozes": str(int(message.options.get(SNOOZES, 0))),
        }
        ttl = OPEN_RECORD_TTL_MS + max(0, due_ms - self.store.now_ms())
        self.records.move(message.message_id, "scheduled", _leaving(message, fields), ttl, ("running",))

    def cancelled(self, message: Any, failure: BaseException | None = None) -> str | None:
        """Record a job cancelled while it ran (``epq.cancellation``): ``cancelled`` from
        ``running``, or from the retry or snooze just recorded for its run; kept as a cancelled job
        that never ran is. ``failure``: the error its run failed with as it was cancelled, kept
        among its errors. Returns the state before (None after a ``failure``: not read)."""
        now = self.store.now_ms()
        fields = _leaving(message, {"finalized_at": str(now)})
        if failure is not None:  # (its worker runs it: the record is running)
            error = _error_entry(now, message, failure)
            self.records.fail(message.message_id, "cancelled", error, fields, self.completed_ttl_ms)
            return None
        allowed = ("running", *NOT_STARTED)
        return self.records.move(message.message_id, "cancelled", fields, self.completed_ttl_ms, allowed)

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
            # (with the payload, which a record filed beside its message may not hold: see RedisRecords)
            fields = {"finalized_at": str(now), "args": existing.get("args", "{}")}
            self.records.fail(job_id, "discarded", entry, fields, self.discarded_ttl_ms)
            if lock_key_of(existing):  # it will not run: its key is free, as for any dead job
                self.store.release_unique(lock_key_of(existing), job_id)
            return job_id
        job_id = job_id or f"malformed-{uuid.uuid4()}"
        fields = new_record_fields(
            kind=error.actor_name or "unknown",
            queue=q_name(queue_name),
            priority=DEFAULT_LANE,
            args_json=json.dumps({"malformed_message": error.preview}),
            state="discarded",
            max_attempts=0,
            created_ms=now,
            scheduled_ms=now,
        )
        fields.update(errors=json.dumps([{**entry, "attempt": 0}]), finalized_at=str(now), malformed="1")
        self.records.create(NewRecord(job_id, fields, self.discarded_ttl_ms))
        return job_id

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        # Skipped by another middleware (not a cancellation), e.g. Dramatiq's AgeLimit: it will not run.
        if self._recorded(broker, message) is not None:
            fields = _leaving(message, {"finalized_at": str(self.store.now_ms())})
            allowed = (*NOT_STARTED, "running")
            self._write(
                message,
                lambda: self.records.move(
                    message.message_id, "discarded", fields, self.discarded_ttl_ms, allowed
                ),
                "discarding a skipped job",
            )

    def after_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        # Dead-lettered without being processed (e.g. it could not be decoded for its actor); a
        # job whose last attempt failed has its death recorded already.
        if self._recorded(broker, message) is not None and not in_flight(message).dead_recorded:
            fields = _leaving(message, {"finalized_at": str(self.store.now_ms())})
            written_if_possible(
                lambda: self.records.move(
                    message.message_id, "discarded", fields, self.discarded_ttl_ms, NOT_STARTED
                ),
                "recording a dead letter",
            )


def _leaving(message: Any, fields: dict[str, str]) -> dict[str, str]:
    """``fields`` of a transition that takes a job's message off the broker, with the job's
    payload when its record was filed without it (beside its message in the broker's Redis: see
    ``RedisRecords``)."""
    if in_flight(message).records_here and in_flight(message).follows is None:
        # (a follow-up waiting for its job before it keeps the payload duplicates put in its record)
        fields["args"] = payload_json(message.kwargs)
    return fields


def _error_entry(now_ms: int, message: Any, exception: BaseException) -> dict[str, Any]:
    """An attempt's error as its record keeps it (the traceback from the message's options)."""
    return {
        "at": now_ms,
        "error_type": type(exception).__name__,
        "message": _clean_text(str(exception)[:2000]),
        "traceback": _clean_text(str(message.options.get("traceback", ""))[-4000:]),
    }


def _clean_text(text: str) -> str:
    """Text that survives a UTF-8 round trip (lone surrogates, e.g. from file names, replaced)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _output(message: MessageProxy, result: Any) -> str:
    """A job's output as its record keeps it ('' for None): the handler's return value, checked
    already by the job's function (``epq._actor.make_job_function``)."""
    if result is None:
        return ""
    return output_json(message.actor_name, result, sys.maxsize)
