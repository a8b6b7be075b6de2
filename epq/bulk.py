"""Bulk enqueue: many jobs in a few round trips, each with its own uniqueness answer.

Used by :meth:`epq.QueueService.enqueue_many` and the actors' ``send_many``. For each request,
in order, the result is a :class:`~epq.JobInsertResult`: enqueued, or skipped as a duplicate of
the job holding its unique key (an earlier request of the same batch included).

- Every request is validated first; any bad one raises :class:`~epq.InvalidRequest` naming it
  (``[index].field``) and nothing is enqueued.
- Redis with epq's state in the same server: each run of up to ``CHUNK`` immediate jobs is one
  Lua script (locks, records and messages together; no other client sees it half-done). Jobs
  with a delay go the general way. Requests are handled in order, so of two with the same
  unique key the earlier one wins.
- Otherwise: one pipelined round trip takes the locks and writes the records, then the broker
  publishes the batch at once (Redis: one MULTI/EXEC; RabbitMQ: one AMQP transaction; stub: in
  memory). If publishing fails, the records and locks of the batch are taken back.

A failure part-way through a batch larger than one run leaves the earlier runs enqueued; the
error says how many jobs were, and up to which request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dramatiq
import pika.exceptions
import redis
from dramatiq.errors import BrokerConnectionError

from ._actor import EpqActor, _delay_ms
from .brokers import display_url
from .errors import BrokerUnavailable, DuplicateJob, InvalidRequest
from .middleware import JobRecords, Uniqueness, _bulk, find_middleware
from .models import JobInsertResult, _Request
from .records import OPEN_RECORD_TTL_MS, NewRecord, build_fields, to_job_record

if TYPE_CHECKING:
    from ._runtime import Runtime

#: Jobs per Lua script (Redis) or per pipeline: bounds how long one script holds Redis.
CHUNK = 500


@dataclass
class _Job:
    index: int
    actor: EpqActor
    request: _Request
    message: dramatiq.Message[Any]
    delay: int | None
    record: NewRecord


def enqueue_many(
    runtime: Runtime, items: Iterable[tuple[EpqActor, _Request | Mapping[str, Any]]]
) -> list[JobInsertResult]:
    """Enqueue requests (models, or mappings of their fields) on the runtime's broker."""
    broker = runtime.broker
    jobs = _prepare(runtime, items)
    holders: list[str | None] = [None] * len(jobs)
    handled: list[_Job] = []  # jobs whose enqueue (or duplicate answer) is final
    fused = getattr(broker, "epq_records_fused", False)
    token = _bulk.set(True)
    try:
        for run in _runs(jobs, fused):
            if fused and not run[0].delay:
                _fused_run(runtime, run, holders)
            else:
                _general_run(runtime, run, holders)
            handled += run
    except (redis.RedisError, BrokerConnectionError, pika.exceptions.AMQPError, OSError) as exc:
        enqueued = sum(1 for job in handled if holders[job.index] is None)
        raise BrokerUnavailable(
            f"bulk enqueue on {display_url(broker)} failed after {enqueued} of {len(jobs)} jobs were "
            f"enqueued (requests [0] to [{len(handled) - 1}] were handled, in order; the rest were "
            f"not): {exc!r}"
        ) from exc
    finally:
        _bulk.reset(token)
    return _results(runtime, jobs, holders)


def _validate(actor: EpqActor, request: _Request | Mapping[str, Any]) -> _Request:
    model = actor.kind.model
    if isinstance(request, Mapping):
        return actor.validate(kwargs=dict(request))
    if isinstance(request, model):
        return request
    problem = f"{actor.actor_name} takes a {model.__name__} or a mapping, not {type(request).__name__}"
    raise InvalidRequest(actor.actor_name, [{"field": "request", "message": problem}])


def _prepare(runtime: Runtime, items: Iterable[tuple[EpqActor, _Request | Mapping[str, Any]]]) -> list[_Job]:
    """Validate every request and build its message, record and lock; refuse the whole batch,
    naming every problem, if any request is bad."""
    broker = runtime.broker
    now = runtime.state.now_ms()
    uniqueness = find_middleware(broker, Uniqueness)
    if find_middleware(broker, JobRecords) is None:  # pragma: no cover - epq.setup adds it
        raise RuntimeError("bulk enqueue needs epq's JobRecords middleware")
    jobs: list[_Job] = []
    errors: list[dict[str, str]] = []
    for index, (actor, raw) in enumerate(items):
        try:
            request = _validate(actor, raw)
            message = actor.message_for(request, broker=broker)
            delay = _delay_ms(actor.kind.name, request, None, now)
        except InvalidRequest as exc:
            errors += [{"field": f"[{index}].{e['field']}", "message": e["message"]} for e in exc.errors]
            continue
        lock = uniqueness.lock_for(broker, message, delay) if uniqueness is not None else None
        state = "scheduled" if delay else "available"
        fields = build_fields(message, actor, state, now, now + int(delay or 0))
        ttl = OPEN_RECORD_TTL_MS + int(delay or 0)
        if lock is None:
            record = NewRecord(message.message_id, fields, ttl)
        else:
            key, holder, lock_ttl = lock
            fields["unique_key"] = key
            message.options["epq_unique_key"] = key
            record = NewRecord(message.message_id, fields, ttl, key, holder, lock_ttl)
        message.options["epq_recorded"] = 1
        jobs.append(_Job(index, actor, request, message, delay, record))
    if errors:
        raise InvalidRequest("enqueue_many", errors)
    return jobs


def _runs(jobs: list[_Job], fused: bool) -> Iterable[list[_Job]]:
    """Consecutive jobs that go the same way (on a fused broker, immediate jobs by script and
    delayed ones the general way), ``CHUNK`` at most, in request order: so that of two requests
    with the same unique key, the earlier one always wins."""
    run: list[_Job] = []
    for job in jobs:
        if run and (len(run) >= CHUNK or (fused and bool(run[0].delay) != bool(job.delay))):
            yield run
            run = []
        run.append(job)
    if run:
        yield run


def _fused_run(runtime: Runtime, run: list[_Job], holders: list[str | None]) -> None:
    broker: Any = runtime.broker
    replies = broker.enqueue_many_recorded([(j.message, j.record) for j in run], runtime.state.now_ms())
    for job, holder in zip(run, replies, strict=True):
        holders[job.index] = holder


def _general_run(runtime: Runtime, run: list[_Job], holders: list[str | None]) -> None:
    broker: Any = runtime.broker
    try:
        replies = runtime.records.create_many([job.record for job in run])
    except BaseException:
        _take_back(runtime, run)  # part of the pipeline may have run: these ids are ours alone
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
        _take_back(runtime, accepted)  # nothing of the run was published
        raise


def _take_back(runtime: Runtime, jobs: list[_Job]) -> None:
    """Delete the records and free the locks these jobs took (a lock held by another job stays)."""
    for job in jobs:
        runtime.records.delete(job.message.message_id)
        if job.record.lock_key:
            runtime.state.release_unique(job.record.lock_key, job.message.message_id)


def _results(runtime: Runtime, jobs: list[_Job], holders: list[str | None]) -> list[JobInsertResult]:
    # the records of the jobs holding the duplicates' keys, read in one round trip
    holder_ids = {h.split("|", 1)[0] for h in holders if h is not None}
    existing_fields = dict(zip(holder_ids, runtime.records.get_many(list(holder_ids)), strict=True))
    out: list[JobInsertResult] = []
    for job in jobs:
        holder = holders[job.index]
        if holder is None:
            record = job.actor.record_for(job.message, job.request)
            out.append(JobInsertResult(job=record, unique_skipped_as_duplicate=False))
            continue
        existing_id = holder.split("|", 1)[0]
        fields = existing_fields[existing_id]
        if fields is not None:
            existing = to_job_record(existing_id, fields)
        else:  # no record (expired): what the lock says
            dup = DuplicateJob(job.actor.actor_name, existing_id, holder=holder)
            existing = job.actor.record_for_duplicate(dup, job.request)
        out.append(JobInsertResult(job=existing, unique_skipped_as_duplicate=True))
    return out
