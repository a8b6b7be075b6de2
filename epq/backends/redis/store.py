"""epq's state and job records in Redis: every ``epq:*`` key (see ``keys``), each operation one
round trip (a Lua script where it must be atomic)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis

from ...options import DUE_MS, SERIAL_KEY
from ...records import (
    DEFAULT_COMPLETED_MAX,
    DEFAULT_DEAD_MAX,
    DELETED,
    MAX_ERRORS,
    check_id_prefix,
    payload_json,
)
from ..base import (
    UNIQUE_PREFIX,
    Duplicate,
    Move,
    NewRecord,
    RecordFields,
    RelayedJob,
    Released,
    lock_kind,
    schedule_entry,
    scheduled_queue,
    split_counter_group,
)
from . import keys, scripts
from .connections import ScriptCall, call_many

_compact_json = json.JSONEncoder(separators=(",", ":")).encode

#: How many index positions one ``list_jobs.lua`` call looks at at most: a listing whose filters
#: few records match takes more calls, none of which holds Redis for long.
LIST_STEP = 2000


def fields_json(fields: RecordFields) -> str:
    """Record fields as the JSON object the create scripts take."""
    return _compact_json(fields)


def flat_fields(fields: RecordFields) -> list[str]:
    """Record fields as name, value pairs (the arguments some scripts take)."""
    out: list[str] = []
    for name, value in fields.items():
        out += [name, value]
    return out


def _released(reply: Any) -> Released:
    """What ``serial_release.lua`` replied, as a :class:`Released`."""
    return Released(bool(reply), (reply[1].decode(), reply[2]) if len(reply) == 3 else None)


def _text(reply: Any) -> str | None:
    """A script's string reply as text (None for Lua's false)."""
    if not reply:
        return None
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _due_of(data: bytes) -> int | None:
    """When an encoded message became due: when it left the schedule (``DUE_MS``), else when it
    was made; None when it cannot be read."""
    try:
        message = json.loads(data)
        due = message["options"].get(DUE_MS) or message["message_timestamp"]
        return int(due)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _payload_of(data: bytes) -> str:
    """The payload of an encoded message, as a record keeps it ('{}' when it cannot be read)."""
    try:
        kwargs = json.loads(data)["kwargs"]
    except (ValueError, KeyError, TypeError):
        return "{}"
    return payload_json(kwargs) if isinstance(kwargs, dict) else "{}"


def _serial_keys(key: str) -> list[str]:
    """What the serial scripts take first: the key's sequence, the held messages, the schedule."""
    return [keys.serial(key), keys.SERIAL_HELD, keys.SCHEDULE, keys.SCHEDULE_DATA]


class RedisStateStore:
    """Uniqueness locks, the durable schedule and the clock in Redis."""

    def __init__(self, client: redis.Redis[bytes]) -> None:
        self.client = client
        self._lua = scripts.register_all(
            client,
            "lock_acquire",
            "lock_release",
            "schedule_add",
            "schedule_claim",
            "schedule_release",
            "schedule_forget",
            "schedule_move",
            "periodic_mark",
            "serial_add",
            "serial_release",
        )

    def schedule_add(self, data: bytes, due_ms: int, *, entry: str | None = None, pipe: Any = None) -> str:
        """Add an entry (once: see ``schedule_add.lua``); with ``pipe`` (a pipeline on this store's
        client) only queue the call."""
        entry = entry or uuid.uuid4().hex
        self._lua["schedule_add"](
            keys=[keys.SCHEDULE, keys.SCHEDULE_DATA], args=[entry, data, due_ms], client=pipe
        )
        return entry

    def schedule_remove(self, entry_ids: Sequence[str]) -> None:
        self._forget(keys.SCHEDULE, entry_ids)

    def serial_add(
        self, key: str, job_id: str, data: bytes, due_ms: int, *, entry: str, pipe: Any = None
    ) -> str:
        """See ``StateStore.serial_add`` (``serial_add.lua``); with ``pipe`` only queue the call."""
        self._lua["serial_add"](
            keys=_serial_keys(key),
            args=[job_id, entry, data, due_ms],
            client=pipe,
        )
        return entry

    def schedule_message(self, message: Any, due_ms: int, *, pipe: Any = None) -> str:
        """``base.schedule_message`` on a pipeline of this store's client (``pipe``)."""
        key = message.options.get(SERIAL_KEY)
        if key is None:
            return self.schedule_add(message.encode(), due_ms, pipe=pipe)
        entry = schedule_entry(message)
        return self.serial_add(str(key), message.message_id, message.encode(), due_ms, entry=entry, pipe=pipe)

    def serial_release(self, key: str, job_id: str, *, withdraw: bool = False, lease_ms: int = 0) -> Released:
        now = self.now_ms() if lease_ms else 0
        script, script_keys, args = self._release_call(key, job_id, withdraw, lease_ms, now)
        return _released(script(keys=script_keys, args=args))

    def serial_release_many(
        self, releases: Sequence[tuple[str, str]], lease_ms: int, *, forget: Sequence[str] = ()
    ) -> list[Released]:
        now = self.now_ms()
        calls = [self._release_call(key, job_id, False, lease_ms, now) for key, job_id in releases]
        if forget:
            calls.append(self._forget_call(keys.SCHEDULE_CLAIMED, forget))
        replies = call_many(self.client.connection_pool, calls)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [_released(reply) for reply in replies[: len(releases)]]

    def _release_call(self, key: str, job_id: str, withdraw: bool, lease_ms: int, now: int) -> ScriptCall:
        return (
            self._lua["serial_release"],
            [keys.serial(key), keys.SERIAL_HELD, keys.SCHEDULE, keys.SCHEDULE_DATA, keys.SCHEDULE_CLAIMED],
            [job_id, int(withdraw), now + lease_ms if lease_ms else 0, now],
        )

    def serial_sequence(self, key: str) -> list[str]:
        return [job_id.decode() for job_id in self.client.lrange(keys.serial(key), 0, -1)]

    def _forget(self, index_key: str, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            script, script_keys, args = self._forget_call(index_key, entry_ids)
            script(keys=script_keys, args=args)

    def _forget_call(self, index_key: str, entry_ids: Sequence[str]) -> ScriptCall:
        return self._lua["schedule_forget"], [index_key, keys.SCHEDULE_DATA], list(entry_ids)

    def schedule_claim(
        self, now_ms: int, lease_ms: int, limit: int
    ) -> tuple[list[tuple[str, bytes]], int | None]:
        out, nxt = self._lua["schedule_claim"](
            keys=[keys.SCHEDULE, keys.SCHEDULE_CLAIMED, keys.SCHEDULE_DATA],
            args=[now_ms, now_ms + lease_ms, limit],
        )
        pairs = [(out[i].decode(), out[i + 1]) for i in range(0, len(out), 2)]
        return pairs, int(float(nxt)) if nxt else None

    def schedule_ack(self, entry_ids: Sequence[str]) -> None:
        self._forget(keys.SCHEDULE_CLAIMED, entry_ids)

    def schedule_release(self, entry_ids: Sequence[str], due_ms: int) -> None:
        if entry_ids:
            self._lua["schedule_release"](
                keys=[keys.SCHEDULE, keys.SCHEDULE_CLAIMED], args=[due_ms, *entry_ids]
            )

    def schedule_pending(self, queue_name: str) -> int:
        return sum(
            1
            for _, data in self.client.hscan_iter(keys.SCHEDULE_DATA, count=1000)
            if scheduled_queue(data) == queue_name
        )

    def schedule_drop(self, queue_name: str) -> int:
        dropped = [
            entry.decode()
            for entry, data in self.client.hscan_iter(keys.SCHEDULE_DATA, count=1000)
            if scheduled_queue(data) == queue_name
        ]
        for start in range(0, len(dropped), 1000):
            batch = dropped[start : start + 1000]
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(keys.SCHEDULE, *batch)
            pipe.zrem(keys.SCHEDULE_CLAIMED, *batch)
            pipe.hdel(keys.SCHEDULE_DATA, *batch)
            pipe.execute()
        return len(dropped)

    def schedule_move_to_redis_queues(
        self, now_ms: int, limit: int, namespace: str
    ) -> tuple[int, int | None]:
        """Move due messages into Dramatiq's Redis queues on this same server, atomically, and
        mark their records available; the count moved and the next due time."""
        moved, nxt = self._lua["schedule_move"](
            keys=[keys.SCHEDULE, keys.SCHEDULE_DATA, keys.STATS, keys.DEAD, keys.SCHEDULE_UNREADABLE],
            args=[now_ms, limit, namespace, keys.JOB_PREFIX],
        )
        return int(moved), int(float(nxt)) if nxt else None

    def schedule_size(self) -> int:
        return int(self.client.hlen(keys.SCHEDULE_DATA))

    def schedule_claimed(self) -> int:
        return int(self.client.zcard(keys.SCHEDULE_CLAIMED))

    def serial_held(self) -> int:
        return int(self.client.hlen(keys.SERIAL_HELD))

    def schedule_due(self, now_ms: int) -> int:
        return int(self.client.zcount(keys.SCHEDULE, "-inf", now_ms))

    def unique_locks(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in self.client.scan_iter(match=UNIQUE_PREFIX + "*", count=1000):
            kind = lock_kind(key.decode())
            out[kind] = out.get(kind, 0) + 1
        return out

    def add_refused(self, counts: Mapping[str, int]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for kind, count in counts.items():
            pipe.hincrby(keys.REFUSED, kind, count)
        pipe.execute()

    def refused(self) -> dict[str, int]:
        return {kind.decode(): int(count) for kind, count in self.client.hgetall(keys.REFUSED).items()}

    def request_cancel(self, job_id: str, ttl_ms: int) -> None:
        self.client.set(keys.cancel_request(job_id), self.now_ms(), px=max(1, int(ttl_ms)))

    def cancel_requests(self, job_ids: Sequence[str]) -> list[str]:
        if not job_ids:
            return []
        found = self.client.mget([keys.cancel_request(job_id) for job_id in job_ids])
        return [job_id for job_id, value in zip(job_ids, found, strict=True) if value is not None]

    def forget_cancel(self, job_id: str) -> None:
        self.client.delete(keys.cancel_request(job_id))

    def pause_queue(self, queue_name: str) -> bool:
        return bool(self.client.sadd(keys.PAUSED, queue_name))

    def resume_queue(self, queue_name: str) -> bool:
        return bool(self.client.srem(keys.PAUSED, queue_name))

    def paused_queues(self) -> set[str]:
        return {name.decode() for name in self.client.smembers(keys.PAUSED)}

    def acquire_unique(self, key: str, holder: str, ttl_ms: int) -> str | None:
        return _text(self._lua["lock_acquire"](keys=[key], args=[holder, max(1, int(ttl_ms))]))

    def release_unique(self, key: str, job_id: str) -> bool:
        return bool(self._lua["lock_release"](keys=[key], args=[job_id]))

    def get_unique(self, key: str) -> str | None:
        return _text(self.client.get(key))

    def get_unique_many(self, keys: Sequence[str]) -> list[str | None]:
        return [_text(value) for value in self.client.mget(keys)] if keys else []

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def periodic_states(self, names: Sequence[str]) -> list[dict[str, str]]:
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.periodic(name))
        return [{k.decode(): v.decode() for k, v in state.items()} for state in pipe.execute()]

    def periodic_begin(self, name: str, now_ms: int, ttl_ms: int) -> int:
        key = keys.periodic(name)
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(key, "since", now_ms)
        pipe.pexpire(key, max(1, int(ttl_ms)))
        pipe.hget(key, "since")
        return int(pipe.execute()[-1])

    def periodic_mark(self, name: str, tick_ms: int, job_id: str, now_ms: int, ttl_ms: int) -> bool:
        noted = self._lua["periodic_mark"](
            keys=[keys.periodic(name)], args=[tick_ms, job_id, now_ms, max(1, int(ttl_ms))]
        )
        return bool(noted)

    def close(self) -> None:
        self.client.close()


class RedisRecords:
    """Job records in Redis; every method is one round trip (reading a record whose payload is in
    its message: two).

    With ``messages_ns`` (the Dramatiq namespace of the Redis broker whose server this is), a job
    due at once is filed without its payload (``epq.records.without_payload``): its message, in
    the queue's message hash under the job's id, holds the payload until the job finishes, and
    every transition that takes the message away (completed, retried, dead, cancelled) writes
    the payload into the record. Reading such a record takes the payload from the message."""

    def __init__(
        self,
        client: redis.Redis[bytes],
        clock_ms: Any,
        *,
        completed_max: int = DEFAULT_COMPLETED_MAX,
        dead_max: int = DEFAULT_DEAD_MAX,
        messages_ns: str | None = None,
    ) -> None:
        self.client = client
        self.now_ms = clock_ms
        #: How many completed jobs keep their record at most (the newest).
        self.completed_max = completed_max
        #: How many dead (discarded) jobs keep their record at most (the newest).
        self.dead_max = dead_max
        self.messages_ns = messages_ns
        if messages_ns is not None:
            client.set(keys.LAG_FROM_LANES, 1)  # (see keys.LAG_FROM_LANES)
        self._lua = scripts.register_all(
            client,
            "record_create",
            "record_create_locked",
            "record_move",
            "record_start",
            "record_fail",
            "record_delete",
            "record_bury",
            "list_jobs",
            "index_prune",
            "waiting_oldest",
            "relay_create",
            "unique_resolve",
            "mode_start",
        )

    def create(self, record: NewRecord) -> str | None:
        return self.create_many([record])[0]

    def create_many(self, records: Sequence[NewRecord]) -> list[str | None]:
        now = self.now_ms()
        replies = self._call_many([self._create_call(record, now) for record in records])
        return [_text(reply) if r.lock_key else None for r, reply in zip(records, replies, strict=True)]

    def create_relayed(self, jobs: Sequence[RelayedJob]) -> list[str | bool | None]:
        if not jobs:
            return []
        args: list[Any] = [self.now_ms(), keys.JOB_PREFIX, keys.RELAYED_PREFIX, keys.SERIAL_PREFIX]
        for job in jobs:
            r = job.record
            args += [r.job_id, r.ttl_ms, fields_json(r.fields), r.lock_key, r.holder, max(1, r.lock_ttl_ms)]
            args += [job.entry, job.data, job.due_ms, job.serial_key]
        script_keys = [keys.STATS, keys.DEAD, keys.SCHEDULE, keys.SCHEDULE_DATA, keys.SERIAL_HELD]
        replies = self._lua["relay_create"](keys=script_keys, args=args)
        # (1: marked relayed already; 0: written; text: the holder of the lock)
        return [(reply == 1 or None) if isinstance(reply, int) else _text(reply) for reply in replies]

    def resolve_duplicate(self, duplicate: Duplicate, now_ms: int) -> tuple[str, str]:
        r = duplicate.record
        script_keys = [keys.STATS, keys.DEAD, keys.SCHEDULE, keys.SCHEDULE_DATA, r.lock_key, keys.REPLACED]
        args: list[Any] = [now_ms, keys.JOB_PREFIX, duplicate.mode, r.job_id, r.ttl_ms, fields_json(r.fields)]
        args += [r.holder, max(1, r.lock_ttl_ms), duplicate.entry, duplicate.data, duplicate.due_ms]
        args += [duplicate.args_json, duplicate.debounce_ms, duplicate.max_wait_ms, duplicate.window_ms]
        outcome, job_id = self._lua["unique_resolve"](keys=script_keys, args=args)
        return outcome.decode(), job_id.decode()

    def mode_start(self, job_id: str) -> tuple[str | None, str | None]:
        args, waits_for = self._lua["mode_start"](args=[keys.JOB_PREFIX, job_id])
        return (args.decode() or None), (waits_for.decode() or None)

    def replacements(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.client.hgetall(keys.REPLACED).items()}

    def forget_relayed(self, job_ids: Sequence[str]) -> None:
        if job_ids:
            self.client.delete(*(keys.relayed(job_id) for job_id in job_ids))

    def _create_call(self, r: NewRecord, now: int) -> ScriptCall:
        """The call of the script that writes a record (and takes its lock, if it has one)."""
        record_keys = keys.record_keys(r.job_id)
        if r.lock_key:
            args = [r.job_id, now, r.ttl_ms, r.holder, max(1, r.lock_ttl_ms), fields_json(r.fields)]
            return self._lua["record_create_locked"], [*record_keys, r.lock_key], [*args, *self._dead_bound()]
        args = [r.job_id, now, r.ttl_ms, fields_json(r.fields), *self._dead_bound()]
        return self._lua["record_create"], record_keys, args

    def _dead_bound(self) -> list[Any]:
        """What the scripts that may discard a job take to keep only the newest dead records:
        the bound and the prefix of record keys (see ``lib/keep_newest.lua``)."""
        return [self.dead_max, keys.JOB_PREFIX]

    def move(
        self, job_id: str, state: str, fields: RecordFields, ttl_ms: int, allowed_from: Sequence[str] = ()
    ) -> str | None:
        return self.move_many([Move(job_id, state, fields, ttl_ms, allowed_from)])[0]

    def _move_call(self, move: Move, now: int) -> ScriptCall:
        """The call of ``record_move.lua`` for ``move``."""
        args = [
            move.job_id,
            now,
            move.ttl_ms,
            move.state,
            ",".join(move.allowed_from),
            self.completed_max,
            keys.JOB_PREFIX,
            self.dead_max,
            *flat_fields(move.fields),
        ]
        return self._lua["record_move"], [*keys.record_keys(move.job_id), keys.DONE], args

    def start(self, job_id: str, now_ms: int, ttl_ms: int) -> str | None:
        return self.start_many([job_id], now_ms, ttl_ms)[0]

    def move_many(self, moves: Sequence[Move]) -> list[str | None]:
        now = self.now_ms()
        return [_text(reply) for reply in self._call_many([self._move_call(m, now) for m in moves])]

    def start_many(self, job_ids: Sequence[str], now_ms: int, ttl_ms: int) -> list[str | None]:
        script = self._lua["record_start"]
        calls = [(script, keys.record_keys(job_id), [job_id, now_ms, ttl_ms]) for job_id in job_ids]
        return [_text(reply) for reply in self._call_many(calls)]

    def _call_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """The replies of script calls made in one round trip (``connections.call_many``); the
        first error reply is raised."""
        if not calls:
            return []
        replies = call_many(self.client.connection_pool, calls)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def fail(
        self, job_id: str, state: str, error: Mapping[str, Any], fields: RecordFields, ttl_ms: int
    ) -> None:
        args = [job_id, self.now_ms(), ttl_ms, state, json.dumps(error), MAX_ERRORS, *self._dead_bound()]
        args += flat_fields(fields)
        self._lua["record_fail"](keys=keys.record_keys(job_id), args=args)

    def get(self, job_id: str) -> dict[str, str] | None:
        return self.get_many([job_id])[0]

    def get_many(self, job_ids: Sequence[str]) -> list[dict[str, str] | None]:
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        found = [{k.decode(): v.decode() for k, v in raw.items()} or None for raw in pipe.execute()]
        # (a deleted job's tombstone is no record: see record_bury.lua)
        found = [
            fields if fields is not None and fields.get("state") != DELETED else None for fields in found
        ]
        self._add_payloads(job_ids, found)
        return found

    def _oldest_in_lanes(self, ns: str) -> dict[tuple[str, int], int]:
        """When the oldest job of each queue and priority with available jobs became due: its
        lane's head (a lane is first in, first out; a job given back goes to the front)."""
        lanes = []
        for group in self.counters():
            queue, priority, state = split_counter_group(group)
            if state == "available":
                lanes.append((queue, priority))
        pipe = self.client.pipeline(transaction=False)
        for queue, priority in lanes:
            pipe.lindex(keys.lane(ns, queue, priority), 0)
        heads = pipe.execute()
        pipe = self.client.pipeline(transaction=False)
        for (queue, _), head in zip(lanes, heads, strict=True):
            pipe.hget(keys.messages(ns, queue), head or b"")
        out: dict[tuple[str, int], int] = {}
        for lane, data in zip(lanes, pipe.execute(), strict=True):
            due = _due_of(data) if data else None
            if due is not None:
                out[lane] = due
        return out

    def _add_payloads(self, job_ids: Sequence[str], found: list[dict[str, str] | None]) -> None:
        """Give records without their payload the payload of their job's message."""
        missing = [
            (job_id, fields)
            for job_id, fields in zip(job_ids, found, strict=True)
            if fields is not None and "args" not in fields
        ]
        if not missing or self.messages_ns is None:
            return
        pipe = self.client.pipeline(transaction=False)
        for job_id, fields in missing:
            pipe.hget(keys.messages(self.messages_ns, fields["queue"]), job_id)
            pipe.hget(keys.job(job_id), "args")  # (written by a transition since the first read)
        replies = pipe.execute()
        for (_job_id, fields), data, args in zip(missing, replies[::2], replies[1::2], strict=True):
            if args is not None:
                fields["args"] = args.decode()
            elif data is not None:
                fields["args"] = _payload_of(data)

    def find_ids(self, prefix: str, limit: int) -> list[str]:
        match = keys.job(check_id_prefix(prefix)) + "*"  # no glob character can be in the prefix
        found: list[str] = []
        for key in self.client.scan_iter(match=match, count=1000):
            if self.client.hget(key, "state") != DELETED.encode():  # (not a deleted job's tombstone)
                found.append(key.decode()[len(keys.JOB_PREFIX) :])
            if len(found) >= limit:
                break
        return found

    def delete(self, job_id: str) -> None:
        self._lua["record_delete"](keys=keys.record_keys(job_id), args=[job_id])

    def bury(self, job_id: str, ttl_ms: int) -> str | None:
        args = [job_id, max(1, int(ttl_ms))]
        return _text(self._lua["record_bury"](keys=keys.record_keys(job_id), args=args))

    def list_ids(
        self, filters: Mapping[str, str], *, newest_first: bool, after: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        walked = self._index_to_walk(filters)
        checks = flat_fields({k: v for k, v in filters.items() if keys.index(k, v) != walked})
        found: list[str] = []
        position = after or ""
        while True:
            args = [keys.JOB_PREFIX, int(newest_first), position, limit - len(found), LIST_STEP, *checks]
            reply = self._lua["list_jobs"](keys=[walked], args=args)
            found += [job_id.decode() for job_id in reply[1:]]
            position = reply[0].decode()
            if not position or len(found) >= limit:
                return found, position or None

    def _index_to_walk(self, filters: Mapping[str, str]) -> str:
        """The smallest of the listing indexes of ``filters`` (that of every record without any)."""
        names = [keys.index(name, value) for name, value in filters.items()]
        if not names:
            return keys.index()
        if len(names) == 1:
            return names[0]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.zcard(name)
        sizes = pipe.execute()
        return min(zip(sizes, names, strict=True))[1]

    def prune_indexes(self, per_index: int) -> int:
        dropped = 0
        for name in self.client.scan_iter(match=keys.INDEX_PREFIX + "*", count=1000):
            dropped += int(self._lua["index_prune"](keys=[name], args=[keys.JOB_PREFIX, per_index]))
        return dropped

    def dead_ids(self, limit: int) -> list[str]:
        """Newest first; ids whose record has expired are dropped from the index on the way."""
        ids = [i.decode() for i in self.client.zrevrange(keys.DEAD, 0, -1)]
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(keys.job(job_id))
        alive = pipe.execute()
        gone = [job_id for job_id, exists in zip(ids, alive, strict=True) if not exists]
        if gone:
            self.client.zrem(keys.DEAD, *gone)
        return [job_id for job_id, exists in zip(ids, alive, strict=True) if exists][:limit]

    def forget_dead(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self.delete(job_id)

    def counters(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.client.hgetall(keys.STATS).items()}

    def oldest_waiting(self) -> dict[tuple[str, int], int]:
        if self.messages_ns is not None:
            return self._oldest_in_lanes(self.messages_ns)
        out: dict[tuple[str, int], int] = {}
        for group in self.counters():
            queue, priority, state = split_counter_group(group)
            if state == "available":
                due = self._lua["waiting_oldest"](
                    keys=[keys.waiting(queue, priority)], args=[keys.JOB_PREFIX]
                )
                if due:
                    out[queue, priority] = int(float(due))
        return out
