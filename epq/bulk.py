"""Bulk enqueue: many jobs in a few round trips, each with its own uniqueness answer.

Used by :meth:`epq.QueueService.enqueue_many` and the actors' ``send_many``. For each request,
in order, the result is a :class:`~epq.JobInsertResult`: enqueued, or skipped as a duplicate of
the job holding its unique key (an earlier request of the same batch included).

- Every request is validated first; any bad one raises :class:`~epq.InvalidRequest` naming it
  (``[index].field``) and nothing is enqueued.
- Redis with epq's state in the same server: each run of up to ``SCRIPT_RUN`` immediate jobs is one
  Lua script call (locks, records and messages together; no other client sees it half-done).
  One call is in flight at a time: the next run's messages are made while Redis runs it, and
  its results are made while Redis runs the next. Jobs with a delay go the general way.
  Requests are handled in order, so of two with the same unique key the earlier one wins.
- Otherwise: one pipelined round trip takes the locks and writes the records, then the broker
  publishes the batch at once (Redis: one MULTI/EXEC; RabbitMQ: one AMQP transaction; stub: in
  memory). If publishing fails, the records and locks of the batch are taken back.

A failure part-way through a batch larger than one run leaves the earlier runs enqueued; the
error says how many jobs were, up to which request, and which requests (those of a call whose
reply was lost) may have been.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NamedTuple

import dramatiq
from pydantic import TypeAdapter

from ._messages import new_ids
from .backends.base import (
    BulkGroup,
    BulkJob,
    NewRecord,
    RecordStore,
    StateStore,
    backend_of,
    display_url,
    holder_id,
)
from .backends.errors import STORE_ERRORS, unreachable_errors
from .checks import Checked, delay_ms
from .errors import BrokerUnavailable, ConfigurationError, DuplicateJob, InvalidRequest, describe_error
from .middleware import JobRecords, Uniqueness, _bulk, find_middleware
from .models import JobInsertResult, _Request
from .records import OPEN_RECORD_TTL_MS, build_fields, to_job_record

if TYPE_CHECKING:  # (the actors call this module: a type, not an import at run time)
    from ._actor import EpqActor


#: Jobs per Lua script (Redis) or per pipeline: bounds how long one script holds Redis.
CHUNK = 500
#: Jobs per script call (Redis with epq's state in it): small enough that making the next call
#: overlaps well with Redis running this one, and far below what one script can unpack.
SCRIPT_RUN = 100


@dataclass(slots=True)
class _Job:
    index: int
    actor: EpqActor
    request: _Request
    checked: Checked
    delay: int | None
    # made just before the job's run is sent (see _build)
    message: dramatiq.Message[Any] = field(init=False)
    lock: tuple[str, str, int] | None = field(init=False)  # (key, holder value, ttl ms)


class _Target(NamedTuple):
    """The broker a bulk enqueue goes to, and the stores epq keeps beside it."""

    broker: Any
    state: StateStore
    records: RecordStore


def enqueue_many(
    broker: dramatiq.Broker, items: Iterable[tuple[EpqActor, _Request | Mapping[str, Any]]]
) -> list[JobInsertResult]:
    """Enqueue requests (models, or mappings of their fields) on ``broker``, a broker epq built.

    Raises:
      ConfigurationError: ``broker`` is not one epq built (its jobs would have no records).
    """
    backend = backend_of(broker)
    if backend is None:
        raise ConfigurationError("bulk enqueue needs a broker epq.setup() built")
    target = _Target(broker, backend.state, backend.records)
    now = target.state.now_ms()
    jobs = _prepare(target, list(items), now)
    holders: list[str | None] = [None] * len(jobs)
    results: list[JobInsertResult | None] = [None] * len(jobs)
    handled: list[_Job] = []  # jobs whose enqueue (or duplicate answer) is final, in order
    fused = _FusedRuns(target, holders, results, handled) if _fused(broker) else None
    token = _bulk.set(True)
    try:
        for run in _runs(jobs, fused is not None):
            if fused is not None and not run[0].delay:
                fused.add(run)
                continue
            if fused is not None:
                fused.finish()
            _general_run(target, run, holders, now)
            handled += run
        if fused is not None:
            fused.finish()
    except unreachable_errors(broker) as exc:
        enqueued = sum(1 for job in handled if holders[job.index] is None)
        unknown = fused.unknown if fused is not None else []
        done = (
            f"requests [0] to [{len(handled) - 1}] were handled, in order" if handled else "none was handled"
        )
        maybe = f"requests [{unknown[0].index}] to [{unknown[-1].index}] may have been, " if unknown else ""
        raise BrokerUnavailable(
            f"bulk enqueue on {display_url(broker)} failed after {enqueued} of {len(jobs)} jobs were "
            f"enqueued ({done}; {maybe}the rest were not): {describe_error(exc)}"
        ) from exc
    finally:
        _bulk.reset(token)
        if fused is not None:
            fused.close()
    return _results(target, jobs, holders, results)


def _fused(broker: dramatiq.Broker) -> bool:
    backend = backend_of(broker)
    return backend is not None and backend.fused


def _validate(actor: EpqActor, request: _Request | Mapping[str, Any]) -> _Request:
    model = actor.kind.model
    if isinstance(request, Mapping):
        return actor.validate(kwargs=dict(request))
    if isinstance(request, model):
        return request
    problem = f"{actor.actor_name} takes a {model.__name__} or a mapping, not {type(request).__name__}"
    raise InvalidRequest(actor.actor_name, [{"field": "request", "message": problem}])


def _prepare(
    target: _Target, items: list[tuple[EpqActor, _Request | Mapping[str, Any]]], now: int
) -> list[_Job]:
    """Validate and check every request; refuse the whole batch, naming every problem, if any
    request is bad."""
    broker = target.broker
    if find_middleware(broker, JobRecords) is None:  # pragma: no cover - epq.setup adds it
        raise RuntimeError("bulk enqueue needs epq's JobRecords middleware")
    jobs: list[_Job] = []
    errors: list[dict[str, str]] = []
    for index, (actor, raw) in enumerate(items):
        try:
            request = _validate(actor, raw)
            checked = actor.check(request, broker)
            delay = delay_ms(actor.kind.name, request, None, now)
        except InvalidRequest as exc:
            errors += [{"field": f"[{index}].{e['field']}", "message": e["message"]} for e in exc.errors]
            continue
        jobs.append(_Job(index, actor, request, checked, delay))
    if errors:
        raise InvalidRequest("enqueue_many", errors)
    return jobs


def _build(target: _Target, run: list[_Job], *, holders: bool = True) -> None:
    """Make the messages of a run of checked jobs, and the locks they take (``holders=False``:
    without the holder values)."""
    broker = target.broker
    uniqueness = find_middleware(broker, Uniqueness)
    for job, message_id in zip(run, new_ids(len(run)), strict=True):
        message = job.actor.message_from(job.checked, message_id=message_id, epq_recorded=1)
        lock = uniqueness.lock_for(broker, message, job.delay, holder=holders) if uniqueness else None
        if lock is not None:
            message.options["epq_unique_key"] = lock[0]
        job.message, job.lock = message, lock


def _runs(jobs: list[_Job], fused: bool) -> Iterable[list[_Job]]:
    """Consecutive jobs that go the same way (on a fused broker, immediate jobs by script and
    delayed ones the general way), ``SCRIPT_RUN`` (immediate jobs on a fused broker) or ``CHUNK``
    at most, in request order: so that of two requests
    with the same unique key, the earlier one always wins."""
    run: list[_Job] = []
    for job in jobs:
        limit = SCRIPT_RUN if fused and not job.delay else CHUNK
        if run and (len(run) >= limit or (fused and bool(run[0].delay) != bool(job.delay))):
            yield run
            run = []
        run.append(job)
    if run:
        yield run


class _FusedRuns:
    """Runs of immediate jobs on a Redis broker that keeps epq's state: one script call per run,
    each prepared while Redis runs the one before, and the results of each built while Redis
    runs the next (one call in flight at a time, so runs still take effect in order)."""

    def __init__(
        self,
        target: _Target,
        holders: list[str | None],
        results: list[JobInsertResult | None],
        handled: list[_Job],
    ) -> None:
        self.target = target
        self.broker: Any = target.broker
        self.holders, self.results, self.handled = holders, results, handled
        self.stream: Any = None
        self.in_flight: tuple[list[_Job], list[BulkJob]] | None = None
        self.created: dict[int, datetime] = {}  # the jobs of a batch share a few timestamps

    @property
    def unknown(self) -> list[_Job]:
        """The jobs of a call that reached Redis but whose reply never came (they may or may
        not be enqueued)."""
        if self.in_flight is None or not self.stream.reached:
            return []
        return self.in_flight[0]

    def add(self, run: list[_Job]) -> None:
        _build(self.target, run, holders=False)  # the script makes the holder values
        bulk_jobs = self._bulk_jobs(run)
        keys, args = self.broker.bulk_call(bulk_jobs)
        if self.stream is None:
            self.stream = self.broker.bulk_stream().__enter__()
        done = self._collect()
        self.stream.send(keys, args)
        self.in_flight = (run, bulk_jobs)
        self._build_results(done)  # while Redis runs this run's call

    def finish(self) -> None:
        self._build_results(self._collect())

    def close(self) -> None:
        """Give the connection back. A call still in flight (another error came first) has its
        reply read first: its jobs are then known, and it cannot run after later commands."""
        if self.stream is None:
            return
        try:
            if self.in_flight is not None and self.stream.call is not None:  # sent, not read
                self._collect()
        except STORE_ERRORS:
            pass  # the connection is dropped below; the error that came first is the one raised
        finally:
            self.stream.__exit__(None, None, None)
            self.stream = None

    def _collect(self) -> list[_Job]:
        """Read the reply of the call in flight; the jobs it enqueued."""
        if self.in_flight is None:
            return []
        run, bulk_jobs = self.in_flight
        replies = self.broker.bulk_replies(bulk_jobs, self.stream.read())
        self.in_flight = None
        for job, holder in zip(run, replies, strict=True):
            self.holders[job.index] = holder
        self.handled += run
        return run

    def _bulk_jobs(self, run: list[_Job]) -> list[BulkJob]:
        groups: dict[tuple[Any, ...], BulkGroup] = {}
        out: list[BulkJob] = []
        for job in run:
            message = job.message
            options = message.options
            priority, attempts = options.get("epq_priority"), options.get("max_attempts")
            key = (job.actor, message.queue_name, priority, attempts, message.message_timestamp)
            group = groups.get(key)
            if group is None:
                created = message.message_timestamp  # due at once: scheduled when created
                fields = build_fields(message, job.actor, "available", created, created, "-")
                del fields["args"], fields["unique_key"]  # the job's own
                # the jobs of a group are of one kind, so their locks (if any) have one ttl
                tail, ttl = (Uniqueness.holder_tail(message, created), job.lock[2]) if job.lock else ("", 0)
                group = groups[key] = BulkGroup(fields, tail, ttl)
            out.append(BulkJob(message, group, job.checked.payload_json, job.lock[0] if job.lock else ""))
        return out

    def _build_results(self, run: list[_Job]) -> None:
        enqueued = [job for job in run if self.holders[job.index] is None]
        for job, result in zip(enqueued, _enqueued(enqueued, self.created), strict=True):
            self.results[job.index] = result


#: Validates many results in one call (much cheaper than one model at a time).
_RESULTS = TypeAdapter(list[JobInsertResult])


def _enqueued(jobs: list[_Job], created: dict[int, datetime]) -> list[JobInsertResult]:
    """The results of jobs just enqueued (``created``: datetimes of timestamps, filled in)."""
    out = []
    for job in jobs:
        ms = job.message.message_timestamp
        if ms not in created:
            created[ms] = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
        record = job.actor.record_fields(job.message, job.request, created[ms])
        out.append({"job": record})  # unique_skipped_as_duplicate: False
    return _RESULTS.validate_python(out)


def _new_record(job: _Job, now: int) -> NewRecord:
    delay = int(job.delay or 0)
    state = "scheduled" if delay else "available"
    fields = build_fields(job.message, job.actor, state, now, now + delay, job.checked.payload_json)
    ttl = OPEN_RECORD_TTL_MS + delay  # an open record outlives the job's wait
    if job.lock is None:
        return NewRecord(job.message.message_id, fields, ttl)
    key, holder, lock_ttl = job.lock
    fields["unique_key"] = key
    return NewRecord(job.message.message_id, fields, ttl, key, holder, lock_ttl)


def _general_run(target: _Target, run: list[_Job], holders: list[str | None], now: int) -> None:
    broker: Any = target.broker
    _build(target, run)
    try:
        replies = target.records.create_many([_new_record(job, now) for job in run])
    except BaseException:
        _take_back(target, run)  # part of the pipeline may have run: these ids are ours alone
        raise
    accepted = []
    for job, holder in zip(run, replies, strict=True):
        holders[job.index] = holder
        if holder is None:
            accepted.append(job)
    if not accepted:
        return
    try:
        broker.enqueue_batch([(job.message, job.delay) for job in accepted])
    except BaseException:
        _take_back(target, accepted)  # nothing of the run was published
        raise


def _take_back(target: _Target, jobs: list[_Job]) -> None:
    """Delete the records and free the locks these jobs took (a lock held by another job stays)."""
    for job in jobs:
        target.records.delete(job.message.message_id)
        if job.lock is not None:
            target.state.release_unique(job.lock[0], job.message.message_id)


def _results(
    target: _Target, jobs: list[_Job], holders: list[str | None], results: list[JobInsertResult | None]
) -> list[JobInsertResult]:
    """Fill in the results not built yet: duplicates, and the jobs enqueued the general way."""
    # the records of the jobs holding the duplicates' keys, read in one round trip
    holder_ids = {holder_id(h) for h in holders if h is not None}
    existing_fields = dict(zip(holder_ids, target.records.get_many(list(holder_ids)), strict=True))
    missing = [job for job in jobs if results[job.index] is None and holders[job.index] is None]
    for job, made in zip(missing, _enqueued(missing, {}), strict=True):
        results[job.index] = made
    out: list[JobInsertResult] = []
    for job in jobs:
        holder, result = holders[job.index], results[job.index]
        if result is not None:
            out.append(result)
            continue
        assert holder is not None
        existing_id = holder_id(holder)
        fields = existing_fields[existing_id]
        if fields is not None:
            existing = to_job_record(existing_id, fields)
        else:  # no record (expired): what the lock says
            dup = DuplicateJob(job.actor.actor_name, existing_id, holder=holder)
            existing = job.actor.record_for_duplicate(dup, job.request)
        out.append(JobInsertResult(job=existing, unique_skipped_as_duplicate=True))
    return out
