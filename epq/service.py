"""``QueueService``: the River-style facade the Go package exposes, on Dramatiq."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from uuid import UUID

import dramatiq

from . import insert, metrics, serial
from ._actor import EpqActor
from ._runtime import Runtime, actor_for, current, setup
from .backends.base import REPLACED, backend_of, served_queues, split_counter_group
from .cancellation import request_ttl_ms
from .errors import ConfigurationError, DuplicateJob, InvalidPayload, InvalidRequest, JobNotFound
from .middleware.common import find_middleware
from .models import (
    EnqueueIndexEndpointRequest,
    JobInsertResult,
    JobPage,
    JobRecord,
    JobState,
    QueueInfo,
    RegisterDynamicScheduleRequest,
    RegisterDynamicTriggerRequest,
    RegisterJobRequest,
    RegisterSourceRequest,
    _Request,
)
from .options import PRIORITY, RECORDED, SERIAL_KEY
from .outbox import pending
from .outbox.connections import Statements, dbapi_connection
from .pausing import Pausing
from .priority import LANES
from .records import INDEX_POSITION, NOT_STARTED, OPEN_RECORD_TTL_MS, lock_key_of, to_job_record
from .serial import stored_serial_key

_KIND_BY_MODEL: dict[type[_Request], str] = {
    EnqueueIndexEndpointRequest: "index_endpoint",
    RegisterJobRequest: "register_job",
    RegisterSourceRequest: "register_source",
    RegisterDynamicTriggerRequest: "register_dynamic_trigger",
    RegisterDynamicScheduleRequest: "register_dynamic_schedule",
}

_STATS_COLUMNS = {
    "available": "waiting",
    "scheduled": "scheduled",
    "retryable": "scheduled",
    "running": "running",
    "discarded": "dead",
}
_STATS_ORDER = ("waiting", "scheduled", "running", "dead")


def _is_text(job_id: str) -> bool:
    """Whether ``job_id`` can be a key at all (a lone surrogate, as from a command line's stray
    byte, cannot be encoded); no job has an id that is not."""
    try:
        job_id.encode()
    except UnicodeEncodeError:
        return False
    return True


def _time_limit_ms(kind: str) -> int | None:
    """The time limit of ``kind``'s jobs (None for a kind epq does not know)."""
    try:
        limit = actor_for(kind).options.get("time_limit")
    except KeyError:
        return None
    return int(limit) if limit else None


def _fields_of(runtime: Runtime, job_id: str) -> dict[str, str]:
    """The record of ``job_id`` (an operator's call names it); JobNotFound when there is none."""
    fields = runtime.records.get(job_id) if _is_text(job_id) else None
    if fields is None:
        raise JobNotFound(job_id)
    return fields


def _seen_here(runtime: Runtime) -> None:
    """Have this process's workers see a pause or resume at once (the others read it within
    ``epq.pausing.POLL_INTERVAL_MS``)."""
    pausing = find_middleware(runtime.broker, Pausing)
    if pausing is not None:
        pausing.refresh()


#: The most jobs a page of ``QueueService.list_jobs`` holds.
MAX_PAGE = 1000


def listing_filters(
    *,
    state: JobState | str | None = None,
    kind: str | None = None,
    queue: str | None = None,
    priority: int | None = None,
    endpoint_id: UUID | str | None = None,
) -> dict[str, str]:
    """The filters of a listing as the record fields they compare (``epq.records.INDEXED_FIELDS``).

    Raises:
      ValueError: a value that no record can have, naming its filter.
    """
    out: dict[str, str] = {}
    if state is not None:
        try:
            out["state"] = JobState(state).value
        except ValueError:
            raise ValueError(f"state: one of {', '.join(_LISTED_STATES)}, not {state!r}") from None
        if out["state"] not in _LISTED_STATES:
            raise ValueError(f"state: one of {', '.join(_LISTED_STATES)}, not {state!r}")
    for name, value in (("kind", kind), ("queue", queue)):
        if value is not None:
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}: a name, not {value!r}")
            out[name] = value
    if priority is not None:
        if isinstance(priority, bool) or priority not in (1, 2, 3, 4):
            raise ValueError(f"priority: 1, 2, 3 or 4, not {priority!r}")
        out["priority"] = str(int(priority))
    if endpoint_id is not None:
        try:
            out["endpoint_id"] = str(endpoint_id if isinstance(endpoint_id, UUID) else UUID(str(endpoint_id)))
        except ValueError:
            raise ValueError(f"endpoint_id: a UUID, not {endpoint_id!r}") from None
    return out


_LISTED_STATES = tuple(s.value for s in JobState if s is not JobState.PENDING)


def _cursor(position: str, order: str) -> str:
    """The cursor of a page whose last job is at ``position``: opaque text (base64url)."""
    return base64.urlsafe_b64encode(f"{order[0]}{position}".encode()).decode().rstrip("=")


def _cursor_position(cursor: str, order: str) -> str:
    """The position a cursor of ``_cursor`` names (ValueError for anything else)."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, TypeError):
        text = ""
    if not (text[:1] in "no" and INDEX_POSITION.fullmatch(text[1:])):
        raise ValueError(f"cursor: not a cursor list_jobs gave: {cursor!r}")
    if text[0] != order[0]:
        raise ValueError(f"cursor: a cursor of a listing in the other order (not {order!r})")
    return text[1:]


def purge_dead_letter_queues(broker: dramatiq.Broker) -> None:
    """Empty the brokers' own dead-letter queues (``<queue>.XQ``) of every served queue (each
    epq broker knows where its own are: ``purge_dead_letters``)."""
    purge = getattr(broker, "purge_dead_letters", None)
    if purge is not None:
        purge(served_queues(broker))


class QueueService:
    """Enqueue the five job kinds and get River's ``JobInsertResult`` back.

    Parameters:
      broker: the broker to enqueue on; defaults to the one :func:`epq.setup` builds.

    Each ``enqueue_*`` method takes the kind's request model (or a mapping of its fields),
    raises :class:`epq.InvalidRequest` naming the field when it is invalid (nothing is
    enqueued), and :class:`epq.BrokerUnavailable` when the broker cannot be reached. A request
    whose unique key is held inside its window enqueues nothing and returns the holding job
    with ``unique_skipped_as_duplicate=True``.

    ``tx=``: the application's open transaction (a psycopg 3 connection, or an SQLAlchemy 2
    ``Session`` or ``Connection``), as the Go package's ``EnqueueIndexEndpointTx(ctx, tx, req)``
    and the other ``...Tx`` variants take one. The job is written to the outbox table
    (``EPQ_OUTBOX_TABLE``) in that transaction, and returned ``pending``: if the transaction
    rolls back, it is never enqueued; once it commits, a relay enqueues it, once, under the
    same id. A key held by a job, enqueued or pending, is answered as above, and writes nothing
    (see :mod:`epq.outbox.pending`).
    """

    def __init__(self, broker: dramatiq.Broker | None = None) -> None:
        self._broker = broker

    @property
    def broker(self) -> dramatiq.Broker:
        return self._broker if self._broker is not None else setup()

    def enqueue_index_endpoint(
        self, request: EnqueueIndexEndpointRequest | Mapping[str, Any], *, tx: object | None = None
    ) -> JobInsertResult:
        """Index an endpoint (queue ``default``, priority 2, 7 attempts)."""
        return self._enqueue("index_endpoint", request, tx)

    def enqueue_register_job(
        self, request: RegisterJobRequest | Mapping[str, Any], *, tx: object | None = None
    ) -> JobInsertResult:
        """Register a job definition (queue ``default``, priority 2, 3 attempts)."""
        return self._enqueue("register_job", request, tx)

    def enqueue_register_source(
        self, request: RegisterSourceRequest | Mapping[str, Any], *, tx: object | None = None
    ) -> JobInsertResult:
        """Register a source (queue ``default``, priority 2, 3 attempts)."""
        return self._enqueue("register_source", request, tx)

    def enqueue_register_dynamic_trigger(
        self, request: RegisterDynamicTriggerRequest | Mapping[str, Any], *, tx: object | None = None
    ) -> JobInsertResult:
        """Register a dynamic trigger (queue ``default``, priority 2, 3 attempts)."""
        return self._enqueue("register_dynamic_trigger", request, tx)

    def enqueue_register_dynamic_schedule(
        self, request: RegisterDynamicScheduleRequest | Mapping[str, Any], *, tx: object | None = None
    ) -> JobInsertResult:
        """Register a dynamic schedule (queue ``default``, priority 2, 3 attempts)."""
        return self._enqueue("register_dynamic_schedule", request, tx)

    def enqueue(
        self, kind: str, request: _Request | Mapping[str, Any], *, tx: object | None = None
    ) -> JobInsertResult:
        """Enqueue a job of any kind by name (what ``epq enqueue`` uses)."""
        return self._enqueue(kind, request, tx)

    def enqueue_many(
        self,
        requests: Iterable[_Request | tuple[str, _Request | Mapping[str, Any]]],
        *,
        tx: object | None = None,
    ) -> list[JobInsertResult]:
        """Enqueue many jobs (of any kinds) in a few round trips; one result per request, in order.

        Each request is a request model (its class says the kind) or a ``(kind, model or
        mapping)`` pair. Uniqueness holds per request: a duplicate of a held key, or of an
        earlier request in the same call, is not enqueued and comes back with
        ``unique_skipped_as_duplicate=True``. Any invalid request raises
        :class:`epq.InvalidRequest` naming it (``[index].field``), and nothing is enqueued.
        See :mod:`epq.insert` for the round trips and what a broker failure leaves. With ``tx``,
        the jobs are written in that transaction (see the class docstring), all of them or none.
        """

        pairs: list[tuple[EpqActor, _Request | Mapping[str, Any]]] = []
        actors: dict[str, EpqActor] = {}  # (each kind's actor looked up once a call)
        for index, item in enumerate(requests):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                kind, request = item
                if kind not in _KIND_BY_MODEL.values():
                    raise InvalidRequest(
                        "enqueue_many", [{"field": f"[{index}]", "message": f"unknown kind {kind!r}"}]
                    )
                pairs.append((actors.get(kind) or actors.setdefault(kind, actor_for(kind)), request))
            elif isinstance(item, _Request) and type(item) in _KIND_BY_MODEL:
                kind = _KIND_BY_MODEL[type(item)]
                pairs.append((actors.get(kind) or actors.setdefault(kind, actor_for(kind)), item))
            else:
                raise InvalidRequest(
                    "enqueue_many",
                    [
                        {
                            "field": f"[{index}]",
                            "message": "expected a request model or a (kind, request) pair",
                        }
                    ],
                )
        if tx is not None:
            return [result for _, result in pending.enqueue(self.broker, tx, pairs)]
        return insert.insert_many(self.broker, pairs)  # (self.broker sets epq up if nothing has yet)

    # ---- job state ---------------------------------------------------------------------------

    def _runtime(self) -> Runtime:
        broker = self.broker
        runtime = current()
        if runtime is None or runtime.broker is not broker:
            raise ConfigurationError("job records need the broker epq.setup() built")
        return runtime

    def get_job(self, job_id: str, *, tx: object | None = None) -> JobRecord | None:
        """The job's record, or None if there is none (never enqueued, or expired).

        A job committed through the outbox and not yet relayed has no record yet: its outbox
        row is read (through ``tx``, which also sees the rows its own transaction wrote, else
        through ``EPQ_OUTBOX_URL`` when set) and it is returned in the state ``pending``.
        """
        if not _is_text(job_id):
            return None
        runtime = self._runtime()
        fields = runtime.records.get(job_id)
        if fields is not None:
            return to_job_record(job_id, fields)
        table = runtime.settings.outbox_table  # (the broker's too: Backend.outbox_table)
        if tx is not None:
            found = pending.find_pending(Statements(dbapi_connection(tx, "get_job"), table), job_id)
        elif runtime.outbox is not None:
            with runtime.outbox.statements(table) as db:
                found = pending.find_pending(db, job_id)
        else:
            return None
        if found is not None:
            return found
        fields = runtime.records.get(job_id)  # (relayed between the two reads)
        return to_job_record(job_id, fields) if fields is not None else None

    def find_job_ids(self, prefix: str, limit: int = 10) -> list[str]:
        """Ids of (at most ``limit``) jobs whose id starts with ``prefix``, in no particular order;
        what ``epq jobs show ID-PREFIX`` looks up. Scans every record: not for hot paths.

        Raises:
          ValueError: ``prefix`` is empty or holds a character job ids do not (``*?[]`` say).
        """
        return self._runtime().records.find_ids(prefix, limit)

    def cancel_job(self, job_id: str) -> JobRecord:
        """Cancel a job, whether it has started or not; return its record.

        - Not started (``available``, ``scheduled``, ``retryable``): it is ``cancelled`` now and
          its unique key freed; the worker that fetches it skips it. The record returned says
          ``cancelled``.
        - Running: the worker process running it, on any machine, is asked to stop it (a request
          in the state store, which every worker process polls while it runs jobs). Its handler is
          interrupted within about a second by :class:`epq.JobCancelled`, raised in its thread
          the next time it runs Python code (a call blocked in C, such as a socket read without
          a timeout or one long ``time.sleep``, returns first); the job is then recorded
          ``cancelled``, its key freed, and it is never retried. The record returned is still
          ``running``, with ``cancel_requested_at`` set: :meth:`get_job` shows the outcome. A job
          whose handler returns before the request reaches it completes (its record keeps
          ``cancel_requested_at``); one whose handler fails then is cancelled, not retried.
        - Finished (``completed``, ``discarded``, ``cancelled``): returned unchanged.

        Raises:
          JobNotFound: no record of ``job_id``.
        """
        runtime = self._runtime()
        fields = _fields_of(runtime, job_id)
        requested = False
        before: str | None = None
        for _ in range(3):  # (each turn sees the job move on once, at most)
            before = self._cancel_waiting(runtime, job_id, fields)
            if before != "running":
                break
            if not requested:
                runtime.state.request_cancel(job_id, request_ttl_ms(_time_limit_ms(fields["kind"])))
                requested = True
            # asked after the request is left, so that a failed run whose retry is recorded in
            # between is seen (and cancelled waiting) here, or sees the request (EpqRetries)
            mark = {"cancel_requested_at": str(runtime.state.now_ms())}
            before = runtime.records.move(job_id, "running", mark, 0, ("running",))
            if before not in NOT_STARTED:
                break
            fields = runtime.records.get(job_id) or fields  # (its retry's due time, for the TTL)
        if requested and before != "running":
            runtime.state.forget_cancel(job_id)  # (finished, or cancelled waiting: nothing to stop)
        return self._record(runtime, job_id)

    @staticmethod
    def _cancel_waiting(runtime: Runtime, job_id: str, fields: Mapping[str, str]) -> str:
        """Cancel a job if it has not started (its key freed); return the state it had."""
        now_ms = runtime.state.now_ms()
        # kept until the job would have run, plus the retention: the worker that fetches it then
        # must still find it cancelled
        wait_ms = max(0, int(fields.get("scheduled_at") or now_ms) - now_ms)
        ttl = wait_ms + int(runtime.settings.completed_retention.total_seconds() * 1000)
        # (with the payload, which a record filed beside its message may not hold: see RedisRecords)
        changes = {"finalized_at": str(now_ms), "args": fields.get("args", "{}")}
        before = runtime.records.move(job_id, "cancelled", changes, ttl, NOT_STARTED)
        if before is None:
            raise JobNotFound(job_id)
        if before in NOT_STARTED and lock_key_of(fields):
            runtime.state.release_unique(lock_key_of(fields), job_id)
        if before in NOT_STARTED:
            serial.withdraw(runtime.broker, runtime.state, job_id, {**fields, **changes})
        return before

    # ---- the control plane: list, delete, retry by filter --------------------------------------

    def list_jobs(
        self,
        *,
        state: JobState | str | None = None,
        kind: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        endpoint_id: UUID | str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        order: str = "newest",
    ) -> JobPage:
        """A page of jobs with a record, filtered by each of ``state``, ``kind``, ``queue``,
        ``priority`` and ``endpoint_id`` given, in creation order: ``order`` ``"newest"`` (first)
        or ``"oldest"``; at most ``limit`` (1..1000) jobs.

        ``cursor``: the ``next_cursor`` of the page before (with the same filters and order),
        None for the first page. A page's ``next_cursor`` is None when nothing follows it. Pages
        never repeat a job nor skip one that was there all along, whatever is enqueued meanwhile:
        the order is by creation, and a cursor is a place in it (newest first, jobs created after
        the first page came out are not in later pages; oldest first, they are at the end).
        Read from indexes each transition keeps, so a page costs about the same whatever the
        number of records (with several filters, the smallest index is walked and the others
        checked on each job).

        Raises:
          ValueError: a filter, ``limit``, ``cursor`` or ``order`` that cannot be, naming it.
        """
        filters = listing_filters(
            state=state, kind=kind, queue=queue, priority=priority, endpoint_id=endpoint_id
        )
        if not (isinstance(limit, int) and 1 <= limit <= MAX_PAGE):
            raise ValueError(f"limit: the number of jobs of a page is 1..{MAX_PAGE}, not {limit!r}")
        if order not in ("newest", "oldest"):
            raise ValueError(f"order: 'newest' or 'oldest', not {order!r}")
        after = _cursor_position(cursor, order) if cursor is not None else None
        records = self._runtime().records
        ids, last = records.list_ids(filters, newest_first=order == "newest", after=after, limit=limit)
        jobs = [to_job_record(i, f) for i, f in zip(ids, records.get_many(ids), strict=True) if f is not None]
        return JobPage(jobs=jobs, next_cursor=_cursor(last, order) if last is not None else None)

    def iter_jobs(self, *, order: str = "oldest", **filters: Any) -> Iterator[JobRecord]:
        """Every job :meth:`list_jobs` lists with ``filters``, page after page."""
        cursor = None
        while True:
            page = self.list_jobs(**filters, order=order, cursor=cursor, limit=MAX_PAGE)
            yield from page.jobs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def delete_job(self, job_id: str) -> JobRecord:
        """Delete a job: its record goes, its uniqueness key is freed at once, and its message never
        runs, wherever it waits (a queue, the schedule, a worker's prefetch: a tombstone left in
        the record's place makes every worker skip it, as a cancelled job's). A running job is
        also asked to stop, as :meth:`cancel_job` does; whatever its run ends with is not
        recorded, and it is never retried. Returns the record as it was.

        Raises:
          JobNotFound: no record of ``job_id``.
        """
        runtime = self._runtime()
        fields = _fields_of(runtime, job_id)
        now_ms = runtime.state.now_ms()
        if fields["state"] == "running":
            runtime.state.request_cancel(job_id, request_ttl_ms(_time_limit_ms(fields["kind"])))
        # the tombstone lasts until the job would have run, plus the retention (as a cancelled
        # job's record): a message that waits longer than that is read as an unrecorded job's
        wait_ms = max(0, int(fields.get("scheduled_at") or now_ms) - now_ms)
        ttl = wait_ms + int(runtime.settings.completed_retention.total_seconds() * 1000)
        if runtime.records.bury(job_id, ttl) is None:
            raise JobNotFound(job_id)
        if lock_key_of(fields):
            runtime.state.release_unique(lock_key_of(fields), job_id)
        return to_job_record(job_id, fields)

    def delete_jobs(self, *, all: bool = False, **filters: Any) -> int:
        """Delete (as :meth:`delete_job`) every job :meth:`list_jobs` lists with ``filters``
        (``state``, ``kind``, ``queue``, ``priority``, ``endpoint_id``); how many. Deleting every
        job takes ``all=True``: without a filter and without it, nothing is deleted.

        Raises:
          ValueError: no filter and not ``all``, or a filter that cannot be.
        """
        if not all and not any(value is not None for value in filters.values()):
            raise ValueError("delete_jobs deletes every job only with all=True; give a filter or all=True")
        deleted = 0
        for record in self.iter_jobs(**filters):
            try:
                self.delete_job(record.id)
            except JobNotFound:
                continue  # (expired or deleted meanwhile)
            deleted += 1
        return deleted

    def retry_dead_jobs(self, **filters: Any) -> list[JobRecord]:
        """Run again (as :meth:`retry_dead`) every dead job :meth:`list_jobs` lists with
        ``filters`` (``kind``, ``queue``, ``priority``, ``endpoint_id``; the state is
        ``discarded``); the records after, oldest first. A job that cannot run again (another job
        holds its key, or it is a malformed message) stays dead and is returned as it is."""
        if filters.pop("state", None) not in (None, "discarded", JobState.DISCARDED):
            raise ValueError("state: retry_dead_jobs retries dead (discarded) jobs only")
        out = []
        for record in list(self.iter_jobs(state="discarded", **filters)):
            try:
                out.append(self.retry_dead(record.id))
            except (DuplicateJob, InvalidPayload):
                out.append(record)
            except JobNotFound:
                continue  # (expired or deleted meanwhile)
        return out

    def list_dead(self, limit: int = 100) -> list[JobRecord]:
        """Discarded jobs, newest first, each with its errors (the last one is why it died); at
        most ``limit`` (0 or more)."""
        if limit < 0:
            raise ValueError(f"limit must be 0 or more, not {limit}")
        if limit == 0:
            return []
        records = self._runtime().records
        out = []
        for job_id in records.dead_ids(limit):
            fields = records.get(job_id)
            if fields is not None:
                out.append(to_job_record(job_id, fields))
        return out

    def retry_dead(self, job_id: str) -> JobRecord:
        """Run a discarded job again: same id, kind and args, with a fresh set of attempts.

        A job that is not discarded is returned unchanged. If another job now holds its unique
        key, :class:`epq.DuplicateJob` is raised and it stays discarded.
        """
        runtime = self._runtime()
        fields = _fields_of(runtime, job_id)
        if fields["state"] != "discarded":
            return to_job_record(job_id, fields)
        if fields.get("malformed"):
            raise InvalidPayload(
                f"job {job_id} is a malformed message a worker refused; it cannot be run again "
                "(epq dead purge forgets it)"
            )
        if "args" not in fields:  # (a record filed beside its message that lost it: see RedisRecords)
            raise InvalidPayload(f"job {job_id}'s record does not hold its payload; it cannot be run again")
        actor = actor_for(fields["kind"])
        max_attempts = str(int(fields.get("attempt", "0")) + actor.kind.max_attempts)
        changes = {"max_attempts": max_attempts, "finalized_at": ""}
        if (
            runtime.records.move(job_id, "available", changes, OPEN_RECORD_TTL_MS, ("discarded",))
            != "discarded"
        ):
            return self._record(runtime, job_id)
        runtime.state.forget_cancel(job_id)  # (a request that came after its last run ended)
        kwargs = json.loads(fields["args"])
        options: dict[str, Any] = {PRIORITY: int(fields["priority"]), RECORDED: 1}
        key = stored_serial_key(runtime.broker, fields["kind"], kwargs)
        if key is not None:  # it joins the end of its key's line (epq.serial)
            options[SERIAL_KEY] = key
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=fields["queue"],
            actor_name=fields["kind"],
            args=(),
            kwargs=kwargs,
            options=options,
            message_id=job_id,
            message_timestamp=int(fields["created_at"]),
        )
        try:
            runtime.broker.enqueue(message)
        except DuplicateJob:
            self._back_to_dead(runtime, job_id, fields)
            raise
        except BaseException:
            key = lock_key_of(fields)
            if key:  # the lock the enqueue may have taken before the publish failed
                runtime.state.release_unique(key, job_id)
            self._back_to_dead(runtime, job_id, fields)
            raise
        return self._record(runtime, job_id)

    @staticmethod
    def _back_to_dead(runtime: Runtime, job_id: str, fields: Mapping[str, str]) -> None:
        discarded_ttl = int(runtime.settings.discarded_retention.total_seconds() * 1000)
        restore = {"max_attempts": fields["max_attempts"], "finalized_at": fields.get("finalized_at", "")}
        runtime.records.move(job_id, "discarded", restore, discarded_ttl, ("available",))

    def dead_letter_counts(self) -> dict[str, int]:
        """Per served queue, the messages in the broker's own dead-letter queue (``<queue>.XQ``):
        epq's dead jobs, and dead letters without a record (plain Dramatiq actors', and epq's
        dead jobs whose record the ``EPQ_DEAD_MAX`` bound forgot), which :meth:`list_dead` cannot
        show."""
        count = getattr(self.broker, "count_dead_letters", None)
        return {} if count is None else dict(count(served_queues(self.broker)))

    def purge_dead(self) -> int:
        """Forget every discarded job (records and the brokers' dead-letter queues); return how many."""
        runtime = self._runtime()
        ids = runtime.records.dead_ids(10**9)
        runtime.records.forget_dead(ids)
        purge_dead_letter_queues(runtime.broker)
        return len(ids)

    @staticmethod
    def _counts(runtime: Runtime) -> dict[tuple[str, int], dict[str, int]]:
        """Per queue and priority: jobs waiting, scheduled (incl. retries) and running, from the
        record counters (dead: 0 here, see :meth:`stats`)."""
        table: dict[tuple[str, int], dict[str, int]] = {}
        for group, count in runtime.records.counters().items():
            queue, priority, state = split_counter_group(group)
            column = _STATS_COLUMNS.get(state)
            if column is None or column == "dead":
                continue
            row = table.setdefault((queue, priority), dict.fromkeys(_STATS_ORDER, 0))
            row[column] += count
        return table

    def stats(self) -> list[dict[str, Any]]:
        """Per queue and priority: jobs waiting, scheduled (incl. retries), running, dead."""
        table = self._counts(self._runtime())
        # dead jobs from their records: discarded records expire, and their counters with them
        for record in self.list_dead(10**9):
            row = table.setdefault((record.queue, int(record.priority)), dict.fromkeys(_STATS_ORDER, 0))
            row["dead"] += 1
        return [
            {"queue": q, "priority": p, **row} for (q, p), row in sorted(table.items()) if any(row.values())
        ]

    # ---- queues ------------------------------------------------------------------------------

    def pause_queue(self, name: str) -> bool:
        """Pause queue ``name`` on every worker process, on every machine: within about a second
        none starts a job of it; jobs still enqueue and wait in it (in priority order), delayed
        ones and retries fall due into it, and jobs running already run to their end. A worker
        started while it is paused starts none either. Kept in the state store until
        :meth:`resume_queue`. Returns whether it was not paused already.

        Raises:
          InvalidRequest: ``name`` is not a queue epq serves (``EPQ_QUEUES``), naming the field.
        """
        runtime = self._runtime()
        if name not in served_queues(runtime.broker):
            error = {"field": "queue", "message": self._unknown(runtime, name)}
            raise InvalidRequest("pause_queue", [error])
        changed = runtime.state.pause_queue(name)
        _seen_here(runtime)
        return changed

    def resume_queue(self, name: str) -> bool:
        """Resume a paused queue: worker processes start its jobs again within about a second,
        highest priority first. Returns whether it was paused.

        Raises:
          InvalidRequest: ``name`` is neither paused nor a queue epq serves.
        """
        runtime = self._runtime()
        if runtime.state.resume_queue(name):
            _seen_here(runtime)
            return True
        if name not in served_queues(runtime.broker):
            error = {"field": "queue", "message": self._unknown(runtime, name)}
            raise InvalidRequest("resume_queue", [error])
        return False

    @staticmethod
    def _unknown(runtime: Runtime, name: str) -> str:
        return f"unknown queue {name!r} (the queues: {', '.join(served_queues(runtime.broker))})"

    def queues(self) -> list[QueueInfo]:
        """Every queue epq serves, and any other with jobs or paused, by name: whether it is
        paused, its depth per priority (jobs waiting to start), its lag (the oldest waiting job's
        wait, as the ``epq_oldest_waiting_seconds`` metric), jobs running and scheduled."""
        runtime = self._runtime()
        paused = runtime.state.paused_queues()
        counts = self._counts(runtime)
        lags = metrics.lag_ms(runtime.records, runtime.state.now_ms())
        names = {*served_queues(runtime.broker), *paused, *(queue for queue, _ in counts)}
        out = []
        for name in sorted(names):
            rows = {p: counts.get((name, p), {}) for p in LANES}
            out.append(
                QueueInfo(
                    name=name,
                    paused=name in paused,
                    depth={p: row.get("waiting", 0) for p, row in rows.items()},
                    lag_seconds=max((lags.get((name, p), 0) for p in LANES), default=0) / 1000,
                    running=sum(row.get("running", 0) for row in rows.values()),
                    scheduled=sum(row.get("scheduled", 0) for row in rows.values()),
                )
            )
        return out

    def _record(self, runtime: Runtime, job_id: str) -> JobRecord:
        fields = runtime.records.get(job_id)
        if fields is None:
            raise JobNotFound(job_id)
        return to_job_record(job_id, fields)

    def _enqueue(
        self, kind: str, request: _Request | Mapping[str, Any], tx: object | None
    ) -> JobInsertResult:
        broker = self.broker
        actor = actor_for(kind)
        model = actor.kind.model
        if isinstance(request, Mapping):
            validated = actor.validate(kwargs=dict(request))
        elif isinstance(request, model):
            validated = request
        else:
            raise TypeError(f"enqueue of {kind} takes a {model.__name__}, not {type(request).__name__}")
        if tx is not None:
            ((_, result),) = pending.enqueue(broker, tx, [(actor, validated)], many=False)
            return result
        try:
            plan = insert.insert_one(actor, validated, broker)
        except DuplicateJob as dup:
            backend = backend_of(broker)
            fields = backend.records.get(dup.existing_job_id) if backend is not None else None
            return insert.duplicate_result(actor, validated, dup.holder, fields)
        if plan.outcome is not None and plan.outcome[0] == REPLACED:
            return insert.replaced_result(broker, plan)
        return insert.inserted_results([plan])[0]
