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
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, NamedTuple, Protocol

import redis

from .models import AttemptError, JobPriority, JobRecord, JobState
from .state import DEAD_KEY, JOB_KEY_PREFIX, KEY_PREFIX, STATS_KEY, MemoryStateStore
from .state import LUA_SET_STATE as _LUA_SET_STATE

#: How many attempt errors a record keeps (the newest).
MAX_ERRORS = 25
#: Records of jobs that have not finished expire after this long without a transition.
OPEN_RECORD_TTL_MS = 30 * 24 * 3600 * 1000
#: Each bulk enqueue script call leaves its reply under a token key this long, so that sending the
#: call again after its reply was lost (see ENQUEUE_MANY_RECORDED) cannot enqueue a job twice.
BULK_TOKEN_PREFIX = KEY_PREFIX + "bulk:"
BULK_TOKEN_TTL_MS = 5 * 60 * 1000

NOT_STARTED = ("available", "scheduled", "retryable")
SEPARATORS = (",", ":")
#: Message option carrying the payload as JSON from the actor to the record (removed before the
#: message is encoded).
ARGS_JSON_OPTION = "epq_args_json"


#: What an id prefix given to :meth:`RecordStore.find_ids` may contain: the characters of job
#: ids (UUIDs, and ids Dramatiq or an application chose), never a glob character of Redis' MATCH.
ID_PREFIX_CHARACTERS = re.compile(r"[0-9A-Za-z_.:-]+")


def job_key(job_id: str) -> str:
    return JOB_KEY_PREFIX + job_id


def check_id_prefix(prefix: str) -> str:
    """``prefix``, if it may be looked up; ValueError otherwise (empty, or a glob character)."""
    if not ID_PREFIX_CHARACTERS.fullmatch(prefix):
        raise ValueError(f"a job id prefix is letters, digits and '_.:-' only, not {prefix!r}")
    return prefix


class NewRecord(NamedTuple):
    """A record to write, with the uniqueness lock to take first (``lock_key`` '' for none)."""

    job_id: str
    fields: Mapping[str, str]
    ttl_ms: int
    lock_key: str = ""
    holder: str = ""
    lock_ttl_ms: int = 0


class BulkGroup(NamedTuple):
    """What the jobs of one group of a bulk enqueue share: their record fields but ``args`` and
    ``unique_key``, and, for jobs that take a lock, their lock's holder value after the job id
    (see ``Uniqueness.holder_tail``) and ttl."""

    fields: Mapping[str, str]
    holder_tail: str = ""
    lock_ttl_ms: int = 0


class BulkJob(NamedTuple):
    """An immediate job for a bulk enqueue (``LaneRedisBroker.bulk_call``): its message, its group
    (jobs of one group pass the same object), its payload as JSON and the key it locks ('' for
    none)."""

    message: Any
    group: BulkGroup
    args_json: str
    lock_key: str = ""


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

    def create_many(self, entries: Sequence[NewRecord]) -> list[str | None]:
        """``create``/``create_locked`` for each entry, in order, in one round trip; for each, None
        when written, or the holder value of the job that holds its lock."""

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

    def get_many(self, job_ids: Sequence[str]) -> list[dict[str, str] | None]:
        """``get`` for each id, in one round trip."""

    def find_ids(self, prefix: str, limit: int) -> list[str]:
        """Ids of (at most ``limit``) jobs with a record whose id starts with ``prefix``, in no
        particular order. Scans every record: for operators, not for hot paths.

        Raises:
          ValueError: ``prefix`` fails :func:`check_id_prefix`.
        """

    def delete(self, job_id: str) -> None: ...

    def dead_ids(self, limit: int) -> list[str]:
        """Ids of discarded jobs, newest first."""

    def forget_dead(self, job_ids: Iterable[str]) -> None: ...

    def counters(self) -> dict[str, int]:
        """``queue|priority|state`` -> number of jobs in that state."""


# Lua: write a new record from its fields (a JSON object of strings, ``state`` among them).
_LUA_WRITE_NEW = """
local function write_new(key, stats, dead, id, now, ttl, fields_json)
  local fields = cjson.decode(fields_json)
  local flat = {}
  for name, value in pairs(fields) do
    flat[#flat + 1] = name
    flat[#flat + 1] = value
  end
  -- a record written again (same id) first leaves the counters of its old state
  local old = redis.call('HGET', key, 'state')
  if old then set_state(key, stats, dead, id, fields['state'], now) end
  redis.call('HSET', key, unpack(flat))
  if not old then
    redis.call('HINCRBY', stats, fields['queue'] .. '|' .. fields['priority'] .. '|' .. fields['state'], 1)
    if fields['state'] == 'discarded' then redis.call('ZADD', dead, now, id) end
  end
  redis.call('PEXPIRE', key, ttl)
  return fields
end
"""

# KEYS: record, stats, dead; ARGV: id, now, ttl, fields (JSON)
_CREATE = (
    _LUA_SET_STATE
    + _LUA_WRITE_NEW
    + "write_new(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4])\nreturn 1\n"
)

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

# Lua: take the uniqueness lock ``key`` for ``holder`` (its value; the job id comes before the
# first '|') for ``ttl`` ms, unless another job holds it: then return that holder value.
_LUA_TAKE_LOCK = """
local function take_lock(key, holder, ttl, id)
  if redis.call('SET', key, holder, 'NX', 'PX', ttl) then return false end
  local current = redis.call('GET', key)
  local sep = string.find(current, '|', 1, true)
  local current_id = sep and string.sub(current, 1, sep - 1) or current
  if current_id ~= id then return current end
  return false
end
"""

# KEYS: record, stats, dead, lock; ARGV: id, now, ttl, lock holder, lock ttl, fields (JSON).
# Takes the uniqueness lock (unless another job holds it: then returns that holder and writes
# nothing) and writes the new record, in one round trip.
_CREATE_LOCKED = (
    _LUA_SET_STATE
    + _LUA_WRITE_NEW
    + _LUA_TAKE_LOCK
    + """
local current = take_lock(KEYS[4], ARGV[4], ARGV[5], ARGV[1])
if current then return current end
write_new(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[6])
return false
"""
)

# Lua: write a record that does not exist yet, from the name, value pairs ARGV[first], ... (a
# state that is not 'discarded' among them), and count it under ``group`` (queue|priority|state).
_LUA_WRITE_FRESH = """
local function write_fresh(key, stats, ttl, first, group)
  redis.call('HSET', key, unpack(ARGV, first))
  redis.call('HINCRBY', stats, group, 1)
  redis.call('PEXPIRE', key, ttl)
end
"""

# The whole of an enqueue on the Redis broker when its state lives in the same Redis, in one
# round trip: take the uniqueness lock (if ARGV[3] is not ''), write the record, and put the
# message on its priority lane (see epq.brokers.redis_lanes).
# KEYS: record, stats, lock (any key when there is no lock), message hash, lane;
# ARGV: id, record ttl, lock holder or '', lock ttl, redis message id, message data, the record's
# counter (queue|priority|state), then its fields as name, value pairs (not one JSON argument:
# decoding it costs Redis more than the extra arguments).
# Returns false when enqueued, the lock's holder value when another job holds it.
ENQUEUE_RECORDED = (
    _LUA_TAKE_LOCK
    + _LUA_WRITE_FRESH
    + """
-- the record exists only if this very call already ran (redis-py retries a call whose reply was
-- lost): the job is enqueued, and must not be pushed twice
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if ARGV[3] ~= '' then
  local current = take_lock(KEYS[3], ARGV[3], ARGV[4], ARGV[1])
  if current then return current end
end
write_fresh(KEYS[1], KEYS[2], ARGV[2], 8, ARGV[7])
redis.call('HSET', KEYS[4], ARGV[5], ARGV[6])
redis.call('RPUSH', KEYS[5], ARGV[5])
return false
"""
)

# Many enqueues as ENQUEUE_RECORDED does one, in order, in one script (bulk enqueue of immediate
# jobs). A later job with the same unique key as an earlier one in the batch finds the earlier
# one's lock. Jobs of a batch share most of their record fields, so those come once per group
# (kind, queue, priority, attempts, creation time); each job brings its id, lock, message and
# payload. Counters, message hashes and lanes are written once per group, not once per job; ids
# go onto each lane in request order. A job's redis message id is its id.
# KEYS: stats, the call's token (a key of its own, where the first run of a call leaves its reply:
# a second run of the same call, sent when the first one's reply was lost, returns that reply and
# writes nothing).
# ARGV: record key prefix, record ttl, Dramatiq's Redis namespace, token ttl, number of groups G,
# 8 per group: record fields but args and unique_key (a JSON object), the lock holder value after
# the job id, the lock ttl, and five fragments f1..f5 of its jobs' encoded messages (see
# epq._messages.data_template); then 5 per job: group (1..G), id, lock key or '', message data
# ('': f1 .. payload .. f2 .. lock key .. f3 .. id .. f4 .. id .. f5), payload (JSON).
# Returns {position, holder, ...} for the jobs that are duplicates (position: 1 = first job).
ENQUEUE_MANY_RECORDED = (
    _LUA_TAKE_LOCK
    + """
local done = redis.call('GET', KEYS[2])
if done then return cjson.decode(done) end
local prefix, ttl, ns, ngroups = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[5])
local groups, hashes, lanes = {}, {}, {}
for g = 1, ngroups do
  local at = 6 + 8 * (g - 1)
  local fields = cjson.decode(ARGV[at])
  local flat = {}
  for name, value in pairs(fields) do
    flat[#flat + 1] = name
    flat[#flat + 1] = value
  end
  local queue = ns .. ':' .. fields['queue']
  local lane = queue .. '.P' .. fields['priority']
  hashes[queue .. '.msgs'] = hashes[queue .. '.msgs'] or {}
  lanes[lane] = lanes[lane] or {}
  groups[g] = {flat = flat, n = 0, msgs = hashes[queue .. '.msgs'], ids = lanes[lane],
    stat = fields['queue'] .. '|' .. fields['priority'] .. '|' .. fields['state'],
    tail = ARGV[at + 1], lock_ttl = ARGV[at + 2], f = {ARGV[at + 3], ARGV[at + 4], ARGV[at + 5],
    ARGV[at + 6], ARGV[at + 7]}}
end
local out, position = {}, 0
for i = 6 + 8 * ngroups, #ARGV, 5 do
  position = position + 1
  local group, id, lock = groups[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2]
  local key = prefix .. id
  local current = false
  if lock ~= '' then current = take_lock(lock, id .. group.tail, group.lock_ttl, id) end
  if current == false then
    redis.call('HSET', key, 'args', ARGV[i + 4], 'unique_key', lock, unpack(group.flat))
    redis.call('PEXPIRE', key, ttl)
    group.n = group.n + 1
    local data = ARGV[i + 3]
    if data == '' then
      local f = group.f
      data = f[1] .. ARGV[i + 4] .. f[2] .. lock .. f[3] .. id .. f[4] .. id .. f[5]
    end
    group.msgs[#group.msgs + 1] = id
    group.msgs[#group.msgs + 1] = data
    group.ids[#group.ids + 1] = id
  else
    out[#out + 1] = position
    out[#out + 1] = current
  end
end
-- (unpack takes a few thousand values at most: bulk.SCRIPT_RUN keeps calls well under that)
for _, group in ipairs(groups) do
  if group.n > 0 then redis.call('HINCRBY', KEYS[1], group.stat, group.n) end
end
for key, entries in pairs(hashes) do
  if #entries > 0 then redis.call('HSET', key, unpack(entries)) end
end
for key, ids in pairs(lanes) do
  if #ids > 0 then redis.call('RPUSH', key, unpack(ids)) end
end
redis.call('SET', KEYS[2], cjson.encode(out), 'PX', ARGV[4])
return out
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

# KEYS: record, stats, dead; ARGV: id, now, ttl. Returns the state before (see LUA_START_RECORD).
START_RECORD = (
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


_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def fields_json(fields: Mapping[str, str]) -> str:
    """Record fields as the JSON object the create scripts take."""
    return _compact_json(fields)


def flat_fields(fields: Mapping[str, str]) -> list[str]:
    """Record fields as name, value pairs (the arguments some scripts take)."""
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
        self._start = client.register_script(START_RECORD)
        self._fail = client.register_script(_FAIL)
        self._delete = client.register_script(_DELETE)
        self._create_locked = client.register_script(_CREATE_LOCKED)

    def _keys(self, job_id: str) -> list[str]:
        return [job_key(job_id), STATS_KEY, DEAD_KEY]

    def create(self, job_id: str, fields: Mapping[str, str], ttl_ms: int) -> None:
        self._create(keys=self._keys(job_id), args=[job_id, self.now_ms(), ttl_ms, fields_json(fields)])

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
        args = [job_id, self.now_ms(), ttl_ms, holder, max(1, lock_ttl_ms), fields_json(fields)]
        current = self._create_locked(keys=keys, args=args)
        return current.decode() if current else None

    def create_many(self, entries: Sequence[NewRecord]) -> list[str | None]:
        now = self.now_ms()
        pipe = self.client.pipeline(transaction=False)
        for e in entries:
            keys = self._keys(e.job_id)
            if e.lock_key:
                args = [e.job_id, now, e.ttl_ms, e.holder, max(1, e.lock_ttl_ms), fields_json(e.fields)]
                self._create_locked(keys=[*keys, e.lock_key], args=args, client=pipe)
            else:
                self._create(keys=keys, args=[e.job_id, now, e.ttl_ms, fields_json(e.fields)], client=pipe)
        out: list[str | None] = []
        for e, reply in zip(entries, pipe.execute(), strict=True):
            out.append(reply.decode() if e.lock_key and reply else None)
        return out

    def move(
        self,
        job_id: str,
        state: str,
        fields: Mapping[str, str],
        ttl_ms: int,
        allowed_from: Sequence[str] = (),
    ) -> str | None:
        args = [job_id, self.now_ms(), ttl_ms, state, ",".join(allowed_from), *flat_fields(fields)]
        old = self._move(keys=self._keys(job_id), args=args)
        return old.decode() if old else None

    def start(self, job_id: str, now_ms: int, ttl_ms: int) -> str | None:
        old = self._start(keys=self._keys(job_id), args=[job_id, now_ms, ttl_ms])
        return old.decode() if old else None

    def fail(
        self, job_id: str, state: str, error: Mapping[str, Any], fields: Mapping[str, str], ttl_ms: int
    ) -> None:
        args = [job_id, self.now_ms(), ttl_ms, state, json.dumps(error), MAX_ERRORS, *flat_fields(fields)]
        self._fail(keys=self._keys(job_id), args=args)

    def get(self, job_id: str) -> dict[str, str] | None:
        return self.get_many([job_id])[0]

    def get_many(self, job_ids: Sequence[str]) -> list[dict[str, str] | None]:
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(job_key(job_id))
        return [{k.decode(): v.decode() for k, v in raw.items()} or None for raw in pipe.execute()]

    def find_ids(self, prefix: str, limit: int) -> list[str]:
        match = job_key(check_id_prefix(prefix)) + "*"  # no glob character can be in the prefix
        found: list[str] = []
        for key in self.client.scan_iter(match=match, count=1000):
            found.append(key.decode()[len(JOB_KEY_PREFIX) :])
            if len(found) >= limit:
                break
        return found

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

    def create_many(self, entries: Sequence[NewRecord]) -> list[str | None]:
        out: list[str | None] = []
        for e in entries:
            if e.lock_key:
                out.append(
                    self.create_locked(e.job_id, e.fields, e.ttl_ms, e.lock_key, e.holder, e.lock_ttl_ms)
                )
            else:
                self.create(e.job_id, e.fields, e.ttl_ms)
                out.append(None)
        return out

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

    def get_many(self, job_ids: Sequence[str]) -> list[dict[str, str] | None]:
        return [self.get(job_id) for job_id in job_ids]

    def find_ids(self, prefix: str, limit: int) -> list[str]:
        check_id_prefix(prefix)
        with self._lock:
            candidates = [job_id for job_id in self._records if job_id.startswith(prefix)]
            return [job_id for job_id in candidates if self._live(job_id) is not None][:limit]

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


def build_fields(
    message: Any, actor: Any, state: str, now_ms: int, scheduled_ms: int, args_json: str | None = None
) -> dict[str, str]:
    """A new record's fields; ``args_json`` (else the message's ``ARGS_JSON_OPTION``, taken off
    it) is the payload as JSON when the caller has it already."""
    return {
        "kind": message.actor_name,
        "queue": message.queue_name.removesuffix(".DQ"),
        "priority": str(message.options.get("epq_priority", actor.options.get("epq_priority", 2))),
        "args": args_json
        or message.options.pop(ARGS_JSON_OPTION, None)
        or json.dumps(message.kwargs, separators=(",", ":")),
        "state": state,
        "attempt": "0",
        "max_attempts": str(message.options.get("max_attempts", actor.options.get("max_attempts", 1))),
        "errors": "[]",
        "created_at": str(message.message_timestamp),
        "scheduled_at": str(scheduled_ms),
        "unique_key": str(message.options.get("epq_unique_key", "")),
    }
