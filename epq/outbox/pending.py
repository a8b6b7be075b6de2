"""Jobs enqueued in the application's transaction (``tx=``): written to the outbox table in it,
``pending`` until a relay moves them into epq (``epq.outbox.relay``).

A request is validated and checked as any insert checks it (``epq.insert.plan_pending``): a bad
one raises ``InvalidRequest`` naming the field and writes nothing. Its job id is made here and
travels in the row, so the caller's result, the relayed job and its record share it.

Uniqueness at call time. A request whose unique key a job holds is not written; the caller gets
that job back (``unique_skipped_as_duplicate=True``; an actor's ``send_with_options(tx=...)``
raises ``DuplicateJob``), as a plain enqueue would:

- a job of the state store (enqueued directly, or relayed already) holds it: that job;
- a pending row holds it (the table's unique index on ``unique_key``): that pending job; a
  transaction whose row holds the key and has not ended makes the second one wait for it, as
  River's unique index does (if it rolls back, the second one's row is written).

The row is written first and the state store read after it: a row that holds a key is deleted
(by its relay) only after its job has taken the key in the state store, so one of the two reads
sees any job that holds it. The request of a held key is then taken out again, in the caller's
transaction. What remains possible: a direct (non-``tx``) enqueue of the same key between the
caller's read and the relay; the relay then cancels the outbox job and records why
(``epq.insert.relay_many``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

import dramatiq
from pydantic import AwareDatetime, TypeAdapter

from .. import insert
from ..backends.base import Backend, backend_of, holder_id
from ..errors import ConfigurationError, EnqueueFailed
from ..kinds import KINDS
from ..middleware.uniqueness import count_refused
from ..models import JobInsertResult, JobRecord, JobState, _Request
from ..outage import state_errors
from ..records import payload_json, to_job_record
from . import sql
from .connections import Statements, dbapi_connection

if TYPE_CHECKING:
    from .._actor import EpqActor

#: Rounds of writing before giving up on rows whose key holder vanished between two reads (a
#: holder relayed and cancelled, its key then let go): each round is rarer than the last.
_ROUNDS = 3


class PendingRow(NamedTuple):
    """An outbox row, as :data:`epq.outbox.sql` reads it."""

    job_id: str
    kind: str
    payload: dict[str, Any]
    unique_key: str | None
    created_ms: int


def pending_record(row: Sequence[Any]) -> JobRecord:
    """The ``pending`` record of an outbox row (``JobRecord``'s fields as a relay would write them,
    the state ``pending``)."""
    job = PendingRow(*row)
    kind = KINDS.get(job.kind)
    payload = job.payload if isinstance(job.payload, dict) else {}
    run_at = payload.get("run_at")
    fields = {
        "kind": job.kind,
        "queue": str(payload.get("queue_name") or (kind.queue if kind else "default")),
        "priority": str(payload.get("priority") or (int(kind.priority) if kind else 2)),
        "args": payload_json(payload),
        "state": JobState.PENDING.value,
        "max_attempts": str(kind.max_attempts if kind else 0),
        "created_at": str(job.created_ms),
    }
    record = to_job_record(job.job_id, fields)
    if isinstance(run_at, str):  # (checked by the caller: an aware ISO datetime)
        scheduled = _DATETIME.validate_python(run_at)
        if scheduled > record.created_at:
            record = record.model_copy(update={"scheduled_at": scheduled})
    return record


_DATETIME = TypeAdapter(AwareDatetime)


def find_pending(db: Statements, job_id: str) -> JobRecord | None:
    """The pending record of ``job_id`` if the outbox holds it."""
    rows = db.rows(sql.pending(db.table), (job_id,))
    return pending_record(rows[0]) if rows else None


def enqueue(
    broker: dramatiq.Broker,
    tx: object,
    items: Sequence[tuple[EpqActor, _Request | Mapping[str, Any]]],
    *,
    many: bool = True,
    delay: timedelta | int | None = None,
) -> list[tuple[insert.Plan, JobInsertResult]]:
    """Write requests to the outbox (the broker's, ``Backend.outbox_table``) in the transaction
    ``tx``; each with its result (a pending job, or the job holding its key), in order (see the
    module docstring).

    Raises:
      InvalidRequest: a request is invalid, or ``tx`` is no transaction epq can write through.
      ConfigurationError: the outbox table does not exist.
      BrokerUnavailable: the state store cannot be reached.
    """
    name = "enqueue_many" if many else items[0][0].actor_name
    backend = backend_of(broker)
    if backend is None:
        raise ConfigurationError(f"the outbox needs a broker epq.setup() built, not {type(broker).__name__}")
    db = Statements(dbapi_connection(tx, name), backend.outbox_table)
    plans = insert.plan_pending(broker, items, many=many, delay=delay)
    results: dict[int, JobInsertResult] = {}
    first: dict[str, insert.Plan] = {}  # by unique key: the earlier of two requests wins
    twins: list[tuple[insert.Plan, insert.Plan]] = []
    todo: list[insert.Plan] = []
    for plan in plans:
        key = plan.lock[0] if plan.lock else None
        if key is not None and key in first:
            twins.append((plan, first[key]))
            continue
        if key is not None:
            first[key] = plan
        todo.append(plan)
    for _ in range(_ROUNDS):
        if not todo:
            break
        todo = _write(db, backend, todo, results)
    if todo:
        raise EnqueueFailed(
            f"the holders of the unique keys of {len(todo)} request(s) kept vanishing while they were "
            "read, and those were not written (the others were: roll the transaction back, or try again)"
        )
    for plan, earlier in twins:
        job = results[earlier.index].job
        results[plan.index] = JobInsertResult(job=job, unique_skipped_as_duplicate=True)
    out = [(plan, results[plan.index]) for plan in plans]
    for plan, result in out:
        if result.unique_skipped_as_duplicate:
            count_refused(backend.state, plan.message)
    return out


def _key(plan: insert.Plan) -> str:
    assert plan.lock is not None
    return plan.lock[0]


def _write(
    db: Statements, backend: Backend, plans: list[insert.Plan], results: dict[int, JobInsertResult]
) -> list[insert.Plan]:
    """One round: write the rows; then find the jobs that hold the keys of the rows not written
    (a pending row holds each), and of the rows written (the state store may hold them: those
    rows are deleted again). Returns the plans whose holder could not be found (see ``_ROUNDS``)."""
    values = [
        (p.message.message_id, p.actor.actor_name, p.checked.payload_json, p.lock[0] if p.lock else None,
         p.message.message_timestamp)
        for p in plans
    ]  # fmt: skip
    if len(values) == 1:
        written = {row[0] for row in db.rows(sql.insert_one(db.table), values[0])}
    else:
        written = {
            row[0] for row in db.rows(sql.insert(db.table), [list(c) for c in zip(*values, strict=True)])
        }
    mine = [plan for plan in plans if plan.message.message_id in written]
    others = [plan for plan in plans if plan.message.message_id not in written]
    holders: dict[int, str] = {}  # plan index -> the holder value of the job holding its key
    locked = [plan for plan in mine if plan.lock]
    for plan, holder in zip(locked, _held(backend, locked), strict=True):
        if holder is not None and holder_id(holder) != plan.message.message_id:
            holders[plan.index] = holder
    if holders:
        db.rows(sql.forget(db.table), ([plan.message.message_id for plan in mine if plan.index in holders],))
    pending = [plan for plan in mine if plan.index not in holders]
    for plan, result in zip(pending, insert.inserted_results(pending, state=JobState.PENDING), strict=True):
        results[plan.index] = result
    rows = {}
    if others:
        rows = {row[3]: row for row in db.rows(sql.holding(db.table), ([_key(p) for p in others],))}
    gone = []
    for plan in others:
        row = rows.get(_key(plan))
        if row is not None:
            results[plan.index] = JobInsertResult(job=pending_record(row), unique_skipped_as_duplicate=True)
        else:
            gone.append(plan)  # its holder was relayed between the two statements: look again
    for plan, holder in zip(gone, _held(backend, gone), strict=True):
        if holder is not None:
            holders[plan.index] = holder
    duplicates = [plan for plan in plans if plan.index in holders]
    if duplicates:
        ids = [holder_id(holders[plan.index]) for plan in duplicates]
        with state_errors("reading the records of the jobs holding the keys"):
            existing = backend.records.get_many(ids)
        for plan, fields in zip(duplicates, existing, strict=True):
            holder = holders[plan.index]
            results[plan.index] = insert.duplicate_result(plan.actor, plan.request, holder, fields)
    return [plan for plan in gone if plan.index not in holders]


def _held(backend: Backend, plans: list[insert.Plan]) -> list[str | None]:
    """The holder values of the plans' keys in the state store."""
    if not plans:
        return []
    with state_errors("reading uniqueness locks"):
        return backend.state.get_unique_many([_key(plan) for plan in plans])
