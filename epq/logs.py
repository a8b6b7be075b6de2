"""Job-aware logs: while a worker thread runs a job, :func:`current_job` tells which (its id,
kind and attempt), and :class:`JobContextFilter` adds them to every log record written meanwhile,
by epq, Dramatiq or the handler, as ``epq_job_id``, ``epq_kind`` and ``epq_attempt`` (``-``
outside a job), for a formatter to show::

    handler.addFilter(epq.logs.JobContextFilter())
    handler.setFormatter(logging.Formatter(
        "%(levelname)s [%(epq_kind)s %(epq_job_id)s #%(epq_attempt)s] %(message)s"))

``JobLogContext`` (the middleware that sets it) is always on: one context variable set per job.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any, NamedTuple

import dramatiq
from dramatiq.broker import MessageProxy


class JobContext(NamedTuple):
    """The job a worker thread is running."""

    job_id: str
    kind: str
    #: 1 for the first run, 2 for the first retry, ...
    attempt: int


_current: ContextVar[JobContext | None] = ContextVar("epq_job", default=None)


def current_job() -> JobContext | None:
    """The job this thread is running, or None."""
    return _current.get()


class JobContextFilter(logging.Filter):
    """Adds ``epq_job_id``, ``epq_kind`` and ``epq_attempt`` to each record (``-`` outside a
    job); lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        job = _current.get()
        record.epq_job_id = job.job_id if job is not None else "-"
        record.epq_kind = job.kind if job is not None else "-"
        record.epq_attempt = job.attempt if job is not None else "-"
        return True


class JobLogContext(dramatiq.Middleware):
    """Sets :func:`current_job` for the time a job is processed. First among the broker's
    middleware, so that the other middleware's log lines about the job carry it too."""

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        attempt = int(message.options.get("retries", 0)) + 1
        _current.set(JobContext(message.message_id, message.actor_name, attempt))

    def after_process_message(
        self, broker: dramatiq.Broker, message: MessageProxy, *, result: Any = None, exception: Any = None
    ) -> None:
        _current.set(None)

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        _current.set(None)
