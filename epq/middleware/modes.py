"""Uniqueness modes: what a duplicate (same kind and unique key, inside the window) does.

- ``keep_first`` (the default): it is refused; the first job wins (``Uniqueness``).
- ``replace``: while the job holding the key has not started, the duplicate's payload replaces
  its own; once it started, the first duplicate becomes one follow-up job, which runs after it
  ends (never beside it), and later ones replace the follow-up's payload; after it ended, the
  duplicate is a new job (latest wins).
- ``debounce``: as ``replace``, and each duplicate moves the waiting job's run time later (the
  kind's debounce delay), never past its maximum wait from the job's creation.

The insert decides (``epq.insert``: ``_with_mode``, ``_resolve``; one atomic step of the state
store, ``RecordStore.resolve_duplicate``). This module is the worker's half, ``Modes``: a job
inserted in a replacing mode reads its record once started, for the payload a duplicate put in
its place while it waited, and for the job it follows, which must end first (docs/decisions.md,
decision 62).
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy

from ..backends.base import RecordStore, in_flight
from ..options import UNIQUE_MODE
from ..outage import WorkerStopping, requeue_instead, state_errors, until_written

logger = logging.getLogger("epq")

#: How long a follow-up whose job before it still runs snoozes before it looks again (seconds).
FOLLOW_UP_POLL_S = 0.5

#: The job the job this worker thread is about to run follows, when that has not ended yet.
_follows: ContextVar[str | None] = ContextVar("epq_follows", default=None)


def follows_unended() -> str | None:
    """In a handler's worker thread: the id of the job the current job follows when that has not
    ended yet (the job then snoozes instead of running: ``epq._actor``), else None."""
    return _follows.get()


class Modes(dramatiq.Middleware):
    """Once ``JobRecords`` started a job inserted in mode ``replace`` or ``debounce`` (message
    option ``epq.options.UNIQUE_MODE``), read its record (``RecordStore.mode_start``, one atomic
    read): a payload that replaced its own becomes the message's, so the handler runs the newest;
    a follow-up whose job before it has not ended waits (it snoozes ``FOLLOW_UP_POLL_S``, its
    attempt not spent), so that two jobs of one key never run at once. Must come after
    ``JobRecords``: read before the start, a payload replaced in between would be lost."""

    def __init__(self, records: RecordStore) -> None:
        self.records = records

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        _follows.set(None)
        if UNIQUE_MODE not in message.options:
            return
        try:
            with state_errors("reading a job's record as it starts"):
                read = lambda: self.records.mode_start(message.message_id)  # noqa: E731
                args, waits_for = until_written(read, "starting a job")
        except WorkerStopping:
            requeue_instead(message)  # (it starts again, and reads again, where it is fetched next)
            raise
        if waits_for is not None:
            in_flight(message).follows = waits_for
            _follows.set(waits_for)
            logger.debug("%s job %s waits for job %s", message.actor_name, message.message_id, waits_for)
            return
        if args is not None:
            kwargs: dict[str, Any] = message.kwargs
            kwargs.clear()
            kwargs.update(json.loads(args))

    def after_process_message(
        self, broker: dramatiq.Broker, message: MessageProxy, *, result: Any = None, exception: Any = None
    ) -> None:
        _follows.set(None)

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        _follows.set(None)
