"""The state store: uniqueness locks now; the durable schedule and job records build on it.

One store is shared by every process of a deployment: the broker's Redis, the Redis named by
``EPQ_STATE_URL`` next to RabbitMQ, or memory (with an injectable clock) for the stub broker.
Times are milliseconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis

#: Every key epq writes starts with this.
KEY_PREFIX = "epq:"

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


class RedisStateStore:
    """State in Redis: each operation is one round trip (a Lua script where it must be atomic)."""

    def __init__(self, client: redis.Redis[bytes]) -> None:
        self.client = client
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

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
