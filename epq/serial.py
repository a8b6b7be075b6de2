"""Serial keys: jobs with the same key start one at a time, in the order they were enqueued.

A kind with serial keys on (``EPQ_SERIAL_KINDS``) gives each job a key, the value of its
``serial_by`` request field (the endpoint id for the five kinds: one sequence per endpoint,
across kinds), carried as the message option ``SERIAL_KEY``. The state store keeps a sequence
per key, the head first (``StateStore.serial_add`` / ``serial_release``; on Redis a list and two
Lua scripts):

- **enqueue.** A serial job goes into the durable schedule (``epq.schedule``), due at once or at
  its ``run_at``, in one atomic step that appends it to its key's sequence: the head's message
  is due as any scheduled one, and promoters move it to the broker; any other waits held (not
  due) until its job becomes the head. Every broker, bulk enqueue and the outbox relay go
  through that one step.
- **the head's end.** When the head completes, is dead-lettered (its last attempt failed, or
  ``epq.Discard``), or is skipped as cancelled, the worker that had it releases the key
  (:class:`SerialKeys`): the head leaves the sequence and the next job's message becomes due,
  in one atomic step; the Redis broker keeping epq's state then moves it to its queue in one
  script; elsewhere the release claims it in that step (with a lease, as a promoter claims) and
  the process's hand-over threads publish it (:class:`HandOvers`; on RabbitMQ, for a job that
  succeeded, its consumer releases the key with its batch of acks and publishes the next job on
  a connection of its own: :func:`release_at_ack`), so that the worker thread
  does not wait for the broker's confirm. A job cancelled while it waits leaves the sequence
  (:func:`withdraw`).
- **a retry keeps its place**: the failed head stays the head while it waits for its retry
  (which goes into the schedule as any retry), so no later job of its key starts before it. A
  kind in ``EPQ_SERIAL_CONTINUE_ON_FAILURE`` gives its place up instead: the key is released
  when the attempt fails, and the retry joins the end of the sequence. A snooze keeps its place.
- **a crashed worker**: the head's message was never acknowledged, so the broker's own recovery
  (RabbitMQ gives back a lost consumer's messages at once; Redis after its ack timeout,
  docs/decisions.md, decision 38) delivers it again; it is still the head, so order holds and
  the key waits no longer than that recovery.

Times are milliseconds.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy

from .backends.base import Released, StateStore, backend_of, in_flight, note_moves
from .controls import Snooze
from .middleware.common import find_middleware
from .options import SERIAL_KEY
from .outage import must_requeue, until_written
from .schedule import CLAIM_LEASE_MS, promote_soon, publish_claimed

logger = logging.getLogger("epq.serial")


def serial_key(actor: dramatiq.Actor[Any, Any], request: Any) -> str | None:
    """The serial key of a job of ``actor`` made from ``request``: its ``serial_by`` field's value
    when the actor has serial keys on (the ``serial_by`` actor option), else None."""
    field = actor.options.get("serial_by")
    if not field:
        return None
    return str(getattr(request, field))


def is_serial(actor: dramatiq.Actor[Any, Any]) -> bool:
    """Whether ``actor``'s jobs have serial keys."""
    return bool(actor.options.get("serial_by"))


def withdraw(broker: dramatiq.Broker, store: StateStore, job_id: str, fields: Mapping[str, str]) -> None:
    """Take a job cancelled before it started out of its key's sequence (``fields``: its record):
    the next job goes at once if it was the head, and a job further back is never delivered."""
    try:
        args = json.loads(fields.get("args") or "{}")
    except ValueError:
        return
    key = stored_serial_key(broker, fields.get("kind", ""), args)
    if key is not None and store.serial_release(key, job_id, withdraw=True).head:
        promote_soon(broker, store)


def stored_serial_key(broker: dramatiq.Broker, kind: str, args: Mapping[str, Any]) -> str | None:
    """The serial key of a stored job of ``kind`` whose payload is ``args`` (a record's), None
    when its kind has no serial keys (or the payload lacks the field: it never had one)."""
    actor = broker.actors.get(kind)
    if actor is None or not is_serial(actor):
        return None
    try:
        return serial_key(actor, _Args(args))
    except KeyError:
        return None


class _Args:
    """A stored payload's fields as attributes (what :func:`serial_key` reads)."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        self._args = args

    def __getattr__(self, name: str) -> Any:
        try:
            return self._args[name]
        except KeyError:
            raise KeyError(name) from None


#: Threads per worker process that publish the next jobs of released keys (see :class:`HandOvers`).
HANDOVER_THREADS = 4
#: At most this many claimed messages are published by one thread before their claims are
#: forgotten together (one round trip to the state store).
HANDOVER_BATCH = 50


class HandOvers:
    """Publishes, off the worker threads, the messages that releases claimed (the next job of each
    released key), on a few threads of this process started on first use.

    A worker thread that had to publish the next job itself would wait for the broker (on
    RabbitMQ, the publisher confirm) before it could take another job: with every job of a
    serial key handing over to the next, that wait was paid once per job. Here the release (one
    atomic step that claims the next message with a lease) stays on the worker thread, before the
    head's ack, and the publish goes to a queue; each hand-over thread publishes what is waiting,
    a batch at a time, and forgets the batch's claims in one step (``epq.schedule.publish_claimed``).
    What a process that dies leaves claimed and unpublished is published by a promoter when the
    lease ends, as for a promoter that dies; a worker that stops publishes what is waiting first
    (:meth:`stop`, once its worker threads and consumers are done), and a release after that
    publishes on its own thread. Several threads, because one would bound every key's hand-overs together by
    the broker's confirm time."""

    def __init__(self, broker: dramatiq.Broker, store: StateStore, threads: int = HANDOVER_THREADS) -> None:
        self.broker, self.store, self.size = broker, store, threads
        self._waiting: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopped = False
        os.register_at_fork(after_in_child=self._forget_threads)  # (threads do not survive a fork)

    def submit(self, claimed: tuple[str, bytes]) -> None:
        """Publish a claimed ``(entry id, message)`` soon (at once, on this thread, once stopped)."""
        if self._stopped:
            publish_claimed(self.broker, self.store, [claimed])
            return
        if len(self._threads) < self.size:
            self._start()
        self._waiting.put(claimed)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Publish what is waiting, then end the threads (what is left after ``timeout_s`` is
        published by a promoter when its lease ends)."""
        with self._lock:
            self._stopped = True
            threads, self._threads = self._threads, []
        for _ in threads:
            self._waiting.put(None)
        for thread in threads:
            thread.join(timeout_s)

    def _start(self) -> None:
        with self._lock:
            while not self._stopped and len(self._threads) < self.size:
                thread = threading.Thread(target=self._run, name="epq-serial-handover", daemon=True)
                self._threads.append(thread)
                thread.start()

    def _forget_threads(self) -> None:
        self._threads = []
        self._stopped = False
        self._lock = threading.Lock()
        self._waiting = queue.SimpleQueue()

    def _run(self) -> None:
        while True:
            first = self._waiting.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < HANDOVER_BATCH:
                try:
                    more = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            try:
                publish_claimed(self.broker, self.store, batch)
            except Exception:  # (left claimed: a promoter publishes them when the lease ends)
                logger.exception("Could not hand %d serial keys over to their next jobs", len(batch))
            if stop:
                return


class SerialKeys(dramatiq.Middleware):
    """Releases a job's serial key when the job is done with it (see the module docstring).

    Added after ``EpqRetries``, so that its ``after_process_message`` runs first (Dramatiq runs
    ``after_*`` hooks in reverse order): a kind that continues on failure releases the key before
    the retry is scheduled, and the retry joins the end of the sequence."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._handovers: HandOvers | None = None
        self._lock = threading.Lock()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        """Publish the hand-overs still waiting, now that the worker's threads and consumers are
        done (and could release no more keys) and before the broker is closed."""
        self.stop_hand_overs()

    def stop_hand_overs(self) -> None:
        """Publish the hand-overs waiting and end the hand-over threads (a worker's shutdown; a
        test that released keys without a worker, before it closes the broker)."""
        with self._lock:
            handovers = self._handovers
        if handovers is not None:
            handovers.stop()

    @property
    def actor_options(self) -> set[str]:
        return {"serial_by", "serial_continue_on_failure"}

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if SERIAL_KEY not in message.options or must_requeue(message):
            return
        if exception is None:
            self._release(broker, message, at_ack=True)
            return
        if isinstance(exception, Snooze):
            return  # (not a failure: it keeps its place)
        actor = broker.get_actor(message.actor_name)
        if message.options.get("serial_continue_on_failure", actor.options.get("serial_continue_on_failure")):
            self._release(broker, message)
        # else: dead-lettered (``after_nack``) or retried (it keeps its place)

    def after_nack(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """Dead-lettered: its last attempt failed, it was discarded or cancelled while it ran (not
        a message given back to its queue in an outage: it runs again, still the head)."""
        if SERIAL_KEY in message.options and not must_requeue(message):
            self._release(broker, message)

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        """Skipped: cancelled before it started."""
        if SERIAL_KEY in message.options:
            self._release(broker, message)

    def _release(self, broker: dramatiq.Broker, message: MessageProxy, *, at_ack: bool = False) -> None:
        key = str(message.options[SERIAL_KEY])
        job_id = message.message_id
        backend = backend_of(broker)
        if backend is not None and backend.fused:
            # the Redis broker keeping epq's state moves due messages in one script: let it
            released = until_written(lambda: self.store.serial_release(key, job_id), "releasing a serial key")
            if released.head:
                note_moves()  # (the next job's message is due: a promoter moves it)
                promote_soon(broker, self.store)
            return
        flight = in_flight(message)
        if at_ack and flight.batched:
            # its consumer releases the key with the outcomes of its batch, before it acks them
            # (``release_at_ack``): one round trip for the batch, none on this worker thread
            flight.serial_key = key
            return
        flight.serial_key = None  # (released here: a nack after a success)
        # elsewhere the release claims the next job's message (as a promoter would, with a lease)
        # and this process's hand-over threads publish it (see HandOvers)
        released = until_written(
            lambda: self.store.serial_release(key, job_id, lease_ms=CLAIM_LEASE_MS), "releasing a serial key"
        )
        self._hand_over(broker, [released])

    def _hand_over(
        self,
        broker: dramatiq.Broker,
        releases: list[Released],
        publish: Callable[[tuple[str, bytes]], bool] | None = None,
    ) -> None:
        """Have the next jobs that ``releases`` claimed published (by ``publish``, when it takes
        them, else by the hand-over threads), and any they put in the schedule promoted."""
        promote = False
        note_moves(sum(1 for released in releases if released.head))
        for released in releases:
            if released.claimed is not None:
                if publish is None or not publish(released.claimed):
                    self._handovers_of(broker).submit(released.claimed)
            elif released.head:
                promote = True
        if promote:
            promote_soon(broker, self.store)

    def _handovers_of(self, broker: dramatiq.Broker) -> HandOvers:
        with self._lock:
            if self._handovers is None:
                self._handovers = HandOvers(broker, self.store)
            return self._handovers


def release_at_ack(
    broker: dramatiq.Broker,
    releases: Sequence[tuple[str, str]],
    *,
    forget: Sequence[str] = (),
    publish: Callable[[tuple[str, bytes]], bool] | None = None,
) -> None:
    """Release the serial keys of jobs that ended (``(key, job id)``, from ``InFlight.serial_key``),
    for a consumer that writes its batch's outcomes before it acks them (RabbitMQ): in one round
    trip, before the acks, so that a worker that dies first has its jobs given back to run again,
    still heads of their keys. The same round trip forgets the claimed entries ``forget``, whose
    messages the consumer published since (``StateStore.serial_release_many``). The next jobs'
    messages go to ``publish`` (the consumer's own publisher: it returns False for one it cannot
    take), else to the hand-over threads. Raises what the state store raises (the consumer keeps
    the batch and tries again: a key already released is not released twice)."""
    keys = find_middleware(broker, SerialKeys)
    if keys is None or not (releases or forget):
        return
    released = keys.store.serial_release_many(releases, CLAIM_LEASE_MS, forget=forget)
    keys._hand_over(broker, released, publish)


def hand_over(broker: dramatiq.Broker, claimed: tuple[str, bytes]) -> None:
    """Have the hand-over threads publish a claimed ``(entry id, message)`` (one a consumer's own
    publisher could not deliver: refused by the broker, or returned as unroutable)."""
    keys = find_middleware(broker, SerialKeys)
    if keys is not None:
        keys._handovers_of(broker).submit(claimed)
