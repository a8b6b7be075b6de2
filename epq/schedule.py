"""Durable delayed execution: delayed messages wait in the state store, not in a worker.

Dramatiq's own delay puts a delayed message on a ``.DQ`` queue, from which a worker takes it and
holds it unacknowledged in memory until its time. epq's brokers keep every delayed message
(``run_at``, ``delay``, retry backoff) in the state store's schedule instead (the broker side is
``epq.backends.base.DurableDelays``), and a :class:`Promoter` thread in each worker process
moves due messages onto their queues:

- Redis broker with its state in the same Redis: one Lua script moves due messages into the
  broker's queues atomically, so a message is promoted exactly once whatever crashes.
- Otherwise (RabbitMQ with ``EPQ_STATE_URL``, the stub broker): due entries are *claimed* with
  a lease in one atomic step (two promoters never claim the same entry), published, then
  forgotten. If a promoter dies between claim and publish, the lease runs out and another
  promoter publishes the entry; a death in the instant between publish and forget publishes it
  again (at-least-once, as every delivery; handlers are idempotent). When the broker is gone, the
  claimed entries not published are given back at once, due again in ``RETRY_PUBLISH_MS``, and
  so go out about a second after the broker is back rather than when their lease ends.

Times are milliseconds.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import dramatiq

from .backends.base import StateStore, backend_of, note_moves
from .backends.errors import broker_gone
from .errors import StateUnavailable, describe_error
from .middleware.common import find_middleware
from .outage import WorkerStopping, until_written

logger = logging.getLogger("epq.schedule")

#: How often an idle promoter looks for due messages.
PROMOTE_INTERVAL_MS = 100
#: How often each worker process's promoter drops expired jobs from the listing indexes, and how
#: many of the oldest jobs of each index it looks at (a listing drops those it meets too).
PRUNE_INTERVAL_S = 300.0
PRUNE_PER_INDEX = 1000
#: How many messages one promotion step moves at most (claimed ones are published one by one,
#: so this also bounds how long a claim is held before it is forgotten).
PROMOTE_BATCH = 200
#: How long a claimed entry stays claimed before another promoter may take it over.
CLAIM_LEASE_MS = 30_000
#: When the broker is gone, how soon the due messages that could not be published are tried again
#: (the promoter itself waits about as long before its next step).
RETRY_PUBLISH_MS = 1_000


def promote_due(
    broker: dramatiq.Broker, store: StateStore, *, limit: int = PROMOTE_BATCH
) -> tuple[int, int | None]:
    """Move due scheduled messages onto their queues; return the count and the next due time."""
    now = store.now_ms()
    native = getattr(broker, "promote_due", None)  # (an epq broker: see DurableDelays)
    moved: tuple[int, int | None] | None = native(now, limit) if native is not None else None
    if moved is not None:
        note_moves(moved[0])
        return moved  # the broker moved them in one atomic step
    claimed, next_due = store.schedule_claim(now, CLAIM_LEASE_MS, limit)
    note_moves(len(claimed))
    return publish_claimed(broker, store, claimed), next_due


def publish_claimed(broker: dramatiq.Broker, store: StateStore, claimed: list[tuple[str, bytes]]) -> int:
    """Publish claimed schedule entries (``(entry id, message)``), then forget those published;
    return how many were. One that cannot go is left claimed: it is published again when its
    lease ends."""
    done: list[str] = []
    give_back_ms: int | None = None  # set when the broker is gone: the unpublished rest goes back
    try:
        for entry, data in claimed:
            message = dramatiq.Message.decode(data)
            try:
                until_written(lambda m=message: _publish(broker, m), "promoting a scheduled job")  # type: ignore[misc]
            except WorkerStopping:
                give_back_ms = 0  # (another process's promoter takes them at once)
                raise
            except _PublishFailed as failed:
                cause = failed.__cause__
                if cause is not None and broker_gone(cause):
                    give_back_ms = RETRY_PUBLISH_MS
                    raise cause from None
                # this one message cannot go (e.g. its queue needs `epq migrate-queues`): the
                # others still do, and it is tried again when its lease runs out
                logger.error("Could not promote scheduled message %s; trying again later: %s",
                             entry, describe_error(cause or failed))  # fmt: skip
                continue
            except Exception:
                logger.exception("Could not promote scheduled message %s; trying again later", entry)
                continue
            done.append(entry)
    finally:
        # forgotten once published, even if the state store blinks meanwhile: an entry left
        # claimed would be published again when its lease runs out
        until_written(lambda: store.schedule_ack(done), "forgetting promoted schedule entries")
        if give_back_ms is not None:
            published = set(done)
            _give_back(store, [entry for entry, _ in claimed if entry not in published], give_back_ms)
    if len(done) < len(claimed):  # pragma: no cover - only when publishing raised
        logger.warning(
            "Promoted %d of %d due messages; the rest retry when their lease ends", len(done), len(claimed)
        )
    return len(done)


def _give_back(store: StateStore, entries: list[str], after_ms: int) -> None:
    """Release claimed entries whose publish did not happen, due again ``after_ms`` from now
    rather than when their lease ends (a broker back a second later must not wait it out)."""
    if not entries:
        return
    try:
        store.schedule_release(entries, store.now_ms() + after_ms)
    except Exception as exc:  # (their lease still brings them back)
        logger.warning("Could not give back %d unpublished schedule entries (their lease will): %r",
                       len(entries), exc)  # fmt: skip


class _PublishFailed(Exception):
    """Publishing a promoted message failed for another reason than an unreachable state store
    (which is waited out: see ``_publish``)."""


def _publish(broker: dramatiq.Broker, message: dramatiq.Message[Any]) -> None:
    """Publish a promoted message. Its record is set available on the way, before the publish:
    when the state store is unreachable there, trying again is safe, and waiting beats leaving the
    entry to its lease (it would run 30 s late). Other errors are not tried again here."""
    try:
        broker.enqueue(message)
    except StateUnavailable:
        raise
    except Exception as exc:
        raise _PublishFailed(str(exc)) from exc


class Promoter:
    """A daemon thread that promotes due messages until stopped."""

    def __init__(
        self, broker: dramatiq.Broker, store: StateStore, *, interval_ms: int = PROMOTE_INTERVAL_MS
    ) -> None:
        self.broker = broker
        self.store = store
        self.interval_ms = interval_ms
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epq-promoter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Look for due messages now rather than at the end of the current wait."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        pruned_at = time.monotonic() - PRUNE_INTERVAL_S  # (once at boot, then every interval)
        while not self._stop.is_set():
            wait_ms = self.interval_ms
            if time.monotonic() - pruned_at >= PRUNE_INTERVAL_S:
                pruned_at = time.monotonic()
                self._prune()
            try:
                moved, next_due = promote_due(self.broker, self.store)
                if moved >= PROMOTE_BATCH:
                    continue
                if next_due is not None:
                    wait_ms = min(wait_ms, max(0, next_due - self.store.now_ms()))
            except Exception:
                logger.exception("Promoting scheduled messages failed; trying again in 1 s")
                wait_ms = RETRY_PUBLISH_MS
            self._wake.wait(wait_ms / 1000)
            self._wake.clear()

    def _prune(self) -> None:
        """Drop expired jobs from the listing indexes (``RecordStore.prune_indexes``)."""
        backend = backend_of(self.broker)
        if backend is None:
            return
        try:
            backend.records.prune_indexes(PRUNE_PER_INDEX)
        except Exception:
            logger.exception("Pruning the job listing indexes failed; trying again later")


class Scheduling(dramatiq.Middleware):
    """Runs a :class:`Promoter` in every worker process of the broker (from boot to shutdown)."""

    def __init__(self, store: StateStore, *, interval_ms: int = PROMOTE_INTERVAL_MS) -> None:
        self.store = store
        self.interval_ms = interval_ms
        self._promoters: dict[int, Promoter] = {}
        self._lock = threading.Lock()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        promoter = Promoter(broker, self.store, interval_ms=self.interval_ms)
        with self._lock:
            self._promoters[id(worker)] = promoter
        promoter.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        with self._lock:
            promoter = self._promoters.pop(id(worker), None)
        if promoter is not None:
            promoter.stop()

    def wake(self) -> None:
        """Wake this process's promoters (see :func:`promote_soon`)."""
        with self._lock:
            promoters = list(self._promoters.values())
        for promoter in promoters:
            promoter.wake()


def promote_soon(broker: dramatiq.Broker, store: StateStore) -> None:
    """Have messages just added to the schedule, due at once, leave it soon: moved now where the
    broker moves due messages in one atomic step (the Redis broker with epq's state in its
    server), else by this process's promoters, woken (a process without a worker leaves them to
    the workers' promoters, which look every ``PROMOTE_INTERVAL_MS``). Never claims and
    publishes itself: a process that dies between the publish and the forget would have the
    messages published twice when their lease runs out (see the module docstring)."""
    native = getattr(broker, "promote_due", None)
    if native is not None:
        while True:
            moved = native(store.now_ms(), PROMOTE_BATCH)
            if moved is not None:
                note_moves(moved[0])
            if moved is None or moved[0] < PROMOTE_BATCH:
                break
        if moved is not None:
            return
    scheduling = find_middleware(broker, Scheduling)
    if scheduling is not None:
        scheduling.wake()
