"""The state store: uniqueness locks now; the durable schedule and job records build on it.

One store is shared by every process of a deployment: the broker's Redis, the Redis named by
``EPQ_STATE_URL`` next to RabbitMQ, or memory (with an injectable clock) for the stub broker.
Times are milliseconds.
"""

from __future__ import annotations

import heapq
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis

from .priority import LUA_LANE_OF

#: Every key epq writes starts with this.
KEY_PREFIX = "epq:"
#: The durable schedule: entry ids by due time (ms), their messages, and claimed entries by lease end.
SCHEDULE_KEY = KEY_PREFIX + "schedule"
SCHEDULE_DATA_KEY = KEY_PREFIX + "schedule:data"
SCHEDULE_CLAIMED_KEY = KEY_PREFIX + "schedule:claimed"
#: Job records (a hash per job), per queue/priority/state counters, and dead jobs by time.
JOB_KEY_PREFIX = KEY_PREFIX + "job:"
STATS_KEY = KEY_PREFIX + "stats"
DEAD_KEY = KEY_PREFIX + "dead"

# Lua shared by the record scripts: move a record to a state, keeping counters and the dead index.
LUA_SET_STATE = """
local function set_state(key, stats, dead, id, new_state, now)
  local old = redis.call('HGET', key, 'state')
  local group = redis.call('HGET', key, 'queue') .. '|' .. redis.call('HGET', key, 'priority') .. '|'
  if old then redis.call('HINCRBY', stats, group .. old, -1) end
  redis.call('HINCRBY', stats, group .. new_state, 1)
  redis.call('HSET', key, 'state', new_state)
  if new_state == 'discarded' then redis.call('ZADD', dead, now, id) end
  if old == 'discarded' and new_state ~= 'discarded' then redis.call('ZREM', dead, id) end
  return old
end
"""

Clock = Callable[[], float]
"""Returns the current time in seconds since the epoch (like ``time.time``)."""


class StateStore(Protocol):
    """What the middleware needs from a state store."""

    def acquire_unique(self, key: str, holder: str, ttl_ms: int) -> str | None:
        """Take ``key`` for ``holder`` for ``ttl_ms`` unless someone else holds it.

        Returns None when taken (or already held by the same holder id), otherwise the current
        holder's value. Atomic across every process using the store.
        """

    def release_unique(self, key: str, job_id: str) -> bool:
        """Delete ``key`` if the holder stored there is ``job_id``; return whether it was."""

    def get_unique(self, key: str) -> str | None:
        """The holder value stored at ``key``, or None."""

    def now_ms(self) -> int:
        """The store's clock, in milliseconds since the epoch."""

    def schedule_add(self, data: bytes, due_ms: int, *, entry: str | None = None) -> str:
        """Keep an encoded message until ``due_ms``; return the schedule entry's id (``entry``, so
        that adding it again is harmless, or a new one)."""

    def schedule_claim(
        self, now_ms: int, lease_ms: int, limit: int
    ) -> tuple[list[tuple[str, bytes]], int | None]:
        """Claim up to ``limit`` due entries for ``lease_ms`` (entries whose lease ran out are due
        again). Return ``(entry id, message)`` pairs and the next due time in the schedule."""

    def schedule_ack(self, entry_ids: Sequence[str]) -> None:
        """Forget claimed entries once their messages are on the broker."""

    def schedule_size(self) -> int:
        """Entries waiting or claimed."""

    def schedule_claimed(self) -> int:
        """Entries claimed by a promoter and not yet forgotten."""

    def close(self) -> None:
        """Release connections."""


def holder_id(holder: str) -> str:
    """The job id part of a holder value (``"<job id>|<details>"``)."""
    return holder.split("|", 1)[0]


# KEYS[1] the lock; ARGV[1] holder value, ARGV[2] job id, ARGV[3] ttl ms.
# Returns false when this job now holds the lock, the current holder value otherwise.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return false
end
local sep = string.find(current, '|', 1, true)
local current_id = sep and string.sub(current, 1, sep - 1) or current
if current_id == ARGV[2] then
  return false
end
return current
"""

# KEYS[1] the lock; ARGV[1] the job id that may release it.
_RELEASE = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local sep = string.find(current, '|', 1, true)
local current_id = sep and string.sub(current, 1, sep - 1) or current
if current_id == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


# KEYS: schedule, claimed, data; ARGV: now ms, lease end ms, limit.
# Entries whose lease ended go back to the schedule, due now; then up to `limit` due entries move
# to `claimed` (score: lease end). Returns {id1, msg1, id2, msg2, ...} and the next due time.
_CLAIM = """
local now = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], now, id)
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local data = redis.call('HGET', KEYS[3], id)
  if data then
    redis.call('ZADD', KEYS[2], ARGV[2], id)
    table.insert(out, id)
    table.insert(out, data)
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {out, nxt[2] or false}
"""

# KEYS: schedule, data, stats, dead; ARGV: now ms, limit, Dramatiq's Redis namespace, job key prefix.
# Moves due messages straight into the Redis broker's queues (a hash of messages by their
# redis_message_id, and a list of ids per priority lane: see epq.brokers.redis_lanes), in one
# atomic step, and marks their records available. Returns the count moved and the next due time.
_MOVE_TO_REDIS_QUEUES = (
    LUA_SET_STATE
    + LUA_LANE_OF
    + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, id in ipairs(ids) do
  local data = redis.call('HGET', KEYS[2], id)
  local ok, message = false, nil
  if data then ok, message = pcall(cjson.decode, data) end
  local rid = ok and type(message) == 'table' and type(message['options']) == 'table'
    and message['options']['redis_message_id']
  if data and not (rid and type(message['queue_name']) == 'string') then
    -- not a message this script can move: set it aside rather than block the schedule
    redis.call('HSET', KEYS[2] .. ':unreadable', id, data)
  elseif data then
    local queue = ARGV[3] .. ':' .. message['queue_name']
    redis.call('HSET', queue .. '.msgs', rid, data)
    redis.call('RPUSH', queue .. '.P' .. lane_of(data), rid)
    moved = moved + 1
    local record = ARGV[4] .. message['message_id']
    local state = redis.call('HGET', record, 'state')
    if state == 'scheduled' or state == 'retryable' then
      set_state(record, KEYS[3], KEYS[4], message['message_id'], 'available', ARGV[1])
    end
  end
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {moved, nxt[2] or false}
"""
)


class RedisStateStore:
    """State in Redis: each operation is one round trip (a Lua script where it must be atomic)."""

    def __init__(self, client: redis.Redis[bytes]) -> None:
        self.client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._claim = client.register_script(_CLAIM)
        self._move = client.register_script(_MOVE_TO_REDIS_QUEUES)

    def schedule_add(self, data: bytes, due_ms: int, *, entry: str | None = None, pipe: Any = None) -> str:
        """Add an entry; with ``pipe`` (a pipeline on this store's client) only queue the commands."""
        entry = entry or uuid.uuid4().hex
        own = pipe is None
        if own:
            pipe = self.client.pipeline(transaction=True)
        pipe.hset(SCHEDULE_DATA_KEY, entry, data)
        pipe.zadd(SCHEDULE_KEY, {entry: due_ms})
        if own:
            pipe.execute()
        return entry

    def schedule_remove(self, entry_ids: Sequence[str]) -> None:
        """Forget entries that were never claimed (a bulk enqueue that failed half-way)."""
        self._forget(SCHEDULE_KEY, entry_ids)

    def _forget(self, index_key: str, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(index_key, *entry_ids)
            pipe.hdel(SCHEDULE_DATA_KEY, *entry_ids)
            pipe.execute()

    def schedule_claim(
        self, now_ms: int, lease_ms: int, limit: int
    ) -> tuple[list[tuple[str, bytes]], int | None]:
        out, nxt = self._claim(
            keys=[SCHEDULE_KEY, SCHEDULE_CLAIMED_KEY, SCHEDULE_DATA_KEY],
            args=[now_ms, now_ms + lease_ms, limit],
        )
        pairs = [(out[i].decode(), out[i + 1]) for i in range(0, len(out), 2)]
        return pairs, int(float(nxt)) if nxt else None

    def schedule_ack(self, entry_ids: Sequence[str]) -> None:
        self._forget(SCHEDULE_CLAIMED_KEY, entry_ids)

    def schedule_move_to_redis_queues(
        self, now_ms: int, limit: int, namespace: str
    ) -> tuple[int, int | None]:
        """Move due messages into Dramatiq's Redis queues on this same server, atomically."""
        moved, nxt = self._move(
            keys=[SCHEDULE_KEY, SCHEDULE_DATA_KEY, STATS_KEY, DEAD_KEY],
            args=[now_ms, limit, namespace, JOB_KEY_PREFIX],
        )
        return int(moved), int(float(nxt)) if nxt else None

    def schedule_size(self) -> int:
        return int(self.client.hlen(SCHEDULE_DATA_KEY))

    def schedule_claimed(self) -> int:
        return int(self.client.zcard(SCHEDULE_CLAIMED_KEY))

    def acquire_unique(self, key: str, holder: str, ttl_ms: int) -> str | None:
        current: Any = self._acquire(keys=[key], args=[holder, holder_id(holder), max(1, int(ttl_ms))])
        if current is None:
            return None
        return current.decode() if isinstance(current, bytes) else str(current)

    def release_unique(self, key: str, job_id: str) -> bool:
        return bool(self._release(keys=[key], args=[job_id]))

    def get_unique(self, key: str) -> str | None:
        value = self.client.get(key)
        return value.decode() if value is not None else None

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def close(self) -> None:
        self.client.close()


class MemoryStateStore:
    """State in this process's memory, for the stub broker. ``clock`` decides what time it is."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or time.time
        self._lock = threading.Lock()
        self._values: dict[str, tuple[str, float]] = {}  # key -> (value, expires at, seconds)
        self._due: list[tuple[int, str]] = []  # heap of (due ms, entry id)
        self._data: dict[str, bytes] = {}
        self._claimed: dict[str, int] = {}  # entry id -> lease end (ms)

    def schedule_add(self, data: bytes, due_ms: int, *, entry: str | None = None) -> str:
        entry = entry or uuid.uuid4().hex
        with self._lock:
            if entry in self._data:
                return entry
            self._data[entry] = data
            heapq.heappush(self._due, (due_ms, entry))
        return entry

    def schedule_claim(
        self, now_ms: int, lease_ms: int, limit: int
    ) -> tuple[list[tuple[str, bytes]], int | None]:
        out: list[tuple[str, bytes]] = []
        with self._lock:
            for entry, lease_end in list(self._claimed.items()):
                if lease_end <= now_ms:
                    del self._claimed[entry]
                    heapq.heappush(self._due, (now_ms, entry))
            while self._due and self._due[0][0] <= now_ms and len(out) < limit:
                _, entry = heapq.heappop(self._due)
                data = self._data.get(entry)
                if data is not None:
                    self._claimed[entry] = now_ms + lease_ms
                    out.append((entry, data))
            return out, self._due[0][0] if self._due else None

    def schedule_ack(self, entry_ids: Sequence[str]) -> None:
        with self._lock:
            for entry in entry_ids:
                self._claimed.pop(entry, None)
                self._data.pop(entry, None)

    def schedule_size(self) -> int:
        with self._lock:
            return len(self._data)

    def schedule_claimed(self) -> int:
        with self._lock:
            return len(self._claimed)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _live(self, key: str) -> str | None:
        item = self._values.get(key)
        if item is None:
            return None
        if item[1] <= self.clock():
            del self._values[key]
            return None
        return item[0]

    def acquire_unique(self, key: str, holder: str, ttl_ms: int) -> str | None:
        with self._lock:
            current = self._live(key)
            if current is None:
                self._values[key] = (holder, self.clock() + max(1, int(ttl_ms)) / 1000)
                return None
            if holder_id(current) == holder_id(holder):
                return None
            return current

    def release_unique(self, key: str, job_id: str) -> bool:
        with self._lock:
            current = self._live(key)
            if current is not None and holder_id(current) == job_id:
                del self._values[key]
                return True
            return False

    def get_unique(self, key: str) -> str | None:
        with self._lock:
            return self._live(key)

    def ttl_ms(self, key: str) -> int | None:
        """Milliseconds left on ``key`` (None when absent); for tests."""
        with self._lock:
            if self._live(key) is None:
                return None
            return int((self._values[key][1] - self.clock()) * 1000)

    def close(self) -> None:
        pass


class FakeClock:
    """A clock that only moves when told to; pass it to :class:`MemoryStateStore`."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        with self._lock:
            self._now += seconds
