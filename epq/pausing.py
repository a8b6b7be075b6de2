"""Pausing a queue, cluster-wide: no worker process starts its jobs until it is resumed.

``QueueService.pause_queue`` notes the queue in the state store (``StateStore.pause_queue``); jobs
still enqueue and wait in it, in priority order. Every worker process reads the paused queues
(one round trip, at most every :data:`POLL_INTERVAL_MS`) and stops starting their jobs at two
points (``docs/decisions.md``, decision 63):

- **its consumers** (:class:`PausableConsumer`, mixed into every epq broker's): the consumer of a
  paused queue fetches nothing more and hands back what it fetched and has not passed on (the
  Redis consumer's fetched batch; the messages RabbitMQ delivered into pika's buffer, by
  cancelling the AMQP consumer until the queue is resumed), while it keeps its connection alive
  (heartbeats, acks of the jobs still running);
- **its work queue** (``epq.priority.PriorityWorkQueue``): messages of a paused queue fetched
  already, waiting for a free worker thread, are held out of the threads' reach, and the queue's
  consumer gives them back to the broker (``GivesBack.give_back``: to the front of their
  priority lane on Redis, to their place on RabbitMQ), untouched: not started, their attempt not
  spent, their record still ``available``.

Jobs running when the pause lands run to their end. The durable schedule's promoter, retries and
periodic jobs keep working: what falls due goes onto the paused queue and waits there, counted in
its depth and lag (``QueueService.queues``).

A worker process that boots while a queue is paused reads the pause before its consumers fetch
anything; until it has read the paused queues once (the state store unreachable), it fetches
from no queue. Times are milliseconds.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import dramatiq

from .backends.base import StateStore, in_flight

logger = logging.getLogger("epq.pausing")

#: How often a worker process reads the paused queues: a pause takes effect within about this
#: long, plus a consumer's idle poll.
POLL_INTERVAL_MS = 250
#: How long the consumer of a paused queue waits between looks at whether it was resumed.
PAUSED_POLL_MS = 100
#: At most one warning this often while the state store cannot be read for paused queues.
_WARN_EVERY_S = 30.0


class Pausing(dramatiq.Middleware):
    """Knows which queues are paused, for the consumers and the work queues of a worker process.

    The paused queues are read from the state store when they are asked for and were last read
    more than ``interval_ms`` ago (by whichever thread asks: the consumers of a running worker
    ask all the time); the other threads meanwhile go by what was read last.

    Parameters:
      store: the state store the pauses are kept in.
      interval_ms: how often to read them.
    """

    def __init__(self, store: StateStore, *, interval_ms: int = POLL_INTERVAL_MS) -> None:
        self.store = store
        self.interval_ms = interval_ms
        self._view: frozenset[str] | None = None  # None: never read
        self._next_read = 0.0  # monotonic seconds
        self._reading = threading.Lock()
        self._warned_at = 0.0
        self._work_queues: list[Any] = []  # the PriorityWorkQueue of each worker on this broker

    # ---- what is paused ----------------------------------------------------------------------

    def paused(self, queue_name: str) -> bool:
        """Whether ``queue_name`` is paused (also while the paused queues were never read), read
        again if the last read is older than ``interval_ms``."""
        now = time.monotonic()
        if now >= self._next_read and self._reading.acquire(blocking=False):
            try:
                self._read(now)
            finally:
                self._reading.release()
        return self.held(queue_name)

    def held(self, queue_name: str) -> bool:
        """Whether ``queue_name`` is paused, as last read (no round trip: the work queues ask)."""
        view = self._view
        return view is None or queue_name in view

    def any_held(self) -> bool:
        """Whether any queue is paused (or the paused queues were never read), as last read."""
        view = self._view
        return view is None or bool(view)

    def refresh(self) -> frozenset[str] | None:
        """Read the paused queues now; return them (None if they could never be read)."""
        with self._reading:
            self._read(time.monotonic())
        return self._view

    def _read(self, now: float) -> None:
        self._next_read = now + self.interval_ms / 1000
        try:
            view = frozenset(self.store.paused_queues())
        except Exception as exc:
            if now - self._warned_at >= _WARN_EVERY_S:
                self._warned_at = now
                logger.warning(
                    "Could not read the paused queues (trying again; %s): %r",
                    "no queue is fetched until they are read" if self._view is None else "as last read",
                    exc,
                )
            return
        before, self._view = self._view, view
        if before is None or view == before:
            return
        for queue_name in sorted(view ^ before):
            logger.info("Queue %r %s", queue_name, "paused" if queue_name in view else "resumed")
        if before - view:
            for work_queue in list(self._work_queues):
                work_queue.wake()  # (threads waiting for work see the resumed queues' messages now)

    # ---- the worker ----------------------------------------------------------------------------

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # (after Priority, which gives the worker its PriorityWorkQueue)
        work_queue = worker.work_queue
        if hasattr(work_queue, "hold_with"):
            work_queue.hold_with(self)
            self._work_queues.append(work_queue)
        view = self.refresh()  # a worker booting while a queue is paused starts none of its jobs
        for queue_name in sorted(view or ()):
            logger.warning(
                "Queue %r is paused: its jobs wait until `epq queues resume %s`", queue_name, queue_name
            )

    def before_consumer_thread_shutdown(self, broker: dramatiq.Broker, thread: Any) -> None:
        # The worker's threads have stopped (its consumers stop after them): what its work queue
        # holds becomes visible again, so that the worker gives it back to the broker as it stops
        # (``Worker.stop``).
        work_queue: Any = getattr(thread, "work_queue", None)
        if work_queue is not None and work_queue in self._work_queues:
            work_queue.hold_with(None)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if worker.work_queue in self._work_queues:
            self._work_queues.remove(worker.work_queue)

    def give_back_held(self, queue_name: str) -> int:
        """Give the messages of ``queue_name`` the work queues hold back to the broker, each
        through the consumer that fetched it; return how many."""
        count = 0
        for work_queue in list(self._work_queues):
            items = work_queue.take_held(queue_name)
            try:
                while items:
                    message = items[0].message
                    consumer = in_flight(message).consumer
                    if consumer is not None:
                        consumer.give_back(message)
                    items.pop(0)
                    work_queue.task_done()
                    count += 1
            finally:
                if items:  # (a connection error: kept for the next try)
                    work_queue.hold_again(items)
        if count:
            logger.info("Gave %d prefetched messages of paused queue %r back", count, queue_name)
        return count


class PausableConsumer:
    """Consumer mixin (first among an epq consumer's bases, whose ``__next__`` it is: the
    consumer's own is its :meth:`next_message`): the consumer of a paused queue fetches nothing
    (see the module docstring). A consumer gives each message it fetches its
    own reference (``InFlight.consumer``), through which a held message is given back.

    A broker's consumer says how it waits while paused (:meth:`wait_paused`: hand back its own
    buffer, keep its connection alive) and how it starts again (:meth:`resume_fetching`)."""

    queue_name: str
    broker: Any
    _pausing: Pausing | bool | None = False  # False: not looked up yet

    def __next__(self) -> Any:
        pausing = self._pausing
        if pausing is False:
            pausing = self._pausing = _pausing_of(self.broker)
        if isinstance(pausing, Pausing):
            if pausing.paused(self.queue_name):
                self.wait_paused()
                pausing.give_back_held(self.queue_name)
                return None
            self.resume_fetching()
        message = self.next_message()
        if message is not None:
            in_flight(message).consumer = self
        return message

    def next_message(self) -> Any:
        """The broker's consumer's ``__next__`` (what this mixin's ``__next__`` calls when the
        queue is not paused)."""
        raise NotImplementedError  # pragma: no cover - every epq consumer has one

    def wait_paused(self) -> None:
        """Give back what this consumer fetched and has not passed on; wait a little
        (:data:`PAUSED_POLL_MS`) keeping the connection alive."""
        time.sleep(PAUSED_POLL_MS / 1000)

    def resume_fetching(self) -> None:
        """Undo what :meth:`wait_paused` did to the connection, if anything (cheap when nothing)."""


def _pausing_of(broker: Any) -> Pausing | None:
    for middleware in getattr(broker, "middleware", ()):
        if isinstance(middleware, Pausing):
            return middleware
    return None
