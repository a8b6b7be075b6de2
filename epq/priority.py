"""Priority 1-4 across a whole queue: what every broker and every worker process agrees on.

A message's priority is its ``epq_priority`` option (1 is the highest). Each broker keeps the
waiting messages of a queue in priority order (see ``docs/decisions.md``, decision 24):

- Redis: one list per (queue, priority) "lane"; a worker's fetch takes from lane 1 first.
- RabbitMQ: queues declared with ``x-max-priority``; a message's AMQP priority is ``5 - p``.
- stub: a queue object that hands out lane 1 first (``epq.backends.memory.LaneQueue``).

Inside a worker process, messages already fetched (prefetched) wait in Dramatiq's work queue,
which orders them by the actor's priority only. :class:`Priority` replaces that queue with one
that orders by the message's priority too, so a high-priority job fetched after a batch of
low-priority ones starts before them.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import queue
from typing import Any

import dramatiq

from .backends.base import served_queues
from .options import PRIORITY

#: The priorities, highest first.
LANES = (1, 2, 3, 4)
#: The lane of a message without a (valid) ``epq_priority``: a plain Dramatiq actor's message, or
#: one enqueued by hand.
DEFAULT_LANE = 2
#: RabbitMQ's ``x-max-priority`` for epq's queues (AMQP priorities are "higher runs first").
RABBITMQ_MAX_PRIORITY = 4
#: Dramatiq's option for a message's AMQP priority (its RabbitMQ broker's ``broker_priority``).
BROKER_PRIORITY = "broker_priority"


def lane_of(options: dict[str, Any]) -> int:
    """The priority lane of a message's options: ``epq_priority`` when it is 1..4; else, for a
    plain Dramatiq actor's message, its RabbitMQ ``broker_priority`` (:func:`lane_of_amqp`), so
    that every epq broker honours it alike; else 2. (The Lua version: ``lib/lane_of.lua``.)"""
    value = options.get(PRIORITY)
    if _is_number(value) and value in LANES:
        return int(value)  # as the Lua version: 1, 1.0 and JobPriority.HIGH are all lane 1
    amqp = options.get(BROKER_PRIORITY)
    if amqp is not None and _is_number(amqp):
        return lane_of_amqp(amqp)
    return DEFAULT_LANE


def lane_of_amqp(priority: float) -> int:
    """The lane of an AMQP priority (higher first): 4 and above -> 1, 3 -> 2, 2 -> 3, 1 and below
    -> 4; so a plain actor's ``broker_priority`` keeps its order within epq's four, and values
    past 4 rank with 4, as RabbitMQ itself ranks them under ``x-max-priority=4``."""
    return RABBITMQ_MAX_PRIORITY + 1 - max(1, min(RABBITMQ_MAX_PRIORITY, math.floor(priority)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def amqp_priority(lane: int) -> int:
    """The AMQP priority for a lane: 1 -> 4 ... 4 -> 1 (RabbitMQ delivers higher numbers first)."""
    return RABBITMQ_MAX_PRIORITY + 1 - lane


class PriorityWorkQueue(queue.PriorityQueue):  # type: ignore[type-arg]
    """Dramatiq's work queue, ordered by (message priority, actor priority, arrival).

    Dramatiq puts ``_WorkQueueItem(actor.priority, message)`` items; this re-keys each one so
    that the message's own priority (a message without one counts as 2, as on the brokers)
    comes first, and Dramatiq's actor priority only breaks ties within a priority.

    It also holds the messages of paused queues out of the worker threads' reach
    (:meth:`hold_with`, ``epq.pausing``): they are neither counted nor handed out until their
    queue is resumed or their consumer takes them to give back (:meth:`take_held`).
    """

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._pauses: Any = None  # an epq.pausing.Pausing, or None: nothing is held
        self._held: list[Any] = []  # items of paused queues, in the order they were held

    def _put(self, item: Any) -> None:
        lane = lane_of(item.message.options)
        super()._put(dataclasses.replace(item, priority=(lane, item.priority)))

    def _qsize(self) -> int:
        # (asked, under the queue's lock, before every get: the items of queues paused since are
        # moved out, those of queues resumed since moved back; nothing to do while none is)
        pauses = self._pauses
        if pauses is not None and (self._held or pauses.any_held()):
            self._sort_held(pauses)
        return len(self.queue)

    def _sort_held(self, pauses: Any) -> None:
        held = [item for item in self.queue if pauses.held(item.message.queue_name)]
        back = [item for item in self._held if not pauses.held(item.message.queue_name)]
        if not held and not back:
            return
        self._held = [item for item in self._held if pauses.held(item.message.queue_name)] + held
        self.queue = [item for item in self.queue if not pauses.held(item.message.queue_name)] + back
        heapq.heapify(self.queue)

    def hold_with(self, pauses: Any) -> None:
        """Hold the messages of the queues ``pauses`` (an ``epq.pausing.Pausing``) says are paused;
        None: hold nothing (what was held is handed out again)."""
        with self.mutex:
            self._pauses = pauses
            if pauses is None and self._held:
                for item in self._held:
                    heapq.heappush(self.queue, item)
                self._held = []
                self.not_empty.notify_all()

    def take_held(self, queue_name: str) -> list[Any]:
        """Take the held items of ``queue_name`` out (to give their messages back to the broker;
        each then needs its ``task_done``), highest priority first."""
        with self.mutex:
            taken = sorted(item for item in self._held if item.message.queue_name == queue_name)
            if taken:
                self._held = [item for item in self._held if item.message.queue_name != queue_name]
            return taken

    def hold_again(self, items: list[Any]) -> None:
        """Hold again items :meth:`take_held` took and that could not be given back."""
        with self.mutex:
            self._held.extend(items)
            self.not_empty.notify_all()

    def wake(self) -> None:
        """Have the threads waiting for work look again (a queue was resumed)."""
        with self.mutex:
            self.not_empty.notify_all()


class Priority(dramatiq.Middleware):
    """Gives every worker a :class:`PriorityWorkQueue` before its threads and consumers start.

    On RabbitMQ it also declares the worker's queues at boot, so that a queue declared without
    epq's priority argument stops the worker with a clear error rather than failing in a
    consumer thread that retries forever.
    """

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        worker.work_queue = PriorityWorkQueue()
        check_queues = getattr(broker, "check_queues", None)
        if check_queues is not None:
            whitelist = worker.consumer_whitelist
            check_queues(q for q in served_queues(broker) if not whitelist or q in whitelist)
