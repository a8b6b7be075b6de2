"""What epq asks of a backend, in one place.

A backend is a Dramatiq broker with epq's extras (:class:`EpqBroker`), a state store
(:class:`StateStore`: uniqueness locks, the durable schedule, the clock) and a record store
(:class:`RecordStore`: the job records). epq's semantics (``epq.middleware``, ``epq.schedule``,
``epq.insert``, ``epq.service``) use nothing else of a backend. Three backends implement them:
``epq.backends.memory`` (Dramatiq's stub broker), ``epq.backends.redis`` and
``epq.backends.rabbitmq`` (with a Redis for the state).

Times are milliseconds since the epoch.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.common import q_name
from dramatiq.errors import QueueJoinTimeout

from ..concurrency import capped_prefetch
from ..options import DUE_MS, SERIAL_KEY, SNOOZES

#: Every name epq gives a lock or key in a store starts with this.
KEY_PREFIX = "epq:"

RecordFields = Mapping[str, str]
"""A record's fields: names to text (times are milliseconds since the epoch, as text)."""

Clock = Callable[[], float]
"""Returns the current time in seconds since the epoch (like ``time.time``)."""


#: Every uniqueness lock's name starts with this.
UNIQUE_PREFIX = f"{KEY_PREFIX}unique:"
#: The mark of a job a relay moved from the outbox (``RecordStore.create_relayed``): this, then
#: its id.
RELAYED_PREFIX = f"{KEY_PREFIX}relayed:"


def unique_lock_key(kind: str, digest: str) -> str:
    """The name of a uniqueness lock: the kind and a digest of the unique fields."""
    return f"{UNIQUE_PREFIX}{kind}:{digest}"


def lock_kind(key: str) -> str:
    """The kind of a uniqueness lock's name (see :func:`unique_lock_key`)."""
    return key[len(UNIQUE_PREFIX) :].rpartition(":")[0]


# ---- uniqueness lock holders --------------------------------------------------------------------


class Holder(NamedTuple):
    """What a uniqueness lock's value records of the job holding it:
    ``<job id>|<created ms>|<due ms>|<queue>|<priority>``, so that a duplicate can be answered
    with the holder's details even without its record. The Lua scripts read the job id the same
    way (``lua/lib/holder_id.lua``)."""

    job_id: str
    created_ms: int | None = None
    due_ms: int | None = None
    queue: str | None = None
    priority: int | None = None

    @staticmethod
    def tail(created_ms: int, due_ms: int, queue_name: str, priority: object) -> str:
        """The value after the job id (``|created|due|queue|priority``)."""
        return f"|{created_ms}|{due_ms}|{q_name(queue_name)}|{priority}"

    @classmethod
    def parse(cls, value: str) -> Holder:
        """The parts of a holder value; only ``job_id`` when the rest cannot be read."""
        parts = value.split("|")
        try:
            return cls(parts[0], int(parts[1]), int(parts[2]), parts[3], int(parts[4]))
        except (IndexError, ValueError):
            return cls(parts[0])


def holder_id(holder: str) -> str:
    """The job id of a holder value."""
    return Holder.parse(holder).job_id


# ---- the state store ---------------------------------------------------------------------------


class StateStore(Protocol):
    """Uniqueness locks, the durable schedule, the periodic jobs' state and the clock, shared by
    every process of a deployment: the broker's Redis, the Redis named by ``EPQ_STATE_URL`` next
    to RabbitMQ, or memory (with an injectable clock) for the stub broker."""

    def acquire_unique(self, key: str, holder: str, ttl_ms: int) -> str | None:
        """Take ``key`` for ``holder`` for ``ttl_ms`` unless someone else holds it.

        Returns None when taken (or already held by the same holder id), otherwise the current
        holder's value. Atomic across every process using the store.
        """

    def release_unique(self, key: str, job_id: str) -> bool:
        """Delete ``key`` if the holder stored there is ``job_id``; return whether it was."""

    def get_unique(self, key: str) -> str | None:
        """The holder value stored at ``key``, or None."""

    def get_unique_many(self, keys: Sequence[str]) -> list[str | None]:
        """``get_unique`` for each key, in one round trip."""

    def now_ms(self) -> int:
        """The store's clock, in milliseconds since the epoch."""

    def schedule_add(self, data: bytes, due_ms: int, *, entry: str | None = None) -> str:
        """Keep an encoded message until ``due_ms``; return the schedule entry's id (``entry``, or a
        new one). An entry that exists, waiting or claimed, is left as it is: adding it again is
        harmless."""

    def schedule_remove(self, entry_ids: Sequence[str]) -> None:
        """Forget entries that were never claimed (a batch that failed half-way)."""

    def schedule_claim(
        self, now_ms: int, lease_ms: int, limit: int
    ) -> tuple[list[tuple[str, bytes]], int | None]:
        """Claim up to ``limit`` due entries for ``lease_ms`` (entries whose lease ran out are due
        again). Return ``(entry id, message)`` pairs and the next due time in the schedule."""

    def schedule_ack(self, entry_ids: Sequence[str]) -> None:
        """Forget claimed entries once their messages are on the broker."""

    def schedule_release(self, entry_ids: Sequence[str], due_ms: int) -> None:
        """Give claimed entries back to the schedule, due at ``due_ms``, before their lease ends
        (their publish failed: they are tried again then, not when the lease runs out). Entries
        no longer claimed are left as they are."""

    def schedule_pending(self, queue_name: str) -> int:
        """Entries, waiting or claimed, whose messages go to ``queue_name``. Reads every entry:
        for ``broker.join`` in tests, not for hot paths."""

    def schedule_drop(self, queue_name: str) -> int:
        """Forget the entries, waiting or claimed, whose messages go to ``queue_name``; return how
        many there were. Reads every entry: for ``broker.flush``, not for hot paths."""

    def schedule_size(self) -> int:
        """Entries waiting or claimed."""

    def schedule_claimed(self) -> int:
        """Entries claimed by a promoter and not yet forgotten."""

    def serial_held(self) -> int:
        """Messages of jobs with serial keys held until their turn (not yet in the schedule)."""

    def schedule_due(self, now_ms: int) -> int:
        """Entries due at ``now_ms`` that no promoter has claimed yet."""

    def serial_add(self, key: str, job_id: str, data: bytes, due_ms: int, *, entry: str) -> str:
        """Add a message of a job with serial key ``key`` (``epq.serial``) to the schedule at its
        turn, atomically: a job that is not in ``key``'s sequence joins its end; the message of
        the sequence's head goes into the schedule as ``schedule_add`` puts it, any other waits
        held (not due) until its job becomes the head. Returns the entry id."""

    def serial_release(self, key: str, job_id: str, *, withdraw: bool = False, lease_ms: int = 0) -> Released:
        """If ``job_id`` heads ``key``'s sequence, drop it and put the message of the job after it
        into the schedule, due when it was to be (atomically). With ``lease_ms``, that message,
        if due, is claimed instead (as ``schedule_claim`` claims) for the caller to publish and
        forget (``schedule_ack``). With ``withdraw`` (a job cancelled before its turn), a job
        further back leaves the sequence too, its held message dropped."""

    def serial_release_many(
        self, releases: Sequence[tuple[str, str]], lease_ms: int, *, forget: Sequence[str] = ()
    ) -> list[Released]:
        """:meth:`serial_release` of each ``(key, job id)``, with ``lease_ms``, and
        :meth:`schedule_ack` of the claimed entries ``forget`` (messages that releases before
        claimed and that are on the broker now), in one round trip where the store allows (a
        batch of acks releasing their keys)."""

    def serial_sequence(self, key: str) -> list[str]:
        """The ids of the jobs of ``key``'s sequence, the head first."""

    def unique_locks(self) -> dict[str, int]:
        """Uniqueness locks held, per kind. Scans the store: for a scrape, not for hot paths."""

    def add_refused(self, counts: Mapping[str, int]) -> None:
        """Add to the count of enqueues refused as duplicates, per kind (``epq.metrics`` writes
        each process's refusals here, so that any process can serve the deployment's total)."""

    def refused(self) -> dict[str, int]:
        """Enqueues refused as duplicates since the store began, per kind."""

    def request_cancel(self, job_id: str, ttl_ms: int) -> None:
        """Leave a request to cancel running job ``job_id`` for ``ttl_ms`` (``epq.cancellation``:
        the worker running it reads it)."""

    def cancel_requests(self, job_ids: Sequence[str]) -> list[str]:
        """Those of ``job_ids`` with a cancel request, in one round trip."""

    def forget_cancel(self, job_id: str) -> None:
        """Drop the cancel request of ``job_id``, if any."""

    def pause_queue(self, queue_name: str) -> bool:
        """Note ``queue_name`` as paused (``epq.pausing``: every worker process stops starting its
        jobs); return whether it was not paused before. Kept until :meth:`resume_queue`."""

    def resume_queue(self, queue_name: str) -> bool:
        """Note ``queue_name`` as no longer paused; return whether it was paused."""

    def paused_queues(self) -> set[str]:
        """The queues paused, in one round trip (every worker process polls it)."""

    def periodic_states(self, names: Sequence[str]) -> list[dict[str, str]]:
        """The state of each periodic job's schedule (``epq.periodic_jobs``), in one round trip:
        ``since`` (when a ticker first saw it), ``tick`` (the last tick noted), ``job`` (its job
        id) and ``at`` (when it was noted), times in ms as text; ``{}`` for a schedule without."""

    def periodic_begin(self, name: str, now_ms: int, ttl_ms: int) -> int:
        """Note ``now_ms`` as when a ticker first saw schedule ``name``, unless one did before
        (atomic); return when one first did. The state is kept ``ttl_ms`` from now."""

    def periodic_mark(self, name: str, tick_ms: int, job_id: str, now_ms: int, ttl_ms: int) -> bool:
        """Note tick ``tick_ms`` of schedule ``name`` as enqueued as ``job_id`` at ``now_ms``,
        unless a later tick is noted already (atomic: the noted tick only moves forward); the
        state is then kept ``ttl_ms``. Returns whether it was noted."""

    def close(self) -> None:
        """Release connections."""


# ---- the record store --------------------------------------------------------------------------


class Released(NamedTuple):
    """What :meth:`StateStore.serial_release` did: whether the job was its key's head, and the
    next job's message if it claimed it (entry id, message)."""

    head: bool
    claimed: tuple[str, bytes] | None = None


class NewRecord(NamedTuple):
    """A record to write, with the uniqueness lock to take first (``lock_key`` '' for none)."""

    job_id: str
    fields: RecordFields
    ttl_ms: int
    lock_key: str = ""
    holder: str = ""
    lock_ttl_ms: int = 0


class RelayedJob(NamedTuple):
    """A job a relay moves from the outbox (``epq.outbox``) into the state store: its record (with
    the lock it takes) and its message as it waits in the schedule (``entry``, the encoded
    message, and when it is due), see :meth:`RecordStore.create_relayed`."""

    record: NewRecord
    entry: str
    data: bytes
    due_ms: int
    #: Its serial key ('' for none): it joins its key's sequence (as ``StateStore.serial_add``).
    serial_key: str = ""


#: What :meth:`RecordStore.resolve_duplicate` did (uniqueness modes, ``epq.middleware.modes``).
REPLACED = "replaced"  # the waiting holder's payload replaced (and, debounce, its run time moved)
FOLLOW_UP = "follow-up"  # a new job that runs after the holder, which had started
TAKEN_OVER = "taken over"  # a new job: the key's holder had ended, or the lock was free
#: The states of a job that will not run again: a duplicate in a replacing mode starts a new job.
ENDED_STATES = ("completed", "discarded", "cancelled")
#: The record fields of the uniqueness modes: the job's mode (its worker reads the record as it
#: starts it), how many duplicates replaced its payload, and the job a follow-up runs after.
MODE_FIELD, REPLACED_FIELD, AFTER_FIELD = "unique_mode", "replaced", "after"


class Duplicate(NamedTuple):
    """A duplicate enqueued in mode ``replace`` or ``debounce`` (:meth:`RecordStore.resolve_duplicate`):
    its record (``scheduled``, with the lock it takes over), its message as it waits in the
    schedule (``entry``, the encoded message, when it is due), its payload as JSON, and, for
    ``debounce``, how far it moves a waiting job (ms) and the longest that job may wait from its
    creation (ms); ``window_ms``: the kind's window (a lock held while a job waits lasts that
    much past its run time)."""

    mode: str
    record: NewRecord
    entry: str
    data: bytes
    due_ms: int
    args_json: str
    debounce_ms: int = 0
    max_wait_ms: int = 0
    window_ms: int = 0


class Move(NamedTuple):
    """One transition of :meth:`RecordStore.move_many` (the arguments of ``move``)."""

    job_id: str
    state: str
    fields: RecordFields
    ttl_ms: int
    allowed_from: Sequence[str] = ()


class RecordStore(Protocol):
    """Job records: a record per job with the fields of :class:`epq.JobRecord` (as strings; times
    in ms), per ``queue|priority|state`` counters and an index of dead (discarded) jobs, each
    transition one atomic step. Of the completed jobs, the newest ``completed_max`` (a store's
    setting) keep their record: completing one more forgets the oldest, with its count; of the
    dead jobs, likewise the newest ``dead_max``."""

    def create(self, record: NewRecord) -> str | None:
        """Take the record's uniqueness lock (if it has one) and write it (``fields`` include
        ``state``, ``queue`` and ``priority``), atomically. Returns None when written; when
        another job holds the lock, writes nothing and returns that job's holder value."""

    def create_many(self, records: Sequence[NewRecord]) -> list[str | None]:
        """``create`` for each record, in order, in one round trip."""

    def create_relayed(self, jobs: Sequence[RelayedJob]) -> list[str | bool | None]:
        """For each job of a relay's batch, in order, in one atomic step for the batch: unless the
        job is marked relayed already (``True``: nothing written), take its lock (when another
        job holds it: that holder value, nothing written), write its record, add its message to
        the schedule (as ``StateStore.schedule_add``) and mark it relayed for as long as its
        record's ttl (``None``). A relay that dies before it forgets the outbox rows of a batch it
        wrote here finds them marked when it (or another relay) takes the rows again."""

    def forget_relayed(self, job_ids: Sequence[str]) -> None:
        """Drop the relayed marks of jobs whose outbox rows are gone."""

    def move(
        self, job_id: str, state: str, fields: RecordFields, ttl_ms: int, allowed_from: Sequence[str] = ()
    ) -> str | None:
        """Set ``state`` (if the current state is in ``allowed_from``, or always when empty).

        Returns the state before, or None when there is no record."""

    def start(self, job_id: str, now_ms: int, ttl_ms: int) -> str | None:
        """Mark the job running, one more attempt; returns the state before (``cancelled``: not
        started)."""

    def move_many(self, moves: Sequence[Move]) -> list[str | None]:
        """``move`` for each, in order, in one round trip (each its own atomic step); the state
        before of each."""

    def start_many(self, job_ids: Sequence[str], now_ms: int, ttl_ms: int) -> list[str | None]:
        """``start`` for each job, in order, in one round trip; the state before of each."""

    def fail(
        self, job_id: str, state: str, error: Mapping[str, Any], fields: RecordFields, ttl_ms: int
    ) -> None:
        """Append an attempt error and set ``state``."""

    def resolve_duplicate(self, duplicate: Duplicate, now_ms: int) -> tuple[str, str]:
        """Decide, in one atomic step, what a duplicate in mode ``replace`` or ``debounce`` does
        with the job holding its lock (``epq.middleware.modes``), and do it; returns the outcome and the id
        of the job it concerns:

        - ``REPLACED`` (the holder's id): the holder, inserted in one of these modes, has not
          started (``available`` or ``scheduled``, or a follow-up waiting for the job it follows):
          its record's ``args`` become the duplicate's, ``replaced`` counts one more; in
          ``debounce`` a first wait in the schedule (entry ``<id>:0``) moves to ``now +
          debounce_ms``, never past ``created_at + max_wait_ms``, and the lock lasts the window past it.
        - ``FOLLOW_UP`` (the duplicate's id): the holder started (or reads no replaced payload:
          inserted in ``keep_first``): the duplicate's record is written with ``after`` = the
          holder's id, its message added to the schedule, and the lock is the duplicate's.
        - ``TAKEN_OVER`` (the duplicate's id): the holder ended (or has no record), or the lock
          is free: the duplicate is written and scheduled the same way, without ``after``.

        Replacements are counted per kind (:meth:`replacements`)."""

    def mode_start(self, job_id: str) -> tuple[str | None, str | None]:
        """What the worker of a job inserted in a replacing mode reads once it started it, in one
        atomic read: the payload (JSON) a duplicate put in its record (None when none did), and
        the job it follows when that has not ended yet (None otherwise: it may run)."""

    def replacements(self) -> dict[str, int]:
        """Kind -> how many duplicates replaced a waiting job's payload (every process's)."""

    def get(self, job_id: str) -> dict[str, str] | None: ...

    def get_many(self, job_ids: Sequence[str]) -> list[dict[str, str] | None]:
        """``get`` for each id, in one round trip."""

    def find_ids(self, prefix: str, limit: int) -> list[str]:
        """Ids of (at most ``limit``) jobs with a record whose id starts with ``prefix``, in no
        particular order. Scans every record: for operators, not for hot paths.

        Raises:
          ValueError: ``prefix`` fails :func:`epq.records.check_id_prefix`.
        """

    def delete(self, job_id: str) -> None: ...

    def bury(self, job_id: str, ttl_ms: int) -> str | None:
        """Delete a job's record (as ``delete``) and leave a tombstone for ``ttl_ms``: the job's
        message is skipped wherever it waits (``start`` returns ``deleted``, as ``cancelled`` for
        a cancelled job), no transition writes the record again (``move`` returns ``deleted``,
        ``fail`` writes nothing), and nothing reads, lists or counts it. Returns the state the
        record had, or None when there was none."""

    def list_ids(
        self, filters: Mapping[str, str], *, newest_first: bool, after: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        """Ids of up to ``limit`` jobs whose record has every field of ``filters`` (names of
        ``epq.records.INDEXED_FIELDS``) at its value, in creation order (``newest_first`` or
        oldest first), from after position ``after`` (``epq.records.index_position`` of a job of
        an earlier page); and the position of the last one when more may follow (None when
        the listing is at its end). Read from indexes kept by every transition, not by scanning
        the records."""

    def prune_indexes(self, per_index: int) -> int:
        """Drop from the listing indexes jobs whose record has expired, looking at the oldest
        ``per_index`` of each index; how many were dropped (a sweep: workers call it now and then;
        a listing drops those it meets too)."""

    def dead_ids(self, limit: int) -> list[str]:
        """Ids of discarded jobs, newest first."""

    def forget_dead(self, job_ids: Iterable[str]) -> None: ...

    def counters(self) -> dict[str, int]:
        """``queue|priority|state`` -> number of jobs in that state."""

    def oldest_waiting(self) -> dict[tuple[str, int], int]:
        """``(queue, priority)`` -> when the oldest job waiting to start there (``available``)
        became due, in ms; queues and priorities with no waiting job are left out."""


def counter_group(queue: str, priority: object, state: str) -> str:
    """The name of a record counter (``queue|priority|state``), as the scripts make it too."""
    return f"{queue}|{priority}|{state}"


def split_counter_group(group: str) -> tuple[str, int, str]:
    """``(queue, priority, state)`` of a counter's name."""
    queue, priority, state = group.rsplit("|", 2)
    return queue, int(priority), state


# ---- bulk enqueue in one call (the Redis backend with its records beside the queues) ------------


class BulkGroup(NamedTuple):
    """What the jobs of one group of a bulk enqueue share: their record fields but ``args`` and
    ``unique_key``, and, for jobs that take a lock, their lock's holder value after the job id
    (see ``Holder.tail``) and ttl."""

    fields: RecordFields
    holder_tail: str = ""
    lock_ttl_ms: int = 0


class BulkJob(NamedTuple):
    """An immediate job for a bulk enqueue (``EpqRedisBroker.bulk_call``): its message, its group
    (jobs of one group pass the same object), its payload as JSON and the key it locks ('' for
    none)."""

    message: Any
    group: BulkGroup
    args_json: str
    lock_key: str = ""
    #: The job's endpoint id ('' for none), a field of its record (``epq.records.new_record_fields``).
    endpoint_id: str = ""


# ---- the broker --------------------------------------------------------------------------------


class EpqBroker(Protocol):
    """What epq asks of a broker besides Dramatiq's ``Broker`` interface (every epq broker is
    a :class:`DurableDelays`)."""

    def enqueue_batch(
        self, items: Sequence[tuple[dramatiq.Message[Any], int | None]], *, planned: bool = False
    ) -> list[dramatiq.Message[Any]]: ...

    def purge_dead_letters(self, queues: Iterable[str]) -> None: ...

    def count_dead_letters(self, queues: Iterable[str]) -> dict[str, int]: ...


@dataclass(frozen=True)
class Backend:
    """What epq keeps beside a broker it built, reachable from the broker as ``broker.epq`` (see
    :func:`backend_of`): the one place epq's context rides on a Dramatiq object."""

    #: The URL the broker was built from, its password masked (for messages).
    url: str
    state: StateStore
    records: RecordStore
    #: The records and locks live in the broker's own Redis: an enqueue writes them in the same
    #: script as the message, and the ack completes the record (see ``EpqRedisBroker``).
    fused: bool = False
    #: The most jobs of each queue a worker process runs at once (``epq.concurrency``): each
    #: queue's consumer holds at most that many of its messages (``DurableDelays.prefetch_for``).
    queue_concurrency: Mapping[str, int] = field(default_factory=dict)
    #: The outbox table enqueues with ``tx=`` write to (``EPQ_OUTBOX_TABLE``; ``epq.outbox``).
    outbox_table: str = "epq_outbox"


@dataclass
class InFlight:
    """What epq notes on a message proxy while a worker has it, as ``proxy.epq`` (see
    :func:`in_flight`): the one place its per-message context rides on a Dramatiq object."""

    #: Its record lives in the broker's own Redis (``Backend.fused``): the worker starts it, and
    #: the ack completes it, on the broker's connections.
    records_here: bool = False
    #: Set when it succeeded and ``records_here``: the ack completes its record, kept this long,
    #: with its output (JSON, '' for none).
    complete_ttl_ms: int | None = None
    output: str = ""
    #: Give it back to its queue instead of acking or dead-lettering it (``epq.outage``).
    requeue: bool = False
    #: Its consumer writes the outcome of a job that succeeded together with other jobs', just
    #: before it acks them (RabbitMQ: see ``EpqRabbitmqConsumer``).
    batched: bool = False
    #: Set when it succeeded and ``batched``: the transition its consumer writes before the ack.
    outcome: Move | None = None
    #: Set when it ended and ``batched``, with serial keys (``epq.serial``): its consumer releases
    #: this key before the ack, with the batch's outcomes, rather than the worker thread.
    serial_key: str | None = None
    #: The state its record had when the worker started it (``RecordStore.start``).
    state_before: str | None = None
    #: When its handler's run began (``time.perf_counter``), for the metrics.
    started_at: float = 0.0
    #: Its attempt's failure was recorded as its death (``JobRecords.attempt_failed``): the nack
    #: that dead-letters it has nothing more to write (and must not undo a retry an operator asked
    #: for in between).
    dead_recorded: bool = False
    #: A request to cancel it reached its worker while it ran (``epq.cancellation``).
    cancel_requested: bool = False
    #: Its worker recorded it cancelled while it ran (``EpqRetries``).
    cancelled: bool = False
    #: A follow-up (uniqueness modes) whose job before it has not ended: it snoozes instead of
    #: running, and its record keeps the payload duplicates put there (``epq.middleware.modes``).
    follows: str | None = None
    #: The consumer that fetched it: a message of a paused queue is given back through it
    #: (``epq.pausing``).
    consumer: Any = None


def message_of(proxy: Any) -> Any:
    """The ``dramatiq.Message`` a message proxy wraps (a message: itself). Read a proxied
    message's fields from it on a worker's hot path: each field read through the proxy is a failed
    attribute lookup first (``MessageProxy.__getattr__``), about a microsecond apiece."""
    return proxy._message if isinstance(proxy, MessageProxy) else proxy


def in_flight(proxy: Any) -> InFlight:
    """The :class:`InFlight` of a message proxy, made on first use."""
    state = getattr(proxy, "epq", None)
    if not isinstance(state, InFlight):
        state = InFlight()
        proxy.epq = state
    return state


def backend_of(broker: object) -> Backend | None:
    """The :class:`Backend` of a broker epq built, None for any other broker."""
    backend = getattr(broker, "epq", None)
    return backend if isinstance(backend, Backend) else None


def display_url(broker: dramatiq.Broker) -> str:
    """The masked URL a broker was built from (``"<unknown>"`` for brokers epq did not build)."""
    backend = backend_of(broker)
    return backend.url if backend is not None else "<unknown>"


def enqueue_planned(
    broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None, payload_json: str
) -> None:
    """Publish a message ``epq.insert`` planned (see ``DurableDelays.enqueue_planned``); on a
    broker that is not an epq one, its ``enqueue``."""
    if isinstance(broker, DurableDelays):
        broker.enqueue_planned(message, delay=delay, payload_json=payload_json)
    else:
        broker.enqueue(message, delay=delay)


def _work_queue(queue_name: str) -> bool:
    """Not one of Dramatiq's delay (``.DQ``) or dead-letter (``.XQ``) queues."""
    return not queue_name.endswith((".DQ", ".XQ"))


def is_served(broker: dramatiq.Broker, queue_name: str, declared: Collection[str] | None = None) -> bool:
    """Whether a broker serves ``queue_name``: it is declared (``declared``: the broker's declared
    queues, read already), and not one of Dramatiq's delay (``.DQ``) or dead-letter (``.XQ``)
    queues."""
    if declared is None:
        declared = broker.get_declared_queues()
    return _work_queue(queue_name) and queue_name in declared


def served_queues(broker: dramatiq.Broker) -> list[str]:
    """The queues a broker serves (see :func:`is_served`), sorted."""
    return sorted(filter(_work_queue, broker.get_declared_queues()))


_moves_begun = 0
_moves_lock = threading.Lock()


def note_moves(count: int = 1) -> None:
    """Count messages this process's threads began to put on queues on their own: moved or
    claimed out of the schedule (a promotion, the next job of a released serial key), or a
    periodic job's tick enqueued. Called once the move or claim is made, so that one counted
    before :func:`moves_begun` is read shows on its queue, claimed, or due."""
    global _moves_begun
    with _moves_lock:
        _moves_begun += count


def moves_begun() -> int:
    """What :func:`note_moves` counted so far in this process (``DurableDelays.join`` and
    ``epq.testing.drain`` look again when the count moved while they joined the queues: such a
    message may reach a queue after it was joined)."""
    return _moves_begun


def schedule_entry(message: dramatiq.Message[Any]) -> str:
    """The id of a message's entry in the schedule: one entry per job, attempt and snooze, so that
    a scheduling sent again (after a lost reply, see ``epq.outage``; by a relay taking over a
    dead one's rows, see ``epq.outbox``) writes the same entry, not a second one."""
    entry = f"{message.message_id}:{message.options.get('retries', 0)}"
    if SNOOZES in message.options:
        entry += f":z{message.options[SNOOZES]}"
    return entry


def to_be_scheduled(message: dramatiq.Message[Any], delay: int | None) -> bool:
    """Whether an enqueue goes into the schedule: a delayed one, and a job with a serial key that
    has not been through it yet (it waits there for its turn: ``epq.serial``)."""
    if delay and delay > 0:
        return True
    options = message.options
    return SERIAL_KEY in options and DUE_MS not in options


def scheduled_delay(delay: int | None) -> int:
    """The delay the enqueue hooks see of a message going into the schedule: at least 1 ms, so
    that a serial job due at once reads as scheduled, not as one back from the schedule."""
    return max(int(delay or 0), 1)


def schedule_message(
    store: StateStore, message: dramatiq.Message[Any], due_ms: int, *, entry: str | None = None
) -> str:
    """Add ``message`` (as it waits: ``DurableDelays.to_schedule``) to the schedule until
    ``due_ms``; a job's with a serial key at its turn (``StateStore.serial_add``)."""
    key = message.options.get(SERIAL_KEY)
    if key is None:
        return store.schedule_add(message.encode(), due_ms, entry=entry)
    return store.serial_add(
        str(key), message.message_id, message.encode(), due_ms, entry=entry or schedule_entry(message)
    )


def scheduled_queue(data: bytes) -> str | None:
    """The queue an encoded message in the schedule goes to (None when it cannot be read)."""
    try:
        queue = json.loads(data)["queue_name"]
    except (ValueError, KeyError, TypeError):
        return None
    return queue if isinstance(queue, str) else None


#: How often ``DurableDelays.join`` looks at the schedule while the queue's messages wait there.
JOIN_POLL_S = 0.05


def _left_ms(deadline: float | None, queue_name: str) -> int | None:
    """The ms left before ``deadline`` (a ``time.monotonic()``); past it, the join timed out."""
    if deadline is None:
        return None
    left = int((deadline - time.monotonic()) * 1000)
    if left <= 0:
        raise QueueJoinTimeout(queue_name)  # type: ignore[no-untyped-call]
    return left


class DurableDelays:
    """Broker mixin: a delayed ``enqueue`` goes to the state store's schedule, not to a ``.DQ``
    (see ``epq.schedule``), and ``enqueue_batch`` enqueues many messages at once.

    ``epq`` is set by :func:`epq.backends.factory.build_backend`; without it the broker behaves
    as Dramatiq's.
    """

    epq: Backend | None = None
    #: ``foreign_hooks``' answers, and the middleware they were found among.
    _hooks_seen: tuple[tuple[dramatiq.Middleware, ...], dict[str, list[dramatiq.Middleware]]] | None = None

    @property
    def epq_store(self) -> StateStore | None:
        """The state store whose schedule keeps this broker's delayed messages."""
        return self.epq.state if self.epq is not None else None

    def foreign_hooks(self, name: str) -> list[dramatiq.Middleware]:
        """The broker's middleware whose ``name`` hook is not Dramatiq's no-op (one set on the
        instance counts), but for epq's own middleware that an insert stands in for
        (``epq_skips_planned``) and those idle for now (an ``epq_idle()`` that says so, such as
        tracing before a tracer provider is set): an insert skips emitting a signal nobody else
        listens to. Found again whenever the broker's middleware change."""
        broker: Any = self
        middleware = tuple(broker.middleware)
        if self._hooks_seen is None or self._hooks_seen[0] != middleware:
            self._hooks_seen = (middleware, {})
        hooks = self._hooks_seen[1]
        found = hooks.get(name)
        if found is None:
            base = getattr(dramatiq.Middleware, name)
            found = hooks[name] = [
                m
                for m in middleware
                if getattr(getattr(m, name), "__func__", getattr(m, name)) is not base
                and not getattr(m, "epq_skips_planned", False)
            ]
        if any(hasattr(m, "epq_idle") for m in found):
            return [m for m in found if not (hasattr(m, "epq_idle") and m.epq_idle())]
        return found

    def enqueue_planned(
        self, message: dramatiq.Message[Any], *, delay: int | None = None, payload_json: str | None = None
    ) -> dramatiq.Message[Any]:
        """Publish a message ``epq.insert`` planned, its lock and record already written
        (``payload_json``: its payload as JSON). Here as ``enqueue``; a broker may run only the
        hooks of ``foreign_hooks`` instead (epq's own act on unplanned messages only)."""
        return self.enqueue(message, delay=delay)

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        broker: Any = self
        store = self.epq_store
        if not to_be_scheduled(message, delay) or store is None:
            return super().enqueue(message, delay=None)  # type: ignore[misc, no-any-return]
        message, due_ms = self._to_schedule(message, delay or 0)
        delay = scheduled_delay(delay)
        broker.emit_before("enqueue", message, delay)
        schedule_message(store, message, due_ms, entry=schedule_entry(message))
        broker.emit_after("enqueue", message, delay)
        return message

    def _to_schedule(self, message: dramatiq.Message[Any], delay: int) -> tuple[dramatiq.Message[Any], int]:
        """The message as it waits in the schedule, and its due time."""
        assert self.epq_store is not None
        due_ms = self.epq_store.now_ms() + int(delay)
        return self.to_schedule(message, due_ms), due_ms

    def to_schedule(self, message: dramatiq.Message[Any], due_ms: int) -> dramatiq.Message[Any]:
        """``message`` as it waits in the schedule until ``due_ms`` (when it became due rides in
        it, with any option the broker needs to move it from there: see ``promote_due``)."""
        options: dict[str, Any] = {DUE_MS: due_ms, **self._scheduled_options()}
        message = message.copy(queue_name=q_name(message.queue_name), options=options)
        message.options.pop("eta", None)
        return message

    def _scheduled_options(self) -> dict[str, Any]:
        """Options a message gets as it goes into the schedule (a broker's own ids, say)."""
        return {}

    def prefetch_for(self, queue_name: str, prefetch: int) -> int:
        """The prefetch of a consumer of ``queue_name`` (every epq broker's ``consume`` asks):
        ``prefetch``, but at most the queue's budget of jobs at once in a worker process
        (``epq.concurrency``)."""
        budgets = self.epq.queue_concurrency if self.epq is not None else {}
        return capped_prefetch(budgets, queue_name, prefetch)

    def enqueue_batch(
        self, items: Sequence[tuple[dramatiq.Message[Any], int | None]], *, planned: bool = False
    ) -> list[dramatiq.Message[Any]]:
        """Enqueue ``(message, delay ms)`` pairs in as few round trips as the broker allows, all or
        nothing (what a broker cannot take back is said on its ``_publish_batch``). Every
        middleware's enqueue hooks run for each message, as for ``enqueue``; for messages
        ``epq.insert`` ``planned``, only when another middleware than epq's has them (see
        ``foreign_hooks``)."""
        broker: Any = self
        before = not planned or bool(self.foreign_hooks("before_enqueue"))
        after = not planned or bool(self.foreign_hooks("after_enqueue"))
        prepared: list[tuple[dramatiq.Message[Any], int | None, int | None]] = []
        for message, delay in items:
            due: int | None = None
            if to_be_scheduled(message, delay) and self.epq_store is not None:
                message, due = self._to_schedule(message, delay or 0)
                delay = scheduled_delay(delay)
            else:
                message, delay = broker._prepare_immediate(message), None
            if before:
                broker.emit_before("enqueue", message, delay)
            prepared.append((message, due, delay))
        broker._publish_batch([(m, due) for m, due, _ in prepared])
        if after:
            for message, _, delay in prepared:
                broker.emit_after("enqueue", message, delay)
        return [m for m, _, _ in prepared]

    def _prepare_immediate(self, message: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
        return message

    def join(self, queue_name: str, *args: Any, timeout: int | None = None, **kwargs: Any) -> None:
        """Dramatiq's ``join``, which also waits for the queue's messages in epq's schedule (its
        delays, retries and snoozes), as Dramatiq's waits for its delay queue: it returns when the
        queue is empty, nothing of it is in flight and nothing of it is scheduled, or raises
        ``dramatiq.errors.QueueJoinTimeout`` after ``timeout`` ms. Other arguments are the
        broker's own (the stub's ``fail_fast``, say). Scheduled messages become due by the state
        store's clock (on the stub broker: ``epq_clock``, when a test installs one)."""
        store = self.epq_store
        if store is None:
            self.join_broker(queue_name, *args, timeout=timeout, **kwargs)
            return
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        name = q_name(queue_name)
        while True:
            # A message is always in the schedule or on the queue (or in flight): a promotion
            # publishes before it forgets the entry, a retry is scheduled before its message is
            # acked. So nothing was missed when the schedule held none of the queue's messages
            # both before and after the broker's join, and no thread of this process moved one
            # out of it meanwhile (a retry scheduled during the join and promoted before the
            # second look would be in neither: ``note_moves`` counts the promotion).
            moves = moves_begun()
            before = store.schedule_pending(name)
            self.join_broker(queue_name, *args, timeout=_left_ms(deadline, queue_name), **kwargs)
            if not before and not store.schedule_pending(name) and moves_begun() == moves:
                return
            while store.schedule_pending(name):  # (the worker's promoter moves them when due)
                _left_ms(deadline, queue_name)
                time.sleep(JOIN_POLL_S)
            # promoted: on the queue now (or in flight), which the broker's join waits for

    def flush(self, queue_name: str) -> None:
        """Dramatiq's ``flush``, which also drops the queue's messages in epq's schedule (its
        delays, retries and snoozes), as Dramatiq's drops its delay queue. Their job records and
        uniqueness locks are left as they are, as for the messages dropped from the queue."""
        super().flush(queue_name)  # type: ignore[misc]
        store = self.epq_store
        if store is not None:
            store.schedule_drop(q_name(queue_name))

    def join_broker(self, queue_name: str, *args: Any, **kwargs: Any) -> None:
        """Dramatiq's own ``join``: the queue and its messages in flight, not epq's schedule."""
        super().join(queue_name, *args, **kwargs)  # type: ignore[misc]

    def join_queue(self, queue_name: str, timeout_ms: int) -> None:
        """Wait until ``queue_name`` is empty and nothing of it is in flight (for tests:
        ``epq.testing.drain``, which sees to the schedule itself)."""
        self.join_broker(queue_name, timeout=timeout_ms)

    def promote_due(self, now_ms: int, limit: int) -> tuple[int, int | None] | None:
        """Move due scheduled messages onto their queues in one atomic step, if this broker can
        (the count moved and the next due time); None when it cannot, and ``epq.schedule``
        claims and publishes them one by one instead."""
        return None

    def _publish_batch(self, items: Sequence[tuple[dramatiq.Message[Any], int | None]]) -> None:
        """Publish prepared messages; ``due`` (ms) set means: into the schedule."""
        raise NotImplementedError  # pragma: no cover - every epq broker has one
