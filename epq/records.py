"""Job records: River's job states, written on each transition into the state store.

A record is a hash ``epq:job:<id>`` (Redis) or a dict (memory) with the fields of
:class:`epq.JobRecord`; times are milliseconds since the epoch. Each transition is one atomic
step (a Lua script on Redis) that also keeps per queue/priority/state counters in
``epq:stats`` and the index of dead (discarded) jobs in ``epq:dead``.

States: ``available``/``scheduled`` → ``running`` → ``completed`` | ``retryable`` → … →
``discarded``; ``cancelled`` from any state before ``running``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

import redis

from .models import AttemptError, JobPriority, JobRecord, JobState
from .state import DEAD_KEY, JOB_KEY_PREFIX, STATS_KEY, MemoryStateStore
from .state import LUA_SET_STATE as _LUA_SET_STATE

#: How many attempt errors a record keeps (the newest).
MAX_ERRORS = 25
#: Records of jobs that have not finished expire after this long without a transition.
OPEN_RECORD_TTL_MS = 30 * 24 * 3600 * 1000

NOT_STARTED = ("available", "scheduled", "retryable")


def job_key(job_id: str) -> str:
    return JOB_KEY_PREFIX + job_id


class RecordStore(Protocol):
    def create(self, job_id: str, fields: Mapping[str, str], ttl_ms: int) -> None:
        """Write a new record (``fields`` include ``state``, ``queue`` and ``priority``)."""

    def create_locked(
        self,
        job_id: str,
        fields: Mapping[str, str],
        ttl_ms: int,
        lock_key: str,
        holder: str,
        lock_ttl_ms: int,
    ) -> str | None:
        """Take the uniqueness lock and write the record, atomically; if another job holds the
        lock, write nothing and return its holder value."""

    def move(
        self,
        job_id: str,
        state: str,
        fields: Mapping[str, str],
        ttl_ms: int,
        allowed_from: Sequence[str] = (),
    ) -> str | None:
        """Set ``state`` (if the current state is in ``allowed_from``, or always when empty).

        Returns the state before, or None when there is no record."""

    def start(self, job_id: str, now_ms: int, ttl_ms: int) -> str | None:
        """Mark the job running, one more attempt; returns the state before (``cancelled``: not
        started)."""

    def fail(
        self, job_id: str, state: str, error: Mapping[str, Any], fields: Mapping[str, str], ttl_ms: int
    ) -> None:
        """Append an attempt error and set ``state``."""

    def get(self, job_id: str) -> dict[str, str] | None: ...

    def delete(self, job_id: str) -> None: ...

    def dead_ids(self, limit: int) -> list[str]:
        """Ids of discarded jobs, newest first."""

    def forget_dead(self, job_ids: Iterable[str]) -> None: ...

    def counters(self) -> dict[str, int]:
        """``queue|priority|state`` -> number of jobs in that state."""


# Writes a new record from ARGV[first], ARGV[first + 1], ... (field, value pairs); KEYS: record,
# stats, dead; ARGV[1] id, ARGV[2] now, ARGV[3] ttl.
_LUA_WRITE_NEW = """
local function write_new(first)
  local state
  local pairs_ = {}
  for i = first, #ARGV, 2 do
    if ARGV[i] == 'state' then
      state = ARGV[i + 1]
    else
      pairs_[#pairs_ + 1] = ARGV[i]
      pairs_[#pairs_ + 1] = ARGV[i + 1]
    end
  end
  if #pairs_ > 0 then redis.call('HSET', KEYS[1], unpack(pairs_)) end
  set_state(KEYS[1], KEYS[2], KEYS[3], ARGV[1], state, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
"""

# KEYS: record, stats, dead; ARGV: id, now, ttl, field1, value1, ...
_CREATE = _LUA_SET_STATE + _LUA_WRITE_NEW + "write_new(4)\nreturn 1\n"

# KEYS: record, stats, dead; ARGV: id, now, ttl, new state, allowed (comma list, '' = any), f1, v1, ...
_MOVE = (
    _LUA_SET_STATE
    + """
local old = redis.call('HGET', KEYS[1], 'state')
if not old then return false end
if ARGV[5] ~= '' and not string.find(',' .. ARGV[5] .. ',', ',' .. old .. ',', 1, true) then return old end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
set_state(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[4], ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return old
"""
)

# KEYS: record, stats, dead, lock; ARGV: id, now, ttl, lock holder, lock ttl, field1, value1, ...
# Takes the uniqueness lock (unless another job holds it: then returns that holder and writes
# nothing) and writes the new record, in one round trip.
# Lua: take the lock at KEYS[4] for ARGV[4] (holder) for ARGV[5] ms, unless another job (the id
# before '|' in the holder value) holds it: then return that holder value. ARGV[1] is this job.
_LUA_TAKE_LOCK = """
local function take_lock()
  local current = redis.call('GET', KEYS[4])
  if current then
    local sep = string.find(current, '|', 1, true)
    local current_id = sep and string.sub(current, 1, sep - 1) or current
    if current_id ~= ARGV[1] then return current end
  else
    redis.call('SET', KEYS[4], ARGV[4], 'PX', ARGV[5])
  end
  return false
end
"""

_CREATE_LOCKED = (
    _LUA_SET_STATE
    + _LUA_WRITE_NEW
    + _LUA_TAKE_LOCK
    + """
local current = take_lock()
if current then return current end
write_new(6)
return false
"""
)

# The whole of an enqueue on the Redis broker when its state lives in the same Redis, in one
# round trip: take the uniqueness lock (if ARGV[4] is not ''), write the record, and put the
# message on its priority lane (see epq.brokers.redis_lanes).
# KEYS: record, stats, dead, lock (any key when there is no lock), message hash, lane;
# ARGV: id, now, ttl, lock holder or '', lock ttl, redis message id, message data, the record's
# fields as a JSON object of strings (one argument: far cheaper to send than one per field).
# Returns false when enqueued, the lock's holder value when another job holds it.
ENQUEUE_RECORDED = (
    _LUA_SET_STATE
    + _LUA_WRITE_NEW
    + _LUA_TAKE_LOCK
    + """
if ARGV[4] ~= '' then
  local current = take_lock()
  if current then return current end
end
for name, value in pairs(cjson.decode(ARGV[8])) do ARGV[#ARGV + 1] = name; ARGV[#ARGV + 1] = value end
write_new(9)
redis.call('HSET', KEYS[5], ARGV[6], ARGV[7])
redis.call('RPUSH', KEYS[6], ARGV[6])
return false
"""
)

# KEYS: record, stats, dead; ARGV: id. Deletes the record, its counter and its dead entry.
_DELETE = """
redis.call('ZREM', KEYS[3], ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
local group = redis.call('HGET', KEYS[1], 'queue') .. '|' .. redis.call('HGET', KEYS[1], 'priority') .. '|'
redis.call('HINCRBY', KEYS[2], group .. state, -1)
redis.call('DEL', KEYS[1])
return 1
"""

# Lua: mark a record running (one more attempt) unless cancelled; returns the state before, or
# false when there is no record. Needs LUA_SET_STATE.
LUA_START_RECORD = """
local function start_record(key, stats, dead, id, now, ttl)
  local old = redis.call('HGET', key, 'state')
  if not old then return false end
  if old == 'cancelled' then return old end
  set_state(key, stats, dead, id, 'running', now)
  redis.call('HINCRBY', key, 'attempt', 1)
  redis.call('HSET', key, 'attempted_at', now)
  redis.call('PEXPIRE', key, ttl)
  return old
end
"""

# Lua: mark a running record completed (finalized now, kept for ttl). Needs LUA_SET_STATE.
LUA_COMPLETE_RECORD = """
local function complete_record(key, stats, dead, id, now, ttl)
  if redis.call('HGET', key, 'state') ~= 'running' then return end
  redis.call('HSET', key, 'finalized_at', now)
  set_state(key, stats, dead, id, 'completed', now)
  redis.call('PEXPIRE', key, ttl)
end
"""

# Lua: put a record that was started but never ran (fetched, then requeued at shutdown) back
# to available, taking its attempt back. Needs LUA_SET_STATE.
LUA_UNSTART_RECORD = """
local function unstart_record(key, stats, dead, id, now)
  if redis.call('HGET', key, 'state') ~= 'running' then return end
  set_state(key, stats, dead, id, 'available', now)
  redis.call('HINCRBY', key, 'attempt', -1)
end
"""

# KEYS: record, stats, dead; ARGV: id, now, ttl
_START = (
    _LUA_SET_STATE
    + LUA_START_RECORD
    + "return start_record(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3])\n"
)

# KEYS: record, stats, dead; ARGV: id, now, ttl, new state, error json, max errors, f1, v1, ...
_FAIL = (
    _LUA_SET_STATE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local errors = cjson.decode(redis.call('HGET', KEYS[1], 'errors') or '[]')
local err = cjson.decode(ARGV[5])
err['attempt'] = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
table.insert(errors, err)
while #errors > tonumber(ARGV[6]) do table.remove(errors, 1) end
redis.call('HSET', KEYS[1], 'errors', cjson.encode(errors))
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
set_state(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[4], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
)


def _flat(fields: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        out += [name, value]
    return out


class RedisRecords:
    """Job records in Redis; every method is one round trip."""

    def __init__(self, client: redis.Redis[bytes], clock_ms: Any) -> None:
        self.client = client
        self.now_ms = clock_ms
        self._create = client.register_script(_CREATE)
        self._move = client.register_script(_MOVE)
        self._start = client.register_script(_START)
        self._fail = client.register_script(_FAIL)
        self._delete = client.register_script(_DELETE)
        self._create_locked = client.register_script(_CREATE_LOCKED)

    def _keys(self, job_id: str) -> list[str]:
        return [job_key(job_id), STATS_KEY, DEAD_KEY]

    def create(self, job_id: str, fields: Mapping[str, str], ttl_ms: int) -> None:
        self._create(keys=self._keys(job_id), args=[job_id, self.now_ms(), ttl_ms, *_flat(fields)])

    def create_locked(
        self,
        job_id: str,
        fields: Mapping[str, str],
        ttl_ms: int,
        lock_key: str,
        holder: str,
        lock_ttl_ms: int,
    ) -> str | None:
        keys = [*self._keys(job_id), lock_key]
        args = [job_id, self.now_ms(), ttl_ms, holder, max(1, lock_ttl_ms), *_flat(fields)]
        current = self._create_locked(keys=keys, args=args)
        return current.decode() if current else None

    def move(
        self,
        job_id: str,
        state: str,
        fields: Mapping[str, str],
        ttl_ms: int,
        allowed_from: Sequence[str] = (),
    ) -> str | None:
        args = [job_id, self.now_ms(), ttl_ms, state, ",".join(allowed_from), *_flat(fields)]
        old = self._move(keys=self._keys(job_id), args=args)
        return old.decode() if old else None

    def start(self, job_id: str, now_ms: int, ttl_ms: int) -> str | None:
        old = self._start(keys=self._keys(job_id), args=[job_id, now_ms, ttl_ms])
        return old.decode() if old else None

    def fail(
        self, job_id: str, state: str, error: Mapping[str, Any], fields: Mapping[str, str], ttl_ms: int
    ) -> None:
        args = [job_id, self.now_ms(), ttl_ms, state, json.dumps(error), MAX_ERRORS, *_flat(fields)]
        self._fail(keys=self._keys(job_id), args=args)

    def get(self, job_id: str) -> dict[str, str] | None:
        raw = self.client.hgetall(job_key(job_id))
        if not raw:
            return None
        return {k.decode(): v.decode() for k, v in raw.items()}

    def delete(self, job_id: str) -> None:
        self._delete(keys=self._keys(job_id), args=[job_id])

    def dead_ids(self, limit: int) -> list[str]:
        """Newest first; ids whose record has expired are dropped from the index on the way."""
        ids = [i.decode() for i in self.client.zrevrange(DEAD_KEY, 0, -1)]
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(job_key(job_id))
        alive = pipe.execute()
        gone = [job_id for job_id, exists in zip(ids, alive, strict=True) if not exists]
        if gone:
            self.client.zrem(DEAD_KEY, *gone)
        return [job_id for job_id, exists in zip(ids, alive, strict=True) if exists][:limit]

    def forget_dead(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self.delete(job_id)

    def counters(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.client.hgetall(STATS_KEY).items()}


class MemoryRecords:
    """Job records in memory (stub broker), on the state store's clock."""

    def __init__(self, state: MemoryStateStore) -> None:
        self.state = state
        self._lock = threading.Lock()
        self._records: dict[str, tuple[dict[str, str], int]] = {}  # id -> (fields, expires ms)
        self._stats: dict[str, int] = {}
        self._dead: dict[str, int] = {}

    def _live(self, job_id: str) -> dict[str, str] | None:
        item = self._records.get(job_id)
        if item is None:
            return None
        if item[1] <= self.state.now_ms():
            self._drop(job_id)
            return None
        return item[0]

    def _drop(self, job_id: str) -> None:
        fields, _ = self._records.pop(job_id)
        self._count(fields, fields["state"], -1)
        self._dead.pop(job_id, None)

    def _count(self, fields: Mapping[str, str], state: str, delta: int) -> None:
        group = f"{fields['queue']}|{fields['priority']}|{state}"
        self._stats[group] = self._stats.get(group, 0) + delta

    def _set_state(self, job_id: str, fields: dict[str, str], state: str) -> str | None:
        old = fields.get("state")
        if old is not None:
            self._count(fields, old, -1)
        self._count(fields, state, 1)
        fields["state"] = state
        if state == "discarded":
            self._dead[job_id] = self.state.now_ms()
        elif old == "discarded":
            self._dead.pop(job_id, None)
        return old

    def _expire(self, job_id: str, ttl_ms: int) -> None:
        fields, _ = self._records[job_id]
        self._records[job_id] = (fields, self.state.now_ms() + ttl_ms)

    def create_locked(
        self,
        job_id: str,
        fields: Mapping[str, str],
        ttl_ms: int,
        lock_key: str,
        holder: str,
        lock_ttl_ms: int,
    ) -> str | None:
        current = self.state.acquire_unique(lock_key, holder, lock_ttl_ms)
        if current is None:
            self.create(job_id, fields, ttl_ms)
        return current

    def create(self, job_id: str, fields: Mapping[str, str], ttl_ms: int) -> None:
        with self._lock:
            record = {k: v for k, v in fields.items() if k != "state"}
            self._records[job_id] = (record, 0)
            self._set_state(job_id, record, fields["state"])
            self._expire(job_id, ttl_ms)

    def move(
        self,
        job_id: str,
        state: str,
        fields: Mapping[str, str],
        ttl_ms: int,
        allowed_from: Sequence[str] = (),
    ) -> str | None:
        with self._lock:
            record = self._live(job_id)
            if record is None:
                return None
            old = record["state"]
            if allowed_from and old not in allowed_from:
                return old
            record.update(fields)
            self._set_state(job_id, record, state)
            if ttl_ms > 0:
                self._expire(job_id, ttl_ms)
            return old

    def start(self, job_id: str, now_ms: int, ttl_ms: int) -> str | None:
        with self._lock:
            record = self._live(job_id)
            if record is None:
                return None
            old = record["state"]
            if old == "cancelled":
                return old
            self._set_state(job_id, record, "running")
            record["attempt"] = str(int(record.get("attempt", "0")) + 1)
            record["attempted_at"] = str(now_ms)
            self._expire(job_id, ttl_ms)
            return old

    def fail(
        self, job_id: str, state: str, error: Mapping[str, Any], fields: Mapping[str, str], ttl_ms: int
    ) -> None:
        with self._lock:
            record = self._live(job_id)
            if record is None:
                return
            errors = json.loads(record.get("errors", "[]"))
            errors = [*errors, {**error, "attempt": int(record.get("attempt", "0"))}][-MAX_ERRORS:]
            record["errors"] = json.dumps(errors)
            record.update(fields)
            self._set_state(job_id, record, state)
            self._expire(job_id, ttl_ms)

    def get(self, job_id: str) -> dict[str, str] | None:
        with self._lock:
            record = self._live(job_id)
            return dict(record) if record is not None else None

    def delete(self, job_id: str) -> None:
        with self._lock:
            if self._live(job_id) is not None:
                self._drop(job_id)

    def dead_ids(self, limit: int) -> list[str]:
        with self._lock:
            ids = sorted(self._dead, key=lambda i: self._dead[i], reverse=True)
            return [i for i in ids if self._live(i) is not None][:limit]

    def forget_dead(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self.delete(job_id)

    def counters(self) -> dict[str, int]:
        with self._lock:
            for job_id in list(self._records):
                self._live(job_id)
            return dict(self._stats)


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
        errors=errors,
        created_at=created,
        scheduled_at=_dt(fields.get("scheduled_at")) or created,
        attempted_at=_dt(fields.get("attempted_at")),
        finalized_at=_dt(fields.get("finalized_at")),
    )


def build_fields(message: Any, actor: Any, state: str, now_ms: int, scheduled_ms: int) -> dict[str, str]:
    return {
        "kind": message.actor_name,
        "queue": message.queue_name.removesuffix(".DQ"),
        "priority": str(message.options.get("epq_priority", actor.options.get("epq_priority", 2))),
        "args": json.dumps(message.kwargs, separators=(",", ":")),
        "state": state,
        "attempt": "0",
        "max_attempts": str(message.options.get("max_attempts", actor.options.get("max_attempts", 1))),
        "errors": "[]",
        "created_at": str(message.message_timestamp),
        "scheduled_at": str(scheduled_ms),
        "unique_key": str(message.options.get("epq_unique_key", "")),
    }
