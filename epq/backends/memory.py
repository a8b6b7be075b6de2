"""The memory backend: Dramatiq's stub broker with epq's durable delays and priority-ordered
queues, and the state and records in this process's memory, on a clock tests can stop
(:class:`FakeClock`). What ``stub://`` builds, and what the pytest plugin (``epq.testing``) uses.
"""

from __future__ import annotations

import heapq
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from queue import Empty, Queue
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker, _StubConsumer, _StubMessageProxy
from dramatiq.common import dq_name
from dramatiq.errors import ActorNotFound, QueueNotFound

from .. import wire
from .._messages import encode
from ..errors import StateUnavailable
from ..middleware.job_records import refuse_malformed
from ..outage import GivesBack
from ..pausing import PausableConsumer
from ..priority import LANES, lane_of
from ..records import (
    DEFAULT_COMPLETED_MAX,
    DEFAULT_DEAD_MAX,
    DELETED,
    MAX_ERRORS,
    check_id_prefix,
    index_position,
)
from .base import (
    AFTER_FIELD,
    ENDED_STATES,
    FOLLOW_UP,
    MODE_FIELD,
    RELAYED_PREFIX,
    REPLACED,
    REPLACED_FIELD,
    TAKEN_OVER,
    UNIQUE_PREFIX,
    Clock,
    Duplicate,
    DurableDelays,
    Move,
    NewRecord,
    RecordFields,
    RelayedJob,
    Released,
    counter_group,
    holder_id,
    lock_kind,
    schedule_message,
    scheduled_queue,
    to_be_scheduled,
)


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


class MemoryStateStore:
    """State in this process's memory, for the stub broker. ``clock`` decides what time it is."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or time.time
        self._lock = threading.Lock()
        self._values: dict[str, tuple[str, float]] = {}  # key -> (value, expires at, seconds)
        self._due: list[tuple[int, str]] = []  # heap of (due ms, entry id)
        self._data: dict[str, bytes] = {}
        self._claimed: dict[str, int] = {}  # entry id -> lease end (ms)
        self._moved: dict[str, int] = {}  # entry id -> due ms, for entries moved since added
        self._refused: dict[str, int] = {}
        self._cancels: dict[str, float] = {}  # job id -> when its cancel request expires (seconds)
        self._periodic: dict[str, tuple[dict[str, str], float]] = {}  # name -> (state, expires at, s)
        self._paused: set[str] = set()
        self._serial: dict[str, list[str]] = {}  # serial key -> job ids, the head first
        self._held: dict[str, tuple[int, str, bytes]] = {}  # job id -> (due ms, entry id, message)

    def schedule_add(self, data: bytes, due_ms: int, *, entry: str | None = None) -> str:
        entry = entry or uuid.uuid4().hex
        with self._lock:
            if entry in self._data:
                return entry
            self._data[entry] = data
            heapq.heappush(self._due, (due_ms, entry))
        return entry

    def serial_add(self, key: str, job_id: str, data: bytes, due_ms: int, *, entry: str) -> str:
        with self._lock:
            sequence = self._serial.setdefault(key, [])
            if job_id not in sequence:
                sequence.append(job_id)
            if sequence[0] != job_id:
                self._held[job_id] = (due_ms, entry, data)
                return entry
        return self.schedule_add(data, due_ms, entry=entry)

    def serial_release(self, key: str, job_id: str, *, withdraw: bool = False, lease_ms: int = 0) -> Released:
        with self._lock:
            sequence = self._serial.get(key)
            if not sequence or sequence[0] != job_id:
                if withdraw and sequence and job_id in sequence:
                    sequence.remove(job_id)
                    self._held.pop(job_id, None)
                return Released(False)
            sequence.pop(0)
            if not sequence:
                del self._serial[key]
                return Released(True)
            held = self._held.pop(sequence[0], None)
            if held is None:
                return Released(True)
            due_ms, entry, data = held
            if entry in self._data:
                return Released(True)
            now = self.now_ms()
            if lease_ms and due_ms <= now:
                self._data[entry] = data
                self._claimed[entry] = now + lease_ms
                return Released(True, (entry, data))
        self.schedule_add(data, due_ms, entry=entry)
        return Released(True)

    def serial_release_many(
        self, releases: Sequence[tuple[str, str]], lease_ms: int, *, forget: Sequence[str] = ()
    ) -> list[Released]:
        released = [self.serial_release(key, job_id, lease_ms=lease_ms) for key, job_id in releases]
        self.schedule_ack(forget)
        return released

    def serial_sequence(self, key: str) -> list[str]:
        with self._lock:
            return list(self._serial.get(key, ()))

    def schedule_remove(self, entry_ids: Sequence[str]) -> None:
        with self._lock:
            for entry in entry_ids:
                self._data.pop(entry, None)  # (its place in the heap is passed over when due)
                self._moved.pop(entry, None)

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
                at, entry = heapq.heappop(self._due)
                data = self._data.get(entry)
                if data is not None and not self._stale(at, entry):
                    self._moved.pop(entry, None)
                    self._claimed[entry] = now_ms + lease_ms
                    out.append((entry, data))
            while self._due and (self._due[0][1] not in self._data or self._stale(*self._due[0])):
                heapq.heappop(self._due)  # (removed or moved entries leave their place behind)
            return out, self._due[0][0] if self._due else None

    def _stale(self, at: int, entry: str) -> bool:
        """Whether a place in the heap is one an entry was moved away from."""
        return self._moved.get(entry, at) != at

    def schedule_later(self, entry: str, due_ms: int) -> bool:
        """Move an entry waiting in the schedule (not claimed) later, to ``due_ms``; whether it
        moved (uniqueness mode ``debounce``)."""
        with self._lock:
            if entry not in self._data or entry in self._claimed:
                return False
            before = self._moved.get(entry)
            if before is None:
                before = min((at for at, e in self._due if e == entry), default=None)
            if before is None or due_ms <= before:
                return False
            self._moved[entry] = due_ms
            heapq.heappush(self._due, (due_ms, entry))
            return True

    def set_unique(self, key: str, holder: str, ttl_ms: int) -> None:
        """Make ``holder`` the holder of ``key`` for ``ttl_ms``, whoever held it."""
        with self._lock:
            self._values[key] = (holder, self.clock() + max(1, int(ttl_ms)) / 1000)

    def extend_unique(self, key: str, ttl_ms: int) -> None:
        """Let ``key`` live ``ttl_ms`` from now if that is longer than it would."""
        with self._lock:
            current = self._live(key)
            if current is not None:
                until = self.clock() + max(1, int(ttl_ms)) / 1000
                self._values[key] = (current, max(until, self._values[key][1]))

    def schedule_ack(self, entry_ids: Sequence[str]) -> None:
        with self._lock:
            for entry in entry_ids:
                self._claimed.pop(entry, None)
                self._data.pop(entry, None)
                self._moved.pop(entry, None)

    def schedule_release(self, entry_ids: Sequence[str], due_ms: int) -> None:
        with self._lock:
            for entry in entry_ids:
                if self._claimed.pop(entry, None) is not None:
                    heapq.heappush(self._due, (due_ms, entry))

    def schedule_pending(self, queue_name: str) -> int:
        with self._lock:
            data = list(self._data.values())
        return sum(1 for item in data if scheduled_queue(item) == queue_name)

    def schedule_drop(self, queue_name: str) -> int:
        with self._lock:
            dropped = [entry for entry, data in self._data.items() if scheduled_queue(data) == queue_name]
            for entry in dropped:
                del self._data[entry]  # (its place in the heap is passed over when due)
                self._claimed.pop(entry, None)
        return len(dropped)

    def schedule_size(self) -> int:
        with self._lock:
            return len(self._data)

    def schedule_claimed(self) -> int:
        with self._lock:
            return len(self._claimed)

    def serial_held(self) -> int:
        with self._lock:
            return len(self._held)

    def schedule_due(self, now_ms: int) -> int:
        with self._lock:
            due = {e for at, e in self._due if at <= now_ms and e in self._data and not self._stale(at, e)}
            return len(due - self._claimed.keys())

    def unique_locks(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._lock:
            for key in list(self._values):
                if key.startswith(UNIQUE_PREFIX) and self._live(key) is not None:
                    out[lock_kind(key)] = out.get(lock_kind(key), 0) + 1
        return out

    def add_refused(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            for kind, count in counts.items():
                self._refused[kind] = self._refused.get(kind, 0) + count

    def refused(self) -> dict[str, int]:
        with self._lock:
            return dict(self._refused)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def periodic_states(self, names: Sequence[str]) -> list[dict[str, str]]:
        with self._lock:
            return [dict(self._periodic_live(name) or {}) for name in names]

    def periodic_begin(self, name: str, now_ms: int, ttl_ms: int) -> int:
        with self._lock:
            state = self._periodic_live(name) or {}
            state.setdefault("since", str(now_ms))
            self._periodic[name] = (state, self.clock() + ttl_ms / 1000)
            return int(state["since"])

    def periodic_mark(self, name: str, tick_ms: int, job_id: str, now_ms: int, ttl_ms: int) -> bool:
        with self._lock:
            state = self._periodic_live(name) or {}
            if state.get("tick") and int(state["tick"]) >= tick_ms:
                return False
            state.update(tick=str(tick_ms), job=job_id, at=str(now_ms))
            self._periodic[name] = (state, self.clock() + ttl_ms / 1000)
            return True

    def _periodic_live(self, name: str) -> dict[str, str] | None:
        item = self._periodic.get(name)
        if item is None:
            return None
        if item[1] <= self.clock():
            del self._periodic[name]
            return None
        return item[0]

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

    def request_cancel(self, job_id: str, ttl_ms: int) -> None:
        with self._lock:
            self._cancels[job_id] = self.clock() + max(1, int(ttl_ms)) / 1000

    def cancel_requests(self, job_ids: Sequence[str]) -> list[str]:
        with self._lock:
            now = self.clock()
            for job_id in [j for j, expires in self._cancels.items() if expires <= now]:
                del self._cancels[job_id]
            return [job_id for job_id in job_ids if job_id in self._cancels]

    def forget_cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancels.pop(job_id, None)

    def pause_queue(self, queue_name: str) -> bool:
        with self._lock:
            before = len(self._paused)
            self._paused.add(queue_name)
            return len(self._paused) > before

    def resume_queue(self, queue_name: str) -> bool:
        with self._lock:
            before = len(self._paused)
            self._paused.discard(queue_name)
            return len(self._paused) < before

    def paused_queues(self) -> set[str]:
        with self._lock:
            return set(self._paused)

    def get_unique_many(self, keys: Sequence[str]) -> list[str | None]:
        with self._lock:
            return [self._live(key) for key in keys]

    def mark(self, key: str, ttl_ms: int) -> bool:
        """Set ``key`` for ``ttl_ms`` unless it is set; whether it was not (the relay's marks:
        ``MemoryRecords.create_relayed``)."""
        with self._lock:
            if self._live(key) is not None:
                return False
            self._values[key] = ("1", self.clock() + max(1, int(ttl_ms)) / 1000)
            return True

    def unmark(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._values.pop(key, None)

    def ttl_ms(self, key: str) -> int | None:
        """Milliseconds left on ``key`` (None when absent); for tests."""
        with self._lock:
            if self._live(key) is None:
                return None
            return int((self._values[key][1] - self.clock()) * 1000)

    def close(self) -> None:
        pass


class MemoryRecords:
    """Job records in memory (stub broker), on the state store's clock."""

    def __init__(
        self,
        state: MemoryStateStore,
        *,
        completed_max: int = DEFAULT_COMPLETED_MAX,
        dead_max: int = DEFAULT_DEAD_MAX,
    ) -> None:
        self.state = state
        #: How many completed jobs keep their record at most (the newest).
        self.completed_max = completed_max
        #: How many dead (discarded) jobs keep their record at most (the newest).
        self.dead_max = dead_max
        self._lock = threading.Lock()
        self._relay_lock = threading.Lock()
        self._records: dict[str, tuple[dict[str, str], int]] = {}  # id -> (fields, expires ms)
        self._stats: dict[str, int] = {}
        self._dead: dict[str, int] = {}  # dead job ids -> when they died, oldest first
        self._done: dict[str, int] = {}  # completed job ids -> when they completed, oldest first
        self._replaced: dict[str, int] = {}  # kind -> payloads replaced (uniqueness modes)
        self._buried: dict[str, int] = {}  # deleted jobs' tombstones: id -> expires ms

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

    def _count(self, fields: RecordFields, state: str, delta: int) -> None:
        group = counter_group(fields["queue"], fields["priority"], state)
        self._stats[group] = self._stats.get(group, 0) + delta

    def _set_state(self, job_id: str, fields: dict[str, str], state: str) -> str | None:
        old = fields.get("state")
        if old is not None:
            self._count(fields, old, -1)
        self._count(fields, state, 1)
        fields["state"] = state
        if state == "discarded" or old == "discarded":
            self._dead.pop(job_id, None)
        if state == "discarded":
            self._dead[job_id] = self.state.now_ms()  # (last: the newest)
        return old

    def _expire(self, job_id: str, ttl_ms: int) -> None:
        fields, _ = self._records[job_id]
        self._records[job_id] = (fields, self.state.now_ms() + ttl_ms)

    def _is_buried(self, job_id: str) -> bool:
        expires = self._buried.get(job_id)
        if expires is not None and expires <= self.state.now_ms():
            del self._buried[job_id]
            return False
        return expires is not None

    def create(self, record: NewRecord) -> str | None:
        if record.lock_key:
            current = self.state.acquire_unique(record.lock_key, record.holder, record.lock_ttl_ms)
            if current is not None:
                return current
        self._write(record.job_id, record.fields, record.ttl_ms)
        return None

    def create_many(self, records: Sequence[NewRecord]) -> list[str | None]:
        return [self.create(record) for record in records]

    def create_relayed(self, jobs: Sequence[RelayedJob]) -> list[str | bool | None]:
        out: list[str | bool | None] = []
        with self._relay_lock:  # (one batch at a time: atomic towards other relays)
            for job in jobs:
                mark = RELAYED_PREFIX + job.record.job_id
                if self.state.get_unique(mark) is not None:
                    out.append(True)
                    continue
                holder = self.create(job.record)
                if holder is None:
                    if job.serial_key:
                        self.state.serial_add(
                            job.serial_key, job.record.job_id, job.data, job.due_ms, entry=job.entry
                        )
                    else:
                        self.state.schedule_add(job.data, job.due_ms, entry=job.entry)
                    self.state.mark(mark, job.record.ttl_ms)
                out.append(holder)
        return out

    def forget_relayed(self, job_ids: Sequence[str]) -> None:
        self.state.unmark(RELAYED_PREFIX + job_id for job_id in job_ids)

    def _write(self, job_id: str, fields: RecordFields, ttl_ms: int) -> None:
        with self._lock:
            self._put(job_id, fields, ttl_ms)

    def _put(self, job_id: str, fields: RecordFields, ttl_ms: int) -> None:
        record = dict(fields)
        state = record.pop("state")
        self._buried.pop(job_id, None)  # (a deleted job's tombstone: written anew)
        self._records[job_id] = (record, self.state.now_ms() + ttl_ms)
        self._set_state(job_id, record, state)
        self._keep_dead()

    def resolve_duplicate(self, duplicate: Duplicate, now_ms: int) -> tuple[str, str]:
        new = duplicate.record
        # (the records' lock held throughout: no worker starts the holder meanwhile)
        with self._lock:
            current = self.state.get_unique(new.lock_key)
            holder = holder_id(current) if current is not None else None
            fields = self._live(holder) if holder is not None else None
            if holder is None or fields is None or fields["state"] in ENDED_STATES:
                self._insert_duplicate(duplicate, None)
                return TAKEN_OVER, new.job_id
            assert holder is not None
            state = fields["state"]
            waiting = state in ("available", "scheduled")
            after = fields.get(AFTER_FIELD)
            if state == "running" and after is not None:
                before = self._live(after)
                waiting = before is not None and before["state"] not in ENDED_STATES
            if not (waiting and fields.get(MODE_FIELD)):
                self._insert_duplicate(duplicate, holder)
                return FOLLOW_UP, new.job_id
            fields["args"] = duplicate.args_json
            fields[REPLACED_FIELD] = str(int(fields.get(REPLACED_FIELD, "0")) + 1)
            kind = fields["kind"]
            self._replaced[kind] = self._replaced.get(kind, 0) + 1
            if duplicate.mode == "debounce" and state == "scheduled":
                due = min(now_ms + duplicate.debounce_ms, int(fields["created_at"]) + duplicate.max_wait_ms)
                if self.state.schedule_later(f"{holder}:0", due):
                    fields["scheduled_at"] = str(due)
                    self.state.extend_unique(new.lock_key, duplicate.window_ms + due - now_ms)
            return REPLACED, holder

    def _insert_duplicate(self, duplicate: Duplicate, after: str | None) -> None:
        new = duplicate.record
        self.state.set_unique(new.lock_key, new.holder, new.lock_ttl_ms)
        self._put(new.job_id, {**new.fields, AFTER_FIELD: after} if after else new.fields, new.ttl_ms)
        self.state.schedule_add(duplicate.data, duplicate.due_ms, entry=duplicate.entry)

    def mode_start(self, job_id: str) -> tuple[str | None, str | None]:
        with self._lock:
            fields = self._live(job_id)
            if fields is None:
                return None, None
            after = fields.get(AFTER_FIELD)
            before = self._live(after) if after is not None else None
            waits_for = after if before is not None and before["state"] not in ENDED_STATES else None
            args = fields.get("args") if fields.get(REPLACED_FIELD) else None
            return args, waits_for

    def replacements(self) -> dict[str, int]:
        with self._lock:
            return dict(self._replaced)

    def move(
        self, job_id: str, state: str, fields: RecordFields, ttl_ms: int, allowed_from: Sequence[str] = ()
    ) -> str | None:
        with self._lock:
            record = self._live(job_id)
            if record is None:
                return DELETED if self._is_buried(job_id) else None
            old = record["state"]
            if allowed_from and old not in allowed_from:
                return old
            record.update(fields)
            self._set_state(job_id, record, state)
            if ttl_ms > 0:
                self._expire(job_id, ttl_ms)
            if state == "completed" and old != "completed":
                self._done[job_id] = self.state.now_ms()
                self._keep_newest(self._done, self.completed_max, "completed")
            self._keep_dead()
            return old

    def _keep_dead(self) -> None:
        self._keep_newest(self._dead, self.dead_max, "discarded")

    def _keep_newest(self, index: dict[str, int], most: int, state: str) -> None:
        """Bound a history index (job ids, oldest first): while it holds more than ``most``,
        forget its oldest job, and its record if still in ``state`` (with its count); as
        ``lib/keep_newest.lua`` does in Redis."""
        while len(index) > most:
            oldest = next(iter(index))
            del index[oldest]
            fields = self._live(oldest)
            if fields is not None and fields["state"] == state:
                self._drop(oldest)

    def start(self, job_id: str, now_ms: int, ttl_ms: int) -> str | None:
        with self._lock:
            record = self._live(job_id)
            if record is None:
                return DELETED if self._is_buried(job_id) else None
            old = record["state"]
            if old == "cancelled":
                return old
            self._set_state(job_id, record, "running")
            record["attempt"] = str(int(record.get("attempt", "0")) + 1)
            record["attempted_at"] = str(now_ms)
            self._expire(job_id, ttl_ms)
            return old

    def move_many(self, moves: Sequence[Move]) -> list[str | None]:
        return [self.move(*move) for move in moves]

    def start_many(self, job_ids: Sequence[str], now_ms: int, ttl_ms: int) -> list[str | None]:
        return [self.start(job_id, now_ms, ttl_ms) for job_id in job_ids]

    def fail(
        self, job_id: str, state: str, error: Mapping[str, Any], fields: RecordFields, ttl_ms: int
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
            self._keep_dead()

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

    def bury(self, job_id: str, ttl_ms: int) -> str | None:
        with self._lock:
            fields = self._live(job_id)
            if fields is None:
                return None
            self._drop(job_id)
            self._buried[job_id] = self.state.now_ms() + max(1, ttl_ms)
            return fields["state"]

    def list_ids(
        self, filters: Mapping[str, str], *, newest_first: bool, after: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        with self._lock:
            matching = []
            for job_id in list(self._records):
                fields = self._live(job_id)
                if fields is not None and all(fields.get(k) == v for k, v in filters.items()):
                    matching.append(index_position(fields["created_at"], job_id))
        matching.sort(reverse=newest_first)
        if after is not None:
            matching = [p for p in matching if (p < after if newest_first else p > after)]
        page = matching[:limit]
        more = len(matching) > limit
        return [p[14:] for p in page], page[-1] if page and more else None

    def prune_indexes(self, per_index: int) -> int:
        return 0  # (no index to prune: a listing reads the records)

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

    def oldest_waiting(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        with self._lock:
            for job_id in list(self._records):
                fields = self._live(job_id)
                if fields is not None and fields["state"] == "available":
                    group = (fields["queue"], int(fields["priority"]))
                    due = int(fields.get("scheduled_at") or fields["created_at"])
                    out[group] = min(out.get(group, due), due)
        return out


class LaneQueue(Queue):  # type: ignore[type-arg]
    """A FIFO queue per lane behind :class:`queue.Queue`'s interface; ``get`` serves lane 1 first.

    Items are encoded messages (the stub broker's queue items).
    """

    def _init(self, maxsize: int) -> None:
        self._lanes: dict[int, deque[bytes]] = {lane: deque() for lane in LANES}

    def _qsize(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def _put(self, item: bytes | tuple[int, bytes]) -> None:
        """``item``: ``(lane, encoded message)`` from the broker, which knows the lane, or an
        encoded message (a requeue, say), whose lane is read from it."""
        if isinstance(item, tuple):
            lane, data = item
            self._lanes[lane].append(data)
            return
        try:
            options = json.loads(item).get("options") or {}
        except (ValueError, AttributeError):
            options = {}
        self._lanes[lane_of(options if isinstance(options, dict) else {})].append(item)

    def _get(self) -> bytes:
        for lane in LANES:
            if self._lanes[lane]:
                return self._lanes[lane].popleft()
        raise IndexError("get from an empty LaneQueue")  # pragma: no cover - Queue checks qsize first


class EpqStubConsumer(PausableConsumer, GivesBack, _StubConsumer):
    """Dramatiq's stub consumer, checking messages as they come off the queue (``epq.wire``:
    a malformed one is recorded and dead-lettered) and giving back a message the worker could not
    finish because the state store was unreachable (``epq.outage``)."""

    def __init__(self, broker: EpqStubBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            broker.queues[queue_name], broker.dead_letters_by_queue[queue_name], prefetch, timeout
        )
        self.broker = broker
        self.queue_name = queue_name

    def next_message(self) -> Any:
        if not self.prefetch_semaphore.acquire(timeout=self.timeout / 1000):
            return None
        try:
            data = self.queue.get(timeout=self.timeout / 1000)
        except Empty:
            self.prefetch_semaphore.release()
            return None
        try:
            return _StubMessageProxy(wire.decode(data, self.broker.actors))
        except wire.MalformedMessage as exc:
            try:
                refuse_malformed(self.broker, self.queue_name, exc)
            except StateUnavailable:  # (a stub's state store is memory: not in practice)
                self.queue.put(data)
            else:
                self.dead_letters.append(self._dead_letter(data, exc))
            self.queue.task_done()
            self.prefetch_semaphore.release()
            return None

    def _dead_letter(self, data: bytes, error: wire.MalformedMessage) -> _StubMessageProxy:
        """A refused message as the stub's dead letters hold it, as Dramatiq's worker leaves a
        message of an unknown actor there: the message (or, when it cannot be read as one, a
        stand-in with its queue, actor and id as far as they are known), failed, with its error
        (``ActorNotFound`` for an unknown actor), which ``join(fail_fast=True)`` raises."""
        try:
            message = dramatiq.Message.decode(data)
        except Exception:
            message = dramatiq.Message(
                queue_name=self.queue_name, actor_name=error.actor_name or "", args=(), kwargs={}, options={}
            )
            if error.message_id:
                message = message.copy(message_id=error.message_id)
        proxy = _StubMessageProxy(message)
        proxy.fail()
        unknown = isinstance(error, wire.UnknownActor) and error.actor_name is not None
        proxy.stuff_exception(ActorNotFound(error.actor_name) if unknown else error)  # type: ignore[no-untyped-call]
        return proxy

    def give_back(self, message: Any) -> None:
        self.queue.put(message.encode())
        _StubConsumer.ack(self, message)  # type: ignore[no-untyped-call]  # (its fetch is done with)

    def requeue(self, messages: Any) -> None:
        """Put back what a stopping worker fetched but never ran (Dramatiq's stub consumer drops
        it, and the queue then waits for it forever)."""
        for message in messages:
            self.give_back(message)


class EpqStubBroker(DurableDelays, StubBroker):
    """Dramatiq's stub broker with epq's durable delays and priority-ordered queues."""

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 100) -> EpqStubConsumer:
        if queue_name not in self.queues:
            raise QueueNotFound(queue_name)  # type: ignore[no-untyped-call]
        return EpqStubConsumer(self, queue_name, self.prefetch_for(queue_name, prefetch), timeout)

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        if to_be_scheduled(message, delay) and self.epq_store is not None:
            return super().enqueue(message, delay=delay)  # into the schedule (DurableDelays)
        queue = self.queues.get(message.queue_name)
        if queue is None:
            raise QueueNotFound(message.queue_name)  # type: ignore[no-untyped-call]
        self.emit_before("enqueue", message, None)
        data = encode(message)
        queue.put((lane_of(message.options), data) if isinstance(queue, LaneQueue) else data)
        self.emit_after("enqueue", message, None)
        return message

    def enqueue_planned(
        self, message: dramatiq.Message[Any], *, delay: int | None = None, payload_json: str | None = None
    ) -> dramatiq.Message[Any]:
        """Put a planned job due at once on its lane, with only other middleware's enqueue hooks
        around it (epq's own act on unplanned messages only), encoded from its payload's JSON
        unless a hook may have changed the payload."""
        if to_be_scheduled(message, delay):
            return self.enqueue(message, delay=delay)
        queue = self.queues.get(message.queue_name)
        if queue is None:
            raise QueueNotFound(message.queue_name)  # type: ignore[no-untyped-call]
        before = self.foreign_hooks("before_enqueue")
        if before:
            self.emit_before("enqueue", message, None)
        data = encode(message) if before or payload_json is None else encode(message, payload_json)
        queue.put((lane_of(message.options), data) if isinstance(queue, LaneQueue) else data)
        if self.foreign_hooks("after_enqueue"):
            self.emit_after("enqueue", message, None)
        return message

    def join_queue(self, queue_name: str, timeout_ms: int) -> None:
        # (a failed job is epq.testing.drain's to report, after the queues are empty)
        self.join_broker(queue_name, timeout=timeout_ms, fail_fast=False)

    def _prepare_immediate(self, message: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
        if message.queue_name not in self.queues:
            raise QueueNotFound(message.queue_name)  # type: ignore[no-untyped-call]
        return message

    def _publish_batch(self, items: Sequence[tuple[dramatiq.Message[Any], int | None]]) -> None:
        for message, due in items:
            if due is None:
                self.queues[message.queue_name].put((lane_of(message.options), encode(message)))
            else:
                assert self.epq_store is not None
                schedule_message(self.epq_store, message, due)

    def declare_queue(self, queue_name: str) -> None:
        if queue_name in self.queues:
            return
        self.emit_before("declare_queue", queue_name)
        self.queues[queue_name] = LaneQueue()
        self.emit_after("declare_queue", queue_name)
        delayed_name = dq_name(queue_name)
        self.queues[delayed_name] = Queue()
        self.delay_queues.add(delayed_name)
        self.emit_after("declare_delay_queue", delayed_name)

    def purge_dead_letters(self, queues: Iterable[str]) -> None:
        """Empty the dead-letter queues of ``queues``."""
        for queue in queues:
            self.dead_letters_by_queue[queue].clear()

    def count_dead_letters(self, queues: Iterable[str]) -> dict[str, int]:
        """How many messages the dead-letter queue of each of ``queues`` holds."""
        return {queue: len(self.dead_letters_by_queue[queue]) for queue in queues}
