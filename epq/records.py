"""Job records: River's job states, written on each transition into the record store.

A record holds the fields of :class:`epq.JobRecord` as strings (times in milliseconds since the
epoch); a backend keeps it (``epq.backends.base.RecordStore``) with per queue/priority/state
counters and an index of dead (discarded) jobs, each transition one atomic step. This module is
what every backend and the middleware share: the retention, the fields of a new record, and the
record as a :class:`epq.JobRecord`.

States: ``available``/``scheduled`` → ``running`` → ``completed`` | ``retryable`` → … →
``discarded``; ``cancelled`` from any state before ``running``, and from ``running`` when the
worker running the job stops it (``epq.cancellation``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from .backends.base import unique_lock_key
from .controls import InvalidOutput
from .models import AttemptError, JobPriority, JobRecord, JobState
from .options import ARGS_JSON, PRIORITY, UNIQUE_KEY

#: How many attempt errors a record keeps (the newest).
MAX_ERRORS = 25
#: Records of jobs that have not finished expire after this long without a transition.
OPEN_RECORD_TTL_MS = 30 * 24 * 3600 * 1000
#: How many completed jobs' records a deployment keeps at most, the newest (``EPQ_COMPLETED_MAX``):
#: history bounded by size as well as by age, whatever the throughput (about 16 MB of Redis for
#: register_job-sized records; docs/decisions.md, decision 43).
DEFAULT_COMPLETED_MAX = 10_000
#: How many dead (discarded) jobs' records a deployment keeps at most, the newest
#: (``EPQ_DEAD_MAX``): a burst of failures cannot fill Redis either (docs/decisions.md, decision 45).
DEFAULT_DEAD_MAX = 10_000

NOT_STARTED = ("available", "scheduled", "retryable")
#: The state of a deleted job's tombstone (``RecordStore.bury``): no record to read, list or count,
#: but its message, wherever it waits, is skipped as a cancelled job's is.
DELETED = "deleted"
#: States whose job a worker skips instead of starting it.
SKIPPED = ("cancelled", DELETED)

#: What ``QueueService.list_jobs`` filters on: the record fields an index is kept of, each
#: filter's name as its field's (``endpoint_id`` from the job's payload, see
#: :func:`new_record_fields`).
INDEXED_FIELDS = ("state", "kind", "queue", "priority", "endpoint_id")


def index_position(created_ms: object, job_id: str) -> str:
    """Where a record sorts in the listing indexes: its creation time (ms, 13 digits) then its
    id, so that text order is creation order (``lua/lib/index.lua`` makes it the same way). A
    page's cursor is the position of its last job."""
    return f"{int(str(created_ms)):013d}:{job_id}"


#: The shape of :func:`index_position`'s value (what a cursor decodes to).
INDEX_POSITION = re.compile(r"[0-9]{13}:[0-9A-Za-z_.:-]+")

#: The largest JSON of a handler's return value kept on its record (``EPQ_OUTPUT_MAX_BYTES``).
DEFAULT_OUTPUT_MAX_BYTES = 64 * 1024


#: What an id prefix given to :meth:`RecordStore.find_ids` may contain: the characters of job
#: ids (UUIDs, and ids Dramatiq or an application chose), never a glob character of Redis' MATCH.
ID_PREFIX_CHARACTERS = re.compile(r"[0-9A-Za-z_.:-]+")


def check_id_prefix(prefix: str) -> str:
    """``prefix``, if it may be looked up; ValueError otherwise (empty, or a glob character)."""
    if not ID_PREFIX_CHARACTERS.fullmatch(prefix):
        raise ValueError(f"a job id prefix is letters, digits and '_.:-' only, not {prefix!r}")
    return prefix


#: The field of a record that names its uniqueness lock by the lock key's digest (the kind is
#: the record's own ``kind``): short enough that Redis keeps a record without its payload in its
#: compact encoding, whatever the kind's name. A lock key of another form, and records written
#: before this field, keep the whole key under ``unique_key``; :func:`lock_key_of` reads both.
UNIQUE_DIGEST = "unique_digest"


_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def payload_json(kwargs: Mapping[str, Any]) -> str:
    """A job's payload as a record keeps it (``args``): compact JSON."""
    return _compact_json(kwargs)


def output_json(kind: str, value: Any, max_bytes: int) -> str:
    """A handler's return value as its record keeps it (``output``): compact JSON.

    Raises:
      InvalidOutput: ``value`` is not JSON (a set, a datetime, NaN, ...), or its JSON is larger
        than ``max_bytes``; the message names the kind and the limit.
    """
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        size = len(text.encode())
    except (TypeError, ValueError) as exc:  # (UnicodeEncodeError is a ValueError)
        raise InvalidOutput(
            f"{kind}: the handler returned a value that is not JSON ({exc}); a job's output is "
            "what json.dumps takes: dicts, lists, text, numbers, booleans, None"
        ) from None
    if size > max_bytes:
        raise InvalidOutput(
            f"{kind}: the handler returned {size} bytes of JSON, more than the {max_bytes} bytes "
            "a job's output may be (EPQ_OUTPUT_MAX_BYTES)"
        )
    return text


def lock_key_of(fields: Mapping[str, str]) -> str:
    """The uniqueness lock a record's job holds (or held), '' for none."""
    digest = fields.get(UNIQUE_DIGEST)
    if digest:
        return unique_lock_key(fields["kind"], digest)
    return fields.get("unique_key", "")


def lock_fields(kind: str, lock_key: str) -> dict[str, str]:
    """How a new record names its lock: by the digest when the key is the kind's own
    (:func:`epq.backends.base.unique_lock_key`, as every epq lock is; ``lua/lib/lock_digest.lua``
    cuts it the same way), else the whole key; nothing without a lock."""
    digest = lock_key.rpartition(":")[2]
    if lock_key and lock_key == unique_lock_key(kind, digest):
        return {UNIQUE_DIGEST: digest}
    return {"unique_key": lock_key} if lock_key else {}


def without_payload(fields: Mapping[str, str]) -> dict[str, str]:
    """A new record's fields without the payload, for a backend that files the record beside its
    job's message (the Redis broker keeping epq's state: the payload is stored once, in the
    message, until the job finishes; the record store reads it from there)."""
    return {name: value for name, value in fields.items() if name != "args"}


def _dt(ms: str | None) -> datetime | None:
    if not ms:
        return None
    return datetime.fromtimestamp(int(float(ms)) / 1000, tz=timezone.utc)


def to_job_record(job_id: str, fields: Mapping[str, str]) -> JobRecord:
    """A :class:`JobRecord` from stored fields."""
    errors = [
        AttemptError(
            attempt=int(e["attempt"]),
            at=_dt(str(e["at"])) or datetime.now(timezone.utc),
            error_type=str(e["error_type"]),
            message=str(e["message"]),
            traceback=str(e.get("traceback", "")),
        )
        for e in json.loads(fields.get("errors", "[]"))
    ]
    created = _dt(fields.get("created_at")) or datetime.now(timezone.utc)
    return JobRecord(
        id=job_id,
        kind=fields["kind"],
        queue=fields["queue"],
        priority=JobPriority(int(fields["priority"])),
        args=json.loads(fields.get("args", "{}")),
        state=JobState(fields["state"]),
        attempt=int(fields.get("attempt", "0")),
        max_attempts=int(fields.get("max_attempts", "1")),
        snoozes=int(fields.get("snoozes", "0")),
        errors=errors,
        created_at=created,
        scheduled_at=_dt(fields.get("scheduled_at")) or created,
        attempted_at=_dt(fields.get("attempted_at")),
        finalized_at=_dt(fields.get("finalized_at")),
        cancel_requested_at=_dt(fields.get("cancel_requested_at")),
        output=json.loads(fields["output"]) if fields.get("output") else None,
    )


def new_record_fields(
    *,
    kind: str,
    queue: str,
    priority: object,
    args_json: str,
    state: str,
    max_attempts: object,
    created_ms: int,
    scheduled_ms: int,
    unique_key: str = "",
    endpoint_id: object = None,
) -> dict[str, str]:
    """The fields of a new record (the one place they are made; a backend stores them as they
    are). Fields at their default are left out, as readers take them: no attempt yet, no errors,
    due when created (:func:`to_job_record`, the record scripts). ``endpoint_id``: the job's
    endpoint (every kind's payload names one), kept as a field of its own for the listing
    indexes."""
    fields = {
        "kind": kind,
        "queue": queue.removesuffix(".DQ"),
        "priority": str(priority),
        "args": args_json,
        "state": state,
        "max_attempts": str(max_attempts),
        "created_at": str(created_ms),
        **lock_fields(kind, unique_key),
    }
    if endpoint_id:
        fields["endpoint_id"] = str(endpoint_id)
    if scheduled_ms != created_ms:
        fields["scheduled_at"] = str(scheduled_ms)
    return fields


def message_record_fields(
    message: Any, actor: Any, state: str, scheduled_ms: int, args_json: str | None = None
) -> dict[str, str]:
    """The fields of a new record of an epq message (created when the message was): its
    payload as JSON is ``args_json``, else the message's ``ARGS_JSON`` option (taken off it),
    else encoded here."""
    options = message.options
    return new_record_fields(
        kind=message.actor_name,
        queue=message.queue_name,
        priority=options.get(PRIORITY, actor.options.get(PRIORITY, 2)),
        args_json=args_json or options.pop(ARGS_JSON, None) or payload_json(message.kwargs),
        state=state,
        max_attempts=options.get("max_attempts", actor.options.get("max_attempts", 1)),
        created_ms=message.message_timestamp,
        scheduled_ms=scheduled_ms,
        unique_key=str(options.get(UNIQUE_KEY, "")),
        endpoint_id=message.kwargs.get("endpoint_id"),
    )
