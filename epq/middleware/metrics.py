"""``Metrics``: the worker-side Prometheus metrics (``epq.metrics``), and a worker's ``/metrics``.

It comes first among the broker's middleware: its ``before_process_message`` runs before any
other (the start), and its ``after_*`` hooks after all others (Dramatiq runs those in reverse), so
that it sees the outcome ``EpqRetries`` decided and the state ``JobRecords`` found at the start.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy

from .. import metrics
from ..backends.base import in_flight, message_of
from ..controls import Snooze
from ..options import DUE_MS
from ..outage import must_requeue
from ..records import SKIPPED

logger = logging.getLogger("epq")

#: Record states at a start that mean the job was delivered again (it ran, or runs, already).
DUPLICATE_START_STATES = ("running", "completed")


def ready_ms(message: MessageProxy | dramatiq.Message[Any]) -> int:
    """When a message became due to run, in ms: enqueued, promoted from the schedule (its due
    time), or put back for a retry at once (Dramatiq's ``requeue_timestamp``), whichever is last."""
    message = message_of(message)
    options = message.options
    ready = message.message_timestamp
    due = options.get(DUE_MS)
    if due is not None and due > ready:
        ready = due
    requeued = options.get("requeue_timestamp")
    if requeued is not None and requeued > ready:
        ready = requeued
    return int(ready)


class Metrics(dramatiq.Middleware):
    """Counts starts and outcomes per kind, times handlers and enqueue-to-start latency, and
    counts duplicate starts, with this process's :class:`epq.metrics.Recorder` (nothing while the
    metrics are off).

    Parameters:
      port: in a Dramatiq worker (``dramatiq epq.actors``), keep the metrics in multiprocess mode
        and serve ``/metrics`` for every process of the worker on this port (``EPQ_METRICS_PORT``);
        None: record only (``EPQ_METRICS``), in the process's own registry.
      host: the address to serve on.
      store: the store-side metrics to serve beside them (``EPQ_METRICS_STORE``).
    """

    def __init__(self, *, port: int | None = None, host: str = "0.0.0.0", store: Any = None) -> None:
        self.port = port
        self.host = host
        self.store = store
        self._path: Path | None = None
        self._server: Any = None

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        # a process of a Dramatiq worker, before any application module is imported
        if self.port is not None:
            self._path = metrics.multiprocess_dir(os.getppid())
        metrics.enable()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.port is None or self._path is None:
            return
        try:
            self._server = metrics.serve(
                metrics.worker_registry(self._path, self.store), self.port, self.host
            )
        except OSError:  # another process of this worker serves it (the first to bind does)
            return
        logger.info("Serving metrics on http://%s:%d/metrics for this worker", self.host, self.port)

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        metrics.flush()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        found = metrics.recorder()
        if found is None:
            return
        plain = message_of(message)
        found.started(plain.actor_name, max(0, time.time() * 1000 - ready_ms(plain)) / 1000)
        in_flight(message).started_at = time.perf_counter()

    def after_process_message(
        self, broker: dramatiq.Broker, message: MessageProxy, *, result: Any = None, exception: Any = None
    ) -> None:
        found = metrics.recorder()
        if found is None:
            return
        state = in_flight(message)
        if exception is None:
            outcome = "completed"
        elif must_requeue(message):
            outcome = "failed"  # given back to its queue: the outcome could not be written
        elif state.cancelled:
            outcome = "cancelled"  # cancelled while it ran (epq.cancellation)
        elif isinstance(exception, Snooze):
            outcome = "snoozed"  # scheduled again, its attempt not spent
        elif message.failed:
            outcome = "discarded"
        else:
            outcome = "retried"
        duration = time.perf_counter() - state.started_at if state.started_at else None
        found.ended(
            message_of(message).actor_name, outcome, duration, state.state_before in DUPLICATE_START_STATES
        )

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        found = metrics.recorder()
        if found is None:
            return
        cancelled = in_flight(message).state_before in SKIPPED
        found.ended(message_of(message).actor_name, "cancelled" if cancelled else "discarded", None, False)
