"""The priority of a message, and the work queue that hands a worker's prefetched messages to its
threads by priority."""

from __future__ import annotations

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
