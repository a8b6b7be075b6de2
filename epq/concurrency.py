"""Per-queue concurrency within a worker process: how many jobs of each queue run at once.

The Go package gives each queue its own worker budget (River's per-queue ``MaxWorkers``), so that
a flood in one queue cannot take every worker. epq does the same in each worker process: a queue's
budget is the most jobs of it that one process runs at once (``EPQ_QUEUE_CONCURRENCY``, over the
Go package's defaults in :data:`GO_QUEUE_CONCURRENCY`).

How it holds (``docs/decisions.md``, decision 57): a worker process keeps at most its queue's
budget of that queue's messages unacknowledged. Every epq broker's ``consume`` gives the queue's
consumer :func:`capped_prefetch` as its prefetch (Dramatiq's own bound on the messages a consumer
holds, on every broker), and a message stays unacknowledged from its fetch until its job has
ended and its outcome is written. So at most ``budget`` jobs of the queue run at once, whatever
the process's threads, and no thread waits for a slot: a queue at its budget fetches nothing more
until one of its jobs ends, and the threads run other queues' jobs meanwhile. Every run passes
through its queue's consumer: delayed jobs, retries and snoozes wait in epq's schedule and are
promoted onto the queue when due.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from .models import JobQueue

#: The Go package's budgets: the most jobs of each of its queues one worker runs at once.
GO_QUEUE_CONCURRENCY: Mapping[str, int] = MappingProxyType(
    {
        JobQueue.DEFAULT.value: 10,
        JobQueue.EXECUTION.value: 5,
        JobQueue.EVENTS.value: 20,
        JobQueue.MAINTENANCE.value: 2,
    }
)
#: The budget of a queue that has none of its own (one added to ``EPQ_QUEUES``): the Go package's
#: worker concurrency (its runner's ``Concurrency: 10``), as its ``default`` queue.
DEFAULT_QUEUE_CONCURRENCY = 10


def queue_budgets(queues: Iterable[str], configured: Mapping[str, int]) -> dict[str, int]:
    """The budget of each of ``queues``: ``configured``'s (``EPQ_QUEUE_CONCURRENCY``), else the
    Go package's, else :data:`DEFAULT_QUEUE_CONCURRENCY`."""
    return {
        queue: configured.get(queue, GO_QUEUE_CONCURRENCY.get(queue, DEFAULT_QUEUE_CONCURRENCY))
        for queue in queues
    }


def threads_for(budgets: Mapping[str, int]) -> int:
    """Worker threads a process needs so that every queue can run its whole budget at once."""
    return sum(budgets.values())


def capped_prefetch(budgets: Mapping[str, int], queue_name: str, prefetch: int) -> int:
    """The prefetch of a consumer of ``queue_name``: ``prefetch`` (Dramatiq's: twice the worker's
    threads, or ``dramatiq_queue_prefetch``), but at most the queue's budget. Queues without a
    budget (Dramatiq's delay queues ``<queue>.DQ``, whose messages wait for their time and are then
    enqueued on their queue; queues epq does not serve) keep ``prefetch``."""
    budget = budgets.get(queue_name)
    return prefetch if budget is None else min(prefetch, budget)


def describe(budgets: Mapping[str, int]) -> str:
    """``default 10, events 20``: the budgets, for a log line."""
    return ", ".join(f"{queue} {budget}" for queue, budget in budgets.items())
