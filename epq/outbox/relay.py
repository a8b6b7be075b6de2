"""The relay: moves the jobs of committed outbox rows into epq, each exactly once.

A relay repeats, on a psycopg connection of its own (``EPQ_OUTBOX_URL``):

1. in a transaction, take up to :data:`RELAY_BATCH` of the oldest rows that no other relay holds
   (``FOR UPDATE SKIP LOCKED``: many relays share the work, never a row);
2. insert their jobs through epq's insert path (``epq.insert.relay_many``): their records and
   locks, and their messages into the durable schedule (due at once, or at ``run_at``), with a
   mark per job, all in one atomic step of the state store;
3. delete the rows, commit;
4. drop the marks, and have the messages leave the schedule now (``epq.schedule.promote_soon``:
   moved at once on Redis; elsewhere the workers' promoters, woken in this process).

Then, after a full batch, again at once; otherwise it waits for the ``NOTIFY`` the outbox's
trigger sends when a transaction that wrote rows commits, or :data:`POLL_INTERVAL_MS` at most.

Killed at any point, a relay loses nothing and inserts nothing twice. Before step 2 is written
nothing is; once it is, the rows stay until step 3 commits, and whichever relay takes them next
finds their jobs marked and only deletes the rows; the lock on the rows ends with the dead
relay's connection. After step 3, only the marks are left, until their jobs' records would
expire. A job's id comes from its row, so a job is known by the same id before and after.

Every worker process runs one (:class:`Relaying`, when ``EPQ_OUTBOX_URL`` is set and
``EPQ_OUTBOX_RELAY`` is not off); ``epq relay`` runs one on its own.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import dramatiq

from .. import insert
from .._actor import EpqActor
from ..backends.base import backend_of
from ..backends.errors import STORE_ERRORS
from ..errors import BrokerUnavailable, ConfigurationError, describe_error
from ..schedule import promote_soon
from ..settings import get_settings
from . import sql
from .connections import Statements, connect, describe, psycopg

logger = logging.getLogger("epq.outbox")

#: Rows a relay takes in one transaction.
RELAY_BATCH = 100
#: How long an idle relay waits for a notification before it looks anyway.
POLL_INTERVAL_MS = 1000
#: How long a relay waits after an error (the database or the state store unreachable).
RETRY_MS = 1000
#: How often a waiting relay checks that it is to stop.
_STOP_CHECK_S = 0.25


class Relay:
    """Moves committed outbox rows into epq (see the module docstring).

    Parameters:
      broker: the broker epq set up (its state store gets the jobs).
      url: the outbox's database (``EPQ_OUTBOX_URL``).
      table: the outbox table (``EPQ_OUTBOX_TABLE``).
      batch: rows per transaction.
      poll_interval_ms: the longest an idle relay waits without a notification.
      after_insert: called with the job ids of a batch once they are inserted and before their
        rows are deleted (tests make a relay die there).
    """

    def __init__(
        self,
        broker: dramatiq.Broker,
        url: str,
        table: str,
        *,
        batch: int = RELAY_BATCH,
        poll_interval_ms: int = POLL_INTERVAL_MS,
        after_insert: Callable[[list[str]], None] | None = None,
    ) -> None:
        backend = backend_of(broker)
        if backend is None:
            raise ConfigurationError("a relay needs a broker epq.setup() built")
        if batch < 1:
            raise ValueError(f"batch must be 1 or more, not {batch}")
        self.broker = broker
        self.backend = backend
        self.url = url
        self.table = table
        self.batch = batch
        self.poll_interval_ms = poll_interval_ms
        self.after_insert = after_insert
        settings = get_settings()
        self._cancelled_ttl_ms = int(settings.completed_retention.total_seconds() * 1000)
        self._discarded_ttl_ms = int(settings.discarded_retention.total_seconds() * 1000)
        self._connection: Any = None

    # ---- one batch ------------------------------------------------------------------------------

    def relay_once(self) -> int:
        """Move one batch of rows (see the module docstring); return how many rows it had.

        Raises:
          BrokerUnavailable: the database or the state store cannot be reached (the batch's
            transaction is rolled back: its rows wait for the next try).
          ConfigurationError: the outbox table does not exist.
        """
        try:
            return self._relay_batch()
        except psycopg().OperationalError as exc:
            self.close()
            raise BrokerUnavailable(f"the outbox database failed: {describe(exc)}") from exc

    def _relay_batch(self) -> int:
        connection = self._connect()
        db = Statements(connection, self.table)
        with connection.transaction():
            rows = db.rows(sql.claim(self.table), (self.batch,))
            if not rows:
                return 0
            jobs = [
                insert.OutboxJob(self._actor(kind), kind, job_id, payload, int(created_ms))
                for _, job_id, kind, payload, _, created_ms in rows
            ]
            outcomes = insert.relay_many(
                self.broker,
                jobs,
                cancelled_ttl_ms=self._cancelled_ttl_ms,
                discarded_ttl_ms=self._discarded_ttl_ms,
            )
            if self.after_insert is not None:
                self.after_insert([job.job_id for job in jobs])
            db.rows(sql.relayed(self.table), ([row[0] for row in rows],))
        self._after(jobs, outcomes)
        return len(rows)

    def _actor(self, kind: str) -> EpqActor | None:
        actor = self.broker.actors.get(kind)
        return actor if isinstance(actor, EpqActor) else None

    def _after(self, jobs: Sequence[insert.OutboxJob], outcomes: Sequence[str]) -> None:
        """What follows a batch's commit: marks dropped, due messages on their way, log lines."""
        pairs = list(zip(jobs, outcomes, strict=True))
        marked = [job.job_id for job, outcome in pairs if outcome != insert.INVALID]
        try:
            self.backend.records.forget_relayed(marked)
        except STORE_ERRORS as exc:  # (they expire with their jobs' records)
            logger.warning("Could not drop the relay marks of %d jobs: %s", len(marked), describe_error(exc))
        if insert.RELAYED in outcomes:
            try:
                promote_soon(self.broker, self.backend.state)
            except STORE_ERRORS as exc:  # (the promoters move them at their next look)
                logger.warning("Could not promote relayed jobs at once: %s", describe_error(exc))
        already = sum(1 for _, outcome in pairs if outcome == insert.ALREADY_RELAYED)
        if already:
            logger.info("%d outbox row(s) had been relayed by a relay that stopped before deleting them; "
                        "deleted now, their jobs not enqueued again", already)  # fmt: skip
        for job, outcome in pairs:
            if outcome == insert.DUPLICATE:
                logger.info(
                    "Outbox job %s (%s) not enqueued: another job took its unique key since it was "
                    "committed (its record is cancelled)", job.job_id, job.kind,
                )  # fmt: skip
            elif outcome == insert.INVALID:
                logger.error(
                    "Outbox job %s (%s) cannot be enqueued here: its record (discarded) says why "
                    "(`epq jobs show %s`)", job.job_id, job.kind, job.job_id,
                )  # fmt: skip

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set, waiting out errors (logged)."""
        failing = False
        while not stop.is_set():
            try:
                if self.relay_once() >= self.batch:
                    continue
                if failing:
                    logger.info("The relay of %s works again", self.table)
                    failing = False
                self._wait(stop)
            except Exception as exc:
                if not failing:
                    log = logger.exception if _unexpected(exc) else logger.warning
                    log("The relay of %s failed (trying again every %d ms until it works): %s",
                        self.table, RETRY_MS, describe(exc))  # fmt: skip
                failing = True
                self.close()
                stop.wait(RETRY_MS / 1000)
        self.close()

    def _wait(self, stop: threading.Event) -> None:
        """Until a notification, ``poll_interval_ms``, or ``stop``."""
        connection = self._connect()
        deadline = time.monotonic() + self.poll_interval_ms / 1000
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for _ in connection.notifies(timeout=min(remaining, _STOP_CHECK_S), stop_after=1):
                return

    def _connect(self) -> Any:
        if self._connection is None or self._connection.closed:
            self.close()
            connection = connect(self.url)
            try:
                connection.execute(sql.listen(self.table))
            except BaseException:
                connection.close()
                raise
            self._connection = connection
        return self._connection

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()


def _unexpected(exc: Exception) -> bool:
    """Whether an error of the loop is a bug rather than something unreachable or missing."""
    expected: tuple[type[BaseException], ...] = (BrokerUnavailable, ConfigurationError, *STORE_ERRORS)
    return not isinstance(exc, expected)


class Relaying(dramatiq.Middleware):
    """Runs a :class:`Relay` in a thread of every worker process of the broker (from boot to
    shutdown), on the outbox ``url`` and ``table``."""

    def __init__(self, url: str, table: str) -> None:
        self.url = url
        self.table = table
        self._relays: dict[int, tuple[threading.Event, threading.Thread]] = {}
        self._lock = threading.Lock()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        relay = Relay(broker, self.url, self.table)
        stop = threading.Event()
        thread = threading.Thread(target=relay.run, args=(stop,), name="epq-relay", daemon=True)
        with self._lock:
            self._relays[id(worker)] = (stop, thread)
        thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        with self._lock:
            running = self._relays.pop(id(worker), None)
        if running is not None:
            stop, thread = running
            stop.set()
            thread.join(5)
