"""The one insert path: every new epq job comes in here (``actor.send``, ``QueueService.enqueue_*``,
``QueueService.enqueue_many``, ``actor.send_many``).

A request becomes a :class:`Plan`: validated into its model, checked (``epq.checks``), with its
message, the uniqueness lock it takes and its record. The backend inserts plans:

- Redis with epq's state in the same server (``Backend.fused``), jobs due at once: one Lua script
  call takes the locks, writes the records and puts the messages on their lanes (no other client
  sees it half-done): ``enqueue_recorded.lua`` for one job, ``enqueue_many_recorded.lua`` for
  each run of up to ``SCRIPT_RUN``. One call is in flight at a time: the next run's messages are
  made while Redis runs it, and its results are made while Redis runs the next.
- Otherwise (the memory and RabbitMQ backends, and every delayed job): the locks and records are
  written first, in one round trip, then the broker publishes (one message: ``enqueue_planned``;
  many: ``enqueue_batch``, all or nothing: one MULTI/EXEC on Redis, one AMQP transaction on
  RabbitMQ). If publishing fails, the records and locks are taken back.

A single enqueue is an insert of one: a duplicate raises :class:`~epq.DuplicateJob`. Many are
inserted in order, so of two requests with the same unique key the earlier one wins, and each
duplicate is answered in its result; an invalid request anywhere refuses the whole batch (its
error names every problem as ``[index].field``). A failure part-way through a batch larger than
one run leaves the earlier runs enqueued; the error says how many jobs were, up to which request,
and which requests (those of a call whose reply was lost) may have been.

Other middleware's enqueue hooks run for every message. epq's own (``Uniqueness``, ``JobRecords``)
act only on what was not planned here: retries, promotions from the schedule, and messages an
application enqueues by hand with ``broker.enqueue``; so a planned message's enqueue signals are
emitted only when another middleware has a hook for them (``DurableDelays.foreign_hooks``).
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, NamedTuple

import dramatiq
from pydantic import TypeAdapter

from . import metrics
from ._messages import encode, new_ids
from .backends.base import (
    BulkGroup,
    BulkJob,
    Holder,
    NewRecord,
    RecordStore,
    RelayedJob,
    StateStore,
    backend_of,
    display_url,
    enqueue_planned,
    holder_id,
    schedule_entry,
)
from .backends.errors import CONNECTION_ERRORS, STORE_ERRORS, unreachable_errors
from .checks import Checked, check_request, delay_ms
from .errors import (
    BrokerUnavailable,
    ConfigurationError,
    DuplicateJob,
    EnqueueFailed,
    InvalidRequest,
    StateUnavailable,
    describe_error,
)
from .middleware.common import find_middleware
from .middleware.uniqueness import Uniqueness, count_refused
from .models import JobInsertResult, JobPriority, JobQueue, JobRecord, JobState, _Request
from .options import PRIORITY, RECORDED, UNIQUE_KEY
from .outage import state_errors
from .payloads import known_fields_only
from .records import OPEN_RECORD_TTL_MS, UNIQUE_DIGEST, new_record_fields, payload_json, to_job_record

if TYPE_CHECKING:  # (the actors call this module: a type, not an import at run time)
    from ._actor import EpqActor

#: Jobs per pipeline or publish batch: bounds one round trip's size.
CHUNK = 500
#: Jobs per script call (Redis with epq's state in it): small enough that making the next call
#: overlaps well with Redis running this one, and far below what one script can unpack.
SCRIPT_RUN = 100


@dataclass(slots=True)
class Plan:
    """A request on its way in: checked, then (just before its run is sent) its message and lock."""

    index: int  # its place in the batch
    actor: EpqActor
    request: _Request
    checked: Checked
    delay: int | None  # ms
    message: dramatiq.Message[Any] = field(init=False)
    lock: tuple[str, str, int] | None = field(init=False)  # (key, holder value, ttl ms)


class _Target(NamedTuple):
    """The broker jobs go to, and the stores epq keeps beside it."""

    broker: Any
    state: StateStore
    records: RecordStore
    fused: bool


def _target(broker: dramatiq.Broker) -> _Target:
    backend = backend_of(broker)
    if backend is None:
        raise ConfigurationError(f"epq jobs need a broker epq.setup() built, not {type(broker).__name__}")
    return _Target(broker, backend.state, backend.records, backend.fused)


# ---- one job ------------------------------------------------------------------------------------


def insert_one(
    actor: EpqActor,
    request: _Request,
    broker: dramatiq.Broker,
    *,
    delay: timedelta | int | None = None,
    **options: Any,
) -> Plan:
    """Insert one validated request (``delay`` or the request's ``run_at`` set when it may run;
    ``options``: more message options); returns its plan, the message sent in it.

    Raises:
      InvalidRequest: the request fails a check (nothing is enqueued).
      DuplicateJob: another job holds its unique key (nothing is enqueued).
      BrokerUnavailable: the broker or the state store cannot be reached (``StateUnavailable``
        for the state store); what was written is taken back, but for a Redis script whose reply
        was lost (it ran whole or not at all).
    """
    target = _target(broker)
    now = target.state.now_ms()
    checked = check_request(actor.kind, request, broker)
    plan = Plan(0, actor, request, checked, delay_ms(actor.kind.name, request, delay, now))
    _build(target, [plan], options=options, message_ids=[options.pop("message_id", None)])
    record = _new_record(plan, now)
    try:
        if target.fused and not plan.delay:
            holder = target.broker.insert_recorded(plan.message, record, checked.payload_json)
        else:
            with state_errors("writing a job record"):
                holder = target.records.create(record)
            if holder is None:
                enqueue_planned(target.broker, plan.message, plan.delay, checked.payload_json)
    except (StateUnavailable, ConfigurationError, EnqueueFailed):
        _take_back(target, [plan])
        raise
    except unreachable_errors(broker) as exc:
        if not (target.fused and not plan.delay and isinstance(exc, CONNECTION_ERRORS)):
            # (one script that failed on the connection ran whole or not at all: nothing to take
            # back, and a server that did not answer would not answer the cleanup either)
            _take_back(target, [plan])
        raise BrokerUnavailable(
            f"could not enqueue {actor.actor_name} on {display_url(broker)}: {describe_error(exc)}"
        ) from exc
    except Exception:
        # (not an interrupt, such as Dramatiq's time limit in a handler that sends: the insert
        # may have gone through, and taking it back would leave a queued job without its record)
        _take_back(target, [plan])
        raise
    if holder is not None:
        count_refused(target.state, plan.message)
        raise DuplicateJob(actor.actor_name, holder_id(holder), holder=holder)
    return plan


# ---- many jobs ----------------------------------------------------------------------------------


def insert_many(
    broker: dramatiq.Broker, items: Iterable[tuple[EpqActor, _Request | Mapping[str, Any]]]
) -> list[JobInsertResult]:
    """Insert requests (models, or mappings of their fields) on ``broker``: one result per
    request, in order (see the module docstring)."""
    with _collector_paused():
        return _insert_many(broker, items)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a bulk insert: a batch's requests, plans,
    messages and results live until it ends, and each collection that would run meanwhile walks
    them again (and, past a few thousand jobs, the whole heap), for nothing: they are freed by
    their reference counts when the batch ends (docs/decisions.md, decision 48). A collector
    someone else paused stays paused."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _insert_many(
    broker: dramatiq.Broker, items: Iterable[tuple[EpqActor, _Request | Mapping[str, Any]]]
) -> list[JobInsertResult]:
    target = _target(broker)
    now = target.state.now_ms()
    plans = _prepare(target, list(items), now)
    holders: list[str | None] = [None] * len(plans)
    results: list[JobInsertResult | None] = [None] * len(plans)
    handled: list[Plan] = []  # plans whose insert (or duplicate answer) is final, in order
    fused = _FusedRuns(target, holders, results, handled) if target.fused else None
    try:
        for run in _runs(plans, fused is not None):
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
        enqueued = sum(1 for plan in handled if holders[plan.index] is None)
        unknown = fused.unknown if fused is not None else []
        done = (
            f"requests [0] to [{len(handled) - 1}] were handled, in order" if handled else "none was handled"
        )
        maybe = f"requests [{unknown[0].index}] to [{unknown[-1].index}] may have been, " if unknown else ""
        raise BrokerUnavailable(
            f"bulk enqueue on {display_url(broker)} failed after {enqueued} of {len(plans)} jobs were "
            f"enqueued ({done}; {maybe}the rest were not): {describe_error(exc)}"
        ) from exc
    finally:
        if fused is not None:
            fused.close()
    out = _results(target, plans, holders, results)
    for plan, result in zip(plans, out, strict=True):
        if result.unique_skipped_as_duplicate:
            metrics.duplicates_refused(target.state, plan.actor.actor_name)
    return out


def _validate(actor: EpqActor, request: _Request | Mapping[str, Any]) -> _Request:
    model = actor.kind.model
    if isinstance(request, model):
        return request
    if isinstance(request, Mapping):
        return actor.validate(kwargs=dict(request))
    problem = f"{actor.actor_name} takes a {model.__name__} or a mapping, not {type(request).__name__}"
    raise InvalidRequest(actor.actor_name, [{"field": "request", "message": problem}])


def _prepare(
    target: _Target, items: list[tuple[EpqActor, _Request | Mapping[str, Any]]], now: int
) -> list[Plan]:
    """Validate and check every request; refuse the whole batch, naming every problem, if any
    request is bad."""
    plans: list[Plan] = []
    errors: list[dict[str, str]] = []
    declared = target.broker.get_declared_queues()
    for index, (actor, raw) in enumerate(items):
        try:
            request = _validate(actor, raw)
            checked = check_request(actor.kind, request, target.broker, declared)
            delay = delay_ms(actor.kind.name, request, None, now)
        except InvalidRequest as exc:
            errors += [{"field": f"[{index}].{e['field']}", "message": e["message"]} for e in exc.errors]
            continue
        plans.append(Plan(index, actor, request, checked, delay))
    if errors:
        raise InvalidRequest("enqueue_many", errors)
    return plans


def _build(
    target: _Target,
    run: Sequence[Plan],
    *,
    holders: bool = True,
    options: Mapping[str, Any] | None = None,
    message_ids: Sequence[str | None] | None = None,
    created_ms: Sequence[int] | None = None,
) -> None:
    """Make the messages of a run of checked plans (with ``message_ids``, or new ones; stamped
    ``created_ms``, or now), and the locks they take (``holders=False``: without the holder
    values, for a caller that makes them itself)."""
    broker = target.broker
    uniqueness = find_middleware(broker, Uniqueness)
    ids = message_ids if message_ids is not None else new_ids(len(run))
    marked = {RECORDED: 1, **options} if options else {RECORDED: 1}
    for i, (plan, message_id) in enumerate(zip(run, ids, strict=True)):
        message = plan.actor.message_from(plan.checked, message_id=message_id, **marked)
        if created_ms is not None:
            message = message.copy(message_timestamp=created_ms[i])
        lock = uniqueness.lock_for(broker, message, plan.delay, holder=holders) if uniqueness else None
        if lock is not None:
            message.options[UNIQUE_KEY] = lock[0]
        plan.message, plan.lock = message, lock


def _runs(plans: list[Plan], fused: bool) -> Iterable[list[Plan]]:
    """Consecutive plans that go the same way (on a fused broker, immediate jobs by script and
    delayed ones the general way), ``SCRIPT_RUN`` (immediate jobs on a fused broker) or ``CHUNK``
    at most, in request order: so that of two requests with the same unique key, the earlier one
    always wins."""
    run: list[Plan] = []
    for plan in plans:
        limit = SCRIPT_RUN if fused and not plan.delay else CHUNK
        if run and (len(run) >= limit or (fused and bool(run[0].delay) != bool(plan.delay))):
            yield run
            run = []
        run.append(plan)
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
        handled: list[Plan],
    ) -> None:
        self.target = target
        self.broker: Any = target.broker
        self.holders, self.results, self.handled = holders, results, handled
        self.stream: Any = None
        self.in_flight: tuple[list[Plan], list[BulkJob]] | None = None
        self.created: dict[int, datetime] = {}  # the jobs of a batch share a few timestamps

    @property
    def unknown(self) -> list[Plan]:
        """The plans of a call that reached Redis but whose reply never came (they may or may
        not be enqueued)."""
        if self.in_flight is None or not self.stream.reached:
            return []
        return self.in_flight[0]

    def add(self, run: list[Plan]) -> None:
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

    def _collect(self) -> list[Plan]:
        """Read the reply of the call in flight; the plans it handled."""
        if self.in_flight is None:
            return []
        run, bulk_jobs = self.in_flight
        replies = self.broker.bulk_replies(bulk_jobs, self.stream.read())
        self.in_flight = None
        for plan, holder in zip(run, replies, strict=True):
            self.holders[plan.index] = holder
        self.handled += run
        return run

    def _bulk_jobs(self, run: list[Plan]) -> list[BulkJob]:
        groups: dict[tuple[Any, ...], BulkGroup] = {}
        out: list[BulkJob] = []
        for plan in run:
            message = plan.message
            key = (plan.actor, message.queue_name, plan.checked.priority, message.message_timestamp)
            group = groups.get(key)
            if group is None:
                created = message.message_timestamp  # due at once: scheduled when created
                fields = _record_fields(plan, created)
                for name in ("args", UNIQUE_DIGEST, "unique_key", "endpoint_id"):  # the job's own
                    fields.pop(name, None)
                # the jobs of a group are of one kind, so their locks (if any) have one ttl
                tail, ttl = (Uniqueness.holder_tail(message, created), plan.lock[2]) if plan.lock else ("", 0)
                group = groups[key] = BulkGroup(fields, tail, ttl)
            lock_key = plan.lock[0] if plan.lock else ""
            out.append(BulkJob(message, group, plan.checked.payload_json, lock_key, _endpoint_of(plan)))
        return out

    def _build_results(self, run: list[Plan]) -> None:
        inserted = [plan for plan in run if self.holders[plan.index] is None]
        for plan, result in zip(inserted, inserted_results(inserted, self.created), strict=True):
            self.results[plan.index] = result


def _general_run(target: _Target, run: list[Plan], holders: list[str | None], now: int) -> None:
    broker: Any = target.broker
    _build(target, run)
    try:
        replies = target.records.create_many([_new_record(plan, now) for plan in run])
    except BaseException:
        _take_back(target, run)  # part of the pipeline may have run: these ids are ours alone
        raise
    accepted = []
    for plan, holder in zip(run, replies, strict=True):
        holders[plan.index] = holder
        if holder is None:
            accepted.append(plan)
    if not accepted:
        return
    try:
        broker.enqueue_batch([(plan.message, plan.delay) for plan in accepted], planned=True)
    except BaseException:
        _take_back(target, accepted)  # nothing of the run was published
        raise


# ---- records and results ------------------------------------------------------------------------


def _endpoint_of(plan: Plan) -> str:
    """The endpoint id of a plan's job ('' for a request without one)."""
    endpoint = getattr(plan.request, "endpoint_id", None)
    return str(endpoint) if endpoint is not None else ""


def _record_fields(plan: Plan, due: int) -> dict[str, str]:
    message = plan.message
    return new_record_fields(
        kind=plan.actor.actor_name,
        queue=plan.checked.queue,
        priority=message.options.get(PRIORITY, plan.checked.priority),
        args_json=plan.checked.payload_json,
        state="scheduled" if plan.delay else "available",
        max_attempts=message.options.get("max_attempts", plan.actor.options["max_attempts"]),
        created_ms=message.message_timestamp,
        scheduled_ms=due,
        unique_key=plan.lock[0] if plan.lock else "",
        endpoint_id=_endpoint_of(plan),
    )


def _new_record(plan: Plan, now: int) -> NewRecord:
    """The record a plan writes, with the lock it takes first."""
    delay = int(plan.delay or 0)
    # (a job due at once is due when its message was made, as its result says, whatever the
    # state store's clock read a moment before)
    due = now + delay if delay else plan.message.message_timestamp
    fields = _record_fields(plan, due)
    ttl = OPEN_RECORD_TTL_MS + delay  # an open record outlives the job's wait
    if plan.lock is None:
        return NewRecord(plan.message.message_id, fields, ttl)
    key, holder, lock_ttl = plan.lock
    return NewRecord(plan.message.message_id, fields, ttl, key, holder, lock_ttl)


def _take_back(target: _Target, plans: list[Plan]) -> None:
    """Delete the records and free the locks these plans took (a lock held by another job stays).
    If the state store is down too, they expire with their TTLs; the first failure ends the
    cleanup, so a store that does not answer costs one timeout."""
    with contextlib.suppress(*STORE_ERRORS):
        for plan in plans:
            target.records.delete(plan.message.message_id)
            if plan.lock is not None:
                target.state.release_unique(plan.lock[0], plan.message.message_id)


#: Validates many results in one call (much cheaper than one model at a time).
_RESULTS = TypeAdapter(list[JobInsertResult])


def inserted_results(
    plans: Sequence[Plan], created: dict[int, datetime] | None = None, *, state: JobState | None = None
) -> list[JobInsertResult]:
    """The results of plans just inserted (``created``: datetimes of timestamps, filled in), in
    ``state`` (else available or scheduled, as their time says)."""
    created = {} if created is None else created
    out = []
    for plan in plans:
        message = plan.message
        ms = message.message_timestamp
        if ms not in created:
            created[ms] = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
        at = created[ms]
        run_at = plan.request.run_at
        scheduled = run_at if run_at is not None and run_at > at else at
        record = {
            "id": message.message_id,
            "kind": plan.actor.actor_name,
            "queue": plan.checked.queue,
            "priority": message.options.get(PRIORITY, plan.checked.priority),
            "args": message.kwargs,
            "state": state or (JobState.SCHEDULED if scheduled > at else JobState.AVAILABLE),
            "attempt": 0,
            "max_attempts": int(message.options.get("max_attempts", plan.actor.options["max_attempts"])),
            "created_at": at,
            "scheduled_at": scheduled,
        }
        out.append({"job": record})  # unique_skipped_as_duplicate: False
    return _RESULTS.validate_python(out)


def duplicate_result(
    actor: EpqActor, request: _Request, holder: str, fields: Mapping[str, str] | None
) -> JobInsertResult:
    """The result of a request skipped as a duplicate: the record of the job holding its key
    (``fields``), or, when that has expired, what the lock records of it (``args`` are then this
    request's: they agree with the holder's on every unique-key field)."""
    existing_id = holder_id(holder)
    if fields is not None:
        return JobInsertResult(job=to_job_record(existing_id, fields), unique_skipped_as_duplicate=True)
    parsed = Holder.parse(holder)
    now = datetime.now(timezone.utc)
    if (
        parsed.priority in (1, 2, 3, 4)
        and parsed.queue is not None
        and parsed.created_ms is not None
        and parsed.due_ms is not None
    ):
        created, scheduled = _from_ms(parsed.created_ms), _from_ms(parsed.due_ms)
        queue, priority = parsed.queue, JobPriority(parsed.priority)
    else:  # (a holder value without its details)
        created = scheduled = now
        queue = request.queue_name or actor.kind.queue
        priority = JobPriority(request.priority or actor.kind.priority)
    job = JobRecord(
        id=existing_id,
        kind=actor.actor_name,
        queue=queue,
        priority=priority,
        args=request.model_dump(mode="json"),
        state=JobState.SCHEDULED if scheduled > now else JobState.AVAILABLE,
        max_attempts=int(actor.options["max_attempts"]),
        created_at=created,
        scheduled_at=scheduled,
    )
    return JobInsertResult(job=job, unique_skipped_as_duplicate=True)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def _results(
    target: _Target, plans: list[Plan], holders: list[str | None], results: list[JobInsertResult | None]
) -> list[JobInsertResult]:
    """Fill in the results not built yet: duplicates, and the plans inserted the general way."""
    # the records of the jobs holding the duplicates' keys, read in one round trip
    holder_ids = {holder_id(h) for h in holders if h is not None}
    existing_fields = dict(zip(holder_ids, target.records.get_many(list(holder_ids)), strict=True))
    missing = [plan for plan in plans if results[plan.index] is None and holders[plan.index] is None]
    for plan, made in zip(missing, inserted_results(missing), strict=True):
        results[plan.index] = made
    out: list[JobInsertResult] = []
    for plan in plans:
        holder, result = holders[plan.index], results[plan.index]
        if result is None:
            assert holder is not None
            result = duplicate_result(plan.actor, plan.request, holder, existing_fields[holder_id(holder)])
        out.append(result)
    return out


# ---- the outbox: jobs written in the application's transaction, relayed later -------------------


def plan_pending(
    broker: dramatiq.Broker,
    items: Sequence[tuple[EpqActor, _Request | Mapping[str, Any]]],
    *,
    many: bool = True,
    delay: timedelta | int | None = None,
) -> list[Plan]:
    """Plans of requests a caller writes to the outbox in its own transaction (``epq.outbox``):
    validated and checked as an insert checks them, each with a new job id and the key of the lock
    it is to take; nothing is written anywhere. ``delay`` (one request) becomes its ``run_at``.

    Raises:
      InvalidRequest: a request fails a check; with ``many``, naming ``[index].field`` of every
        bad one.
    """
    target = _target(broker)
    now = target.state.now_ms()
    if many:
        plans = _prepare(target, list(items), now)
    else:
        ((actor, raw),) = items
        request = _validate(actor, raw)
        wait = delay_ms(actor.kind.name, request, delay, now) if delay is not None else None
        if wait:  # (the row carries the time, as any run_at: the relay may run much later)
            request = request.model_copy(update={"run_at": _from_ms(now + wait)})
        checked = check_request(actor.kind, request, broker)
        plans = [Plan(0, actor, request, checked, delay_ms(actor.kind.name, request, None, now))]
    _build(target, plans, holders=False)
    return plans


class OutboxJob(NamedTuple):
    """An outbox row as a relay hands it to :func:`relay_many`."""

    actor: EpqActor | None  # None: a kind this process does not know
    kind: str
    job_id: str
    payload: dict[str, Any]  # the request's fields, as the caller checked them
    created_ms: int  # when the caller enqueued it


#: What :func:`relay_many` did with each job.
RELAYED = "relayed"  # its record written, its message in the schedule (due at once, or at run_at)
ALREADY_RELAYED = "already relayed"  # a relay that died before forgetting the row had done it
DUPLICATE = "duplicate"  # another job took its unique key since the caller's check: cancelled
INVALID = "invalid"  # this process cannot make a job of it: discarded, with why


def relay_many(
    broker: dramatiq.Broker, jobs: Sequence[OutboxJob], *, cancelled_ttl_ms: int, discarded_ttl_ms: int
) -> list[str]:
    """Insert jobs a relay took from the outbox, with the ids and creation times their callers
    gave them: one outcome per job (``RELAYED`` and the others above), in order.

    Each becomes a plan as any insert makes it (its lock, its record, priority and ``run_at``);
    the batch is then written in one atomic step of the state store
    (``RecordStore.create_relayed``): records, locks, the messages into the schedule (due at
    once, or at ``run_at``: promoters move them to the broker, ``epq.schedule.promote_soon``), and
    a mark per job, so that a batch taken again after its relay died is not inserted twice. A job
    whose key another job holds gets a ``cancelled`` record saying so; one this process cannot
    make a job of (an unknown kind, a queue no worker serves) a ``discarded`` record with the
    reason, so that ``get_job`` tells and nothing is dropped unseen. Fields a newer caller's
    model has and this process's does not travel in the payload as they were written.

    Raises:
      StateUnavailable: the state store failed (nothing was written, or the whole batch was:
        taking it again is safe either way).
    """
    target = _target(broker)
    now = target.state.now_ms()
    declared = target.broker.get_declared_queues()
    outcomes = [INVALID] * len(jobs)
    plans: list[Plan] = []
    refused: list[NewRecord] = []
    for index, job in enumerate(jobs):
        try:
            plans.append(_relay_plan(target, index, job, now, declared))
        except InvalidRequest as exc:
            refused.append(_invalid_record(job, exc, now, discarded_ttl_ms))
    if plans:
        ids = [jobs[plan.index].job_id for plan in plans]
        _build(target, plans, message_ids=ids, created_ms=[jobs[plan.index].created_ms for plan in plans])
    with state_errors("relaying outbox jobs"):
        replies = target.records.create_relayed([_relayed_job(target, plan, now) for plan in plans])
        for plan, reply in zip(plans, replies, strict=True):
            if reply is None:
                outcomes[plan.index] = RELAYED
            elif reply is True:
                outcomes[plan.index] = ALREADY_RELAYED
            else:
                outcomes[plan.index] = DUPLICATE
                refused.append(_duplicate_record(plan, str(reply), now, cancelled_ttl_ms))
                count_refused(target.state, plan.message)
        if refused:  # (written again, the same, if this relay dies before forgetting the rows)
            target.records.create_many(refused)
    return outcomes


def _relay_plan(target: _Target, index: int, job: OutboxJob, now: int, declared: Collection[str]) -> Plan:
    """The plan of an outbox job: read as a worker reads a payload (fields this process's model
    does not know are left out of the reading, not of the payload), checked as any insert."""
    actor = job.actor
    if actor is None:
        raise InvalidRequest(job.kind, [{"field": "kind", "message": f"unknown kind {job.kind!r}"}])
    model = actor.kind.model
    request = actor.validate(kwargs=known_fields_only(actor.kind.name, model, job.payload))
    checked = check_request(actor.kind, request, target.broker, declared)
    checked = checked._replace(payload=job.payload, payload_json=payload_json(job.payload))
    return Plan(index, actor, request, checked, delay_ms(actor.kind.name, request, None, now))


def _relayed_job(target: _Target, plan: Plan, now: int) -> RelayedJob:
    """A plan's record and its message as it waits in the schedule: due at ``run_at``, or at once
    (since its caller enqueued it: the lag is counted from then)."""
    record = _new_record(plan, now)
    due = now + plan.delay if plan.delay else plan.message.message_timestamp
    waiting = target.broker.to_schedule(plan.message, due)
    return RelayedJob(record, schedule_entry(waiting), encode(waiting, plan.checked.payload_json), due)


def _refusal(now: int, error_type: str, message: str) -> str:
    """The ``errors`` field of a record refused at relay time: one entry, attempt 0."""
    entry = {"at": now, "error_type": error_type, "message": message[:2000], "traceback": "", "attempt": 0}
    return json.dumps([entry])


def _duplicate_record(plan: Plan, holder: str, now: int, ttl_ms: int) -> NewRecord:
    fields = _record_fields(plan, now + plan.delay if plan.delay else plan.message.message_timestamp)
    for name in (UNIQUE_DIGEST, "unique_key"):  # it holds no lock
        fields.pop(name, None)
    why = (
        f"not enqueued: job {holder_id(holder)} took its unique key between the commit of its "
        "transaction and its relay from the outbox"
    )
    fields.update(state="cancelled", finalized_at=str(now), errors=_refusal(now, "DuplicateJob", why))
    return NewRecord(plan.message.message_id, fields, ttl_ms)


def _invalid_record(job: OutboxJob, error: InvalidRequest, now: int, ttl_ms: int) -> NewRecord:
    kind = job.actor.kind if job.actor is not None else None
    queue = job.payload.get("queue_name") or (kind.queue if kind is not None else JobQueue.DEFAULT)
    priority = job.payload.get("priority")
    if priority not in (1, 2, 3, 4):
        priority = kind.priority if kind is not None else JobPriority.NORMAL
    fields = new_record_fields(
        kind=job.kind,
        queue=str(queue),
        priority=int(priority),
        args_json=payload_json(job.payload),
        state="discarded",
        max_attempts=kind.max_attempts if kind is not None else 0,
        created_ms=job.created_ms,
        scheduled_ms=job.created_ms,
    )
    fields.update(finalized_at=str(now), errors=_refusal(now, "InvalidRequest", str(error)))
    return NewRecord(job.job_id, fields, ttl_ms)
