"""What a handler raises to steer its job, beside succeeding or failing:

    @epq.handler("register_job")
    def register(request: epq.RegisterJobRequest) -> None:
        if endpoint_busy():
            raise epq.Snooze(30)  # again in 30 s; the attempt is not spent
        if endpoint_deleted():
            raise epq.Discard("the endpoint was deleted")  # dead now, no retry, key freed

``EpqRetries`` (``epq.middleware.retries``) acts on them.
"""

from __future__ import annotations

import math

from dramatiq.errors import Retry


class Snooze(Retry):
    """Run the job again after ``seconds``, without spending one of its attempts.

    The job waits in epq's durable schedule as a retry does; its record is ``scheduled`` with
    ``snoozes`` counting its snoozes, and it keeps its uniqueness lock. A job may snooze any
    number of times. (A ``dramatiq.Retry``, so that the worker does not log it as an error.)
    """

    def __init__(self, seconds: float) -> None:
        if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"Snooze takes a number of seconds >= 0, not {seconds!r}")
        self.seconds = seconds
        super().__init__(f"snoozed for {seconds:g} s", delay=int(seconds * 1000))


class Discard(Exception):
    """End the job at once: dead-lettered with ``reason`` as its error, never retried, its
    uniqueness key freed."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class InvalidOutput(Discard):
    """A handler returned a value its job's record cannot keep as its output (not JSON, or larger
    than ``EPQ_OUTPUT_MAX_BYTES`` as JSON): the job is dead at once with this error, since
    another attempt would return the same."""
