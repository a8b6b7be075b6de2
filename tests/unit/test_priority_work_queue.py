"""The priority of a message, and the work queue that hands a worker's prefetched messages to its
threads by priority."""

from __future__ import annotations

from queue import Empty
from typing import Any

import dramatiq
import pytest
from dramatiq.worker import _WorkQueueItem

import epq
from epq.priority import PriorityWorkQueue, lane_of


def test_the_work_queue_orders_prefetched_messages_by_their_priority() -> None:
    # Given messages fetched low priority first, as a worker prefetches a backlog
    work = PriorityWorkQueue()
    fetched = [(4, "a"), (4, "b"), (2, "c"), (1, "d"), (3, "e"), (1, "f")]
    for priority, name in fetched:
        message = dramatiq.Message(queue_name="q", actor_name="x", args=(), kwargs={}, options={})
        message.options.update(epq_priority=priority, name=name)
        work.put(_WorkQueueItem(0, message))
    # When the worker threads take them
    taken = [work.get().message.options["name"] for _ in fetched]
    # Then priority 1 comes first, FIFO within a priority
    assert taken == ["d", "f", "c", "e", "a", "b"]


def test_the_message_priority_comes_before_the_actor_priority() -> None:
    work = PriorityWorkQueue()
    low_actor = dramatiq.Message(
        queue_name="q", actor_name="x", args=(), kwargs={}, options={"epq_priority": 1}
    )
    high_actor = dramatiq.Message(
        queue_name="q", actor_name="y", args=(), kwargs={}, options={"epq_priority": 4}
    )
    plain = dramatiq.Message(queue_name="q", actor_name="z", args=(), kwargs={}, options={})
    work.put(_WorkQueueItem(0, plain))  # a plain Dramatiq message counts as priority 2
    work.put(_WorkQueueItem(0, high_actor))
    work.put(_WorkQueueItem(10, low_actor))
    assert [work.get().message for _ in range(3)] == [low_actor, plain, high_actor]


@pytest.mark.parametrize(
    ("options", "lane"),
    [
        ({"epq_priority": 1}, 1),
        ({"epq_priority": 4}, 4),
        ({"epq_priority": epq.JobPriority.HIGH}, 1),
        ({"epq_priority": 3.0}, 3),
        ({}, 2),
        ({"epq_priority": 9}, 2),
        ({"epq_priority": "1"}, 2),
        ({"epq_priority": True}, 2),
    ],
)
def test_a_message_without_a_valid_priority_is_normal(options: dict[str, Any], lane: int) -> None:
    assert lane_of(options) == lane


class _Pauses:
    """What the work queue asks of ``epq.pausing.Pausing``: the queues paused, as last read."""

    def __init__(self) -> None:
        self.paused: set[str] = set()

    def held(self, queue_name: str) -> bool:
        return queue_name in self.paused

    def any_held(self) -> bool:
        return bool(self.paused)


def _item(queue_name: str, priority: int, name: str) -> Any:
    message = dramatiq.Message(queue_name=queue_name, actor_name="x", args=(), kwargs={}, options={})
    message.options.update(epq_priority=priority, name=name)
    return _WorkQueueItem(0, message)


def test_the_work_queue_holds_a_paused_queues_messages_until_resumed_or_taken_back() -> None:
    # Given a work queue holding for a paused default queue, with messages of two queues
    pauses = _Pauses()
    work = PriorityWorkQueue()
    work.hold_with(pauses)
    pauses.paused.add("default")
    for queue_name, priority, name in [
        ("default", 2, "a"),
        ("events", 3, "b"),
        ("default", 1, "c"),
        ("default", 4, "d"),
    ]:
        work.put(_item(queue_name, priority, name))

    # Then the threads get only the other queue's message; the paused one's are not counted
    assert work.get_nowait().message.options["name"] == "b"
    with pytest.raises(Empty):
        work.get_nowait()
    assert work.qsize() == 0

    # When the consumer takes one queue's held messages (to give them back), they come highest
    # priority first and are gone from the work queue
    assert [i.message.options["name"] for i in work.take_held("default")] == ["c", "a", "d"]
    assert work.take_held("default") == []

    # And messages held again come back to the threads once their queue is resumed
    work.hold_again([_item("default", 3, "e")])
    with pytest.raises(Empty):
        work.get_nowait()
    pauses.paused.clear()
    assert work.get_nowait().message.options["name"] == "e"


def test_the_held_messages_are_handed_out_again_when_the_worker_stops_holding() -> None:
    # (as the worker stops: Dramatiq's own requeue of the work queue then gives them back)
    pauses = _Pauses()
    pauses.paused.add("default")
    work = PriorityWorkQueue()
    work.hold_with(pauses)
    work.put(_item("default", 2, "a"))
    assert work.qsize() == 0
    work.hold_with(None)
    assert work.get_nowait().message.options["name"] == "a"
