"""Priority lanes on Dramatiq's Redis broker.

Dramatiq keeps a queue as a list of message ids (``<ns>:<queue>``) and a hash of messages by id
(``<ns>:<queue>.msgs``); a fetch pops ids off the list into the worker's ack set
(``<ns>:__acks__.<worker>.<queue>``). epq keeps the hash and the ack sets as they are, so acks,
nacks, dead-lettering, requeue and Dramatiq's recovery of a dead worker's messages all still
work, and splits the waiting ids into one list per priority, ``<ns>:<queue>.P1`` .. ``.P4``:

- enqueue writes the message and pushes its id onto its lane, in one script;
- fetch takes ids from lane 1, then 2, 3, 4 (FIFO within a lane), in one script. Ids found on
  the plain list (put back there by Dramatiq's requeue at shutdown or its recovery of a dead
  worker's messages, or left by an older epq) first go back to the front of their lane.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff, current_millis
from dramatiq.errors import ConnectionClosed

from .. import wire
from .._messages import data_template, encode, new_id
from ..errors import DuplicateJob, StateUnavailable
from ..middleware import refuse_malformed
from ..outage import must_requeue
from ..priority import LANES, LUA_LANE_OF, lane_of, redis_lane_key
from ..records import (
    BULK_TOKEN_PREFIX,
    BULK_TOKEN_TTL_MS,
    ENQUEUE_MANY_RECORDED,
    ENQUEUE_RECORDED,
    LUA_COMPLETE_RECORD,
    OPEN_RECORD_TTL_MS,
    START_RECORD,
    BulkJob,
    fields_json,
    flat_fields,
    job_key,
)
from ..state import DEAD_KEY, JOB_KEY_PREFIX, LUA_SET_STATE, STATS_KEY, holder_id

logger = logging.getLogger("epq.brokers.redis")

#: How often a consumer whose prefetched messages are all being worked on looks for a free slot.
BUSY_POLL_MS = 5
#: A worker whose heartbeat is older than this is dead: its fetched messages go back to their
#: queues (Dramatiq's default is 60 s). Every consumer beats at least every
#: ``HEARTBEAT_INTERVAL_MS``, busy or idle.
HEARTBEAT_TIMEOUT_MS = 15_000
HEARTBEAT_INTERVAL_MS = 3_000
#: How often each consumer runs Dramatiq's maintenance of its queue (recovering the messages of
#: dead workers). With the heartbeat timeout, a crashed worker's jobs run again within about
#: ``HEARTBEAT_TIMEOUT_MS + MAINTENANCE_INTERVAL_MS`` on a worker that is idle.
MAINTENANCE_INTERVAL_MS = 5_000
#: How many ids one fetch moves from the plain list back to their lanes at most (bounds the
#: script's run time after a large requeue; the rest move on the next fetches).
REBALANCE_MAX = 100

# KEYS: the message hash, the lane list; ARGV: message id, message data.
_ENQUEUE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1])
"""

# KEYS: plain list, message hash, this worker's ack set, heartbeats, lane 1..4; ARGV: now ms,
# worker id, how many to take, how many plain-list ids to move back at most, job record key prefix
# ('' when records live elsewhere).
# Returns {id1, data1, id2, data2, ...} for up to ARGV[3] messages, highest priority first. A job
# whose record is cancelled is dropped here, never delivered. Records are not started here: a job
# is running once a worker thread starts it (JobRecords.before_process_message), not while it
# waits in a worker's prefetch.
_FETCH = (
    LUA_LANE_OF
    + """
local plain, msgs, acks = KEYS[1], KEYS[2], KEYS[3]
local prefix = ARGV[5]
local function cancelled(data)
  if prefix == '' then return false end
  local ok, message = pcall(cjson.decode, data)
  if not (ok and type(message) == 'table' and type(message['message_id']) == 'string') then return false end
  return redis.call('HGET', prefix .. message['message_id'], 'state') == 'cancelled'
end
redis.call('ZADD', KEYS[4], ARGV[1], ARGV[2])
for _ = 1, tonumber(ARGV[4]) do
  local id = redis.call('RPOP', plain)
  if not id then break end
  local data = redis.call('HGET', msgs, id)
  if data then redis.call('LPUSH', KEYS[4 + lane_of(data)], id) end
end
local out = {}
local want = 2 * tonumber(ARGV[3])
for lane = 1, 4 do
  while #out < want do
    local id = redis.call('LPOP', KEYS[4 + lane])
    if not id then break end
    local data = redis.call('HGET', msgs, id)
    if data then
      if cancelled(data) then
        redis.call('HDEL', msgs, id)
      else
        redis.call('SADD', acks, id)
        out[#out + 1] = id
        out[#out + 1] = data
      end
    end
  end
  if #out >= want then break end
end
return out
"""
)


# KEYS: this worker's ack set, message hash, heartbeats, record, stats, dead;
# ARGV: now ms, worker id, redis message id, job id, completed record ttl.
_ACK_COMPLETED = (
    LUA_SET_STATE
    + LUA_COMPLETE_RECORD
    + """
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[2])
if redis.call('SREM', KEYS[1], ARGV[3]) > 0 then redis.call('HDEL', KEYS[2], ARGV[3]) end
complete_record(KEYS[4], KEYS[5], KEYS[6], ARGV[4], ARGV[1], ARGV[5])
"""
)

_pack: Any
try:
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - hiredis is a dependency; redis-py packs without it
    _pack = None


class KeptConnections:
    """Connections of a redis-py pool kept out of it for epq's script calls, which take one and
    give it back for every enqueue: that skips the pool's bookkeeping and the check it makes of
    each connection it hands out (a system call), about a tenth of an enqueue's time here.

    Same interface as the pool (``get_connection``, ``release``). At most ``keep`` (and a quarter
    of the pool's limit) wait idle, connected ones only (others go back to the pool). A process
    forked from the one that kept them (however it was forked) starts without them: their sockets
    are the parent's. A connection the server closed while it waited fails on its next call,
    which ``ScriptStream`` then sends once more on a new one.
    """

    def __init__(self, pool: Any, keep: int = 16) -> None:
        self.pool = pool
        # a pool with a small limit must not lose most of its connections to the idle ones here
        self.keep = min(keep, int(getattr(pool, "max_connections", None) or 2**31) // 4)
        self.idle: list[Any] = []
        self.pid = os.getpid()

    def get_connection(self) -> Any:
        if self.pid != os.getpid():
            self.idle, self.pid = [], os.getpid()
        try:
            return self.idle.pop()  # atomic: one connection, one thread
        except IndexError:
            return self.pool.get_connection()

    def release(self, connection: Any) -> None:
        keep = self.pid == os.getpid() and len(self.idle) < self.keep
        if keep and getattr(connection, "_sock", None) is not None and not _must_reconnect(connection):
            self.idle.append(connection)
        else:
            self.pool.release(connection)

    def close(self) -> None:
        """Give the idle connections back to the pool."""
        while self.idle:
            self.pool.release(self.idle.pop())


def _must_reconnect(connection: Any) -> bool:
    """Whether redis-py marked the connection for a new one (its maintenance notices)."""
    should = getattr(connection, "should_reconnect", None)
    return bool(should()) if should is not None else False


class ScriptStream:
    """Calls of one Lua script on one connection, one at a time, each sent without waiting for
    its reply: the caller prepares the next call (or works on the last reply) while Redis runs
    the script. ``send`` then ``read``, in turns; use it as a context manager.

    A server that cannot be reached fails on entry, as a redis-py command would. A connection
    that breaks before the reply is read is opened again and the call sent once more (so the
    script must be safe to run twice with the same arguments); a server that has lost the script
    is given it again.
    """

    def __init__(self, pool: Any, script: Any) -> None:
        self.pool = pool  # a redis-py pool, or KeptConnections
        self.script = script
        self.conn: Any = None
        self.call: tuple[Any, ...] | None = None  # sent, reply not read yet
        self.packed: Any = None  # the call as sent
        self.unsent = False  # the call must be sent (again) before its reply can be read
        self.reached = False  # the call was sent whole at least once (it may have run)

    def __enter__(self) -> ScriptStream:
        self.conn = self.pool.get_connection()
        try:
            self.conn.connect()  # nothing to do when connected
        except BaseException:
            self.pool.release(self.conn)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.call is not None:
            self.conn.disconnect()  # a reply nobody will read must not reach the next user
        self.pool.release(self.conn)

    def send(self, keys: Sequence[str], args: Sequence[Any]) -> None:
        if self.call is not None:  # pragma: no cover - a programming error
            raise RuntimeError("read the reply of the previous call first")
        self.call = (len(keys), *keys, *args)
        self.packed = None
        self.unsent, self.reached = True, False
        try:
            self._send()
        except (redis.ConnectionError, redis.TimeoutError):
            self.conn.disconnect()  # read() sends it again

    def _send(self) -> None:
        assert self.call is not None
        if self.packed is None:
            command = ("EVALSHA", self.script.sha, *self.call)
            # hiredis straight away: redis-py would first look at each of thousands of arguments
            self.packed = [_pack(command)] if _pack is not None else self.conn.pack_command(*command)
        self.conn.send_packed_command(self.packed)
        self.unsent, self.reached = False, True

    def _reply(self) -> Any:
        if self.unsent:
            self._send()
        try:
            return self.conn.read_response()
        except redis.exceptions.NoScriptError:  # this call did not run: load, then send again
            self.conn.send_command("SCRIPT", "LOAD", self.script.script)
            sha = self.conn.read_response()
            self.script.sha = sha.decode() if isinstance(sha, bytes) else sha
            self.packed = None
            self._send()
            return self.conn.read_response()

    def read(self) -> Any:
        try:
            try:
                return self._reply()
            except redis.ConnectionError:
                self.conn.disconnect()  # once more, on a new connection
                self.unsent = True
                return self._reply()
        except BaseException:
            self.conn.disconnect()
            raise
        finally:
            self.call = None


def foreign_hooks(broker: dramatiq.Broker, name: str) -> list[dramatiq.Middleware]:
    """The broker's middleware whose ``name`` hook is not Dramatiq's no-op (one set on the
    instance counts), but for epq's own middleware that a bulk enqueue stands in for
    (``epq_bulk_aware``): a bulk enqueue skips emitting a signal nobody else listens to."""
    base = getattr(dramatiq.Middleware, name)
    hooked = []
    for middleware in broker.middleware:
        hook = getattr(middleware, name)
        if getattr(hook, "__func__", hook) is not base and not getattr(middleware, "epq_bulk_aware", False):
            hooked.append(middleware)
    return hooked


class LaneRedisBroker(RedisBroker):
    """Dramatiq's Redis broker with a list per priority lane (see the module docstring).

    ``epq_records_fused`` is set by :func:`epq.setup` when epq's state lives in this same Redis:
    then an enqueue writes the job's record (and takes its lock) in the same script as the
    message, the fetch drops jobs whose record is cancelled, and the ack completes the record
    (a worker thread starts it: ``JobRecords.before_process_message``).
    """

    epq_records_fused = False

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("heartbeat_timeout", HEARTBEAT_TIMEOUT_MS)
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._lane_enqueue = self.client.register_script(_ENQUEUE)
        self._lane_fetch = self.client.register_script(_FETCH)
        self._enqueue_recorded = self.client.register_script(ENQUEUE_RECORDED)
        self._ack_completed = self.client.register_script(_ACK_COMPLETED)
        self._start_record = self.client.register_script(START_RECORD)
        self._enqueue_many_recorded = self.client.register_script(ENQUEUE_MANY_RECORDED)
        self._kept = KeptConnections(self.client.connection_pool)

    def close(self) -> None:
        self._kept.close()  # the kept connections go back to the pool, which owns them
        super().close()

    def lane_keys(self, queue_name: str) -> list[str]:
        return [redis_lane_key(self.namespace, queue_name, lane) for lane in LANES]

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        if delay is not None:
            return super().enqueue(message, delay=delay)
        message = message.copy(options={"redis_message_id": new_id()})
        rid = message.options["redis_message_id"]
        queue = message.queue_name
        lane = redis_lane_key(self.namespace, queue, lane_of(message.options))
        self.emit_before("enqueue", message, None)
        fused = message.options.pop("epq_fused", None)
        msgs = f"{self.namespace}:{queue}.msgs"
        if fused is None:
            self._lane_enqueue(keys=[msgs, lane], args=[rid, message.encode()])
        else:
            self._enqueue_fused(message, fused, msgs, lane)
        self.emit_after("enqueue", message, None)
        return message

    def lane_enqueue(self, message: dramatiq.Message[Any], *, pipe: Any = None) -> None:
        """Put a message (with its ``redis_message_id``) on its lane; no hooks, no record.
        With ``pipe``, only queue the command on that pipeline."""
        queue = message.queue_name
        keys = [
            f"{self.namespace}:{queue}.msgs",
            redis_lane_key(self.namespace, queue, lane_of(message.options)),
        ]
        self._lane_enqueue(
            keys=keys, args=[message.options["redis_message_id"], message.encode()], client=pipe
        )

    def bulk_call(self, jobs: Sequence[BulkJob]) -> tuple[list[str], list[Any]]:
        """The keys and arguments of one ``ENQUEUE_MANY_RECORDED`` call enqueueing ``jobs``
        (immediate jobs with their records and locks). Other middleware's ``before_enqueue``
        hooks run here, for each message."""
        before = foreign_hooks(self, "before_enqueue")
        groups: dict[int, int] = {}  # id of a group -> its number in the script
        templated: dict[int, bool] = {}  # group number -> the script makes its jobs' messages
        group_args: list[Any] = []
        job_args: list[Any] = []
        for job in jobs:
            message = job.message
            message.options["redis_message_id"] = message.message_id  # a new message: no copy needed
            number = groups.get(id(job.group))
            if number is None:
                number = groups[id(job.group)] = len(groups) + 1
                group = job.group
                template = None if before else data_template(message, job.lock_key)
                templated[number] = template is not None
                group_args += [fields_json(group.fields), group.holder_tail, max(1, group.lock_ttl_ms)]
                group_args += template or ("", "", "", "", "")
            if before:
                self.emit_before("enqueue", message, None)
                data: Any = message.encode()  # a hook may have changed the payload
            else:
                data = "" if templated[number] else encode(message, job.args_json)
            job_args += [number, message.message_id, job.lock_key, data, job.args_json]
        head = [JOB_KEY_PREFIX, OPEN_RECORD_TTL_MS, self.namespace, BULK_TOKEN_TTL_MS, len(groups)]
        return [STATS_KEY, BULK_TOKEN_PREFIX + new_id()], head + group_args + job_args

    def bulk_replies(self, jobs: Sequence[BulkJob], reply: list[Any]) -> list[str | None]:
        """For each job of a ``bulk_call``, from its reply: None when enqueued, or the holder value
        of the job that holds its lock. Enqueued messages get other middleware's ``after_enqueue``."""
        out: list[str | None] = [None] * len(jobs)
        for i in range(0, len(reply), 2):
            out[int(reply[i]) - 1] = reply[i + 1].decode()
        if foreign_hooks(self, "after_enqueue"):
            for job, holder in zip(jobs, out, strict=True):
                if holder is None:
                    self.emit_after("enqueue", job.message, None)
        return out

    def bulk_stream(self) -> ScriptStream:
        """A connection to make ``bulk_call`` calls on while preparing the next one."""
        return ScriptStream(self._kept, self._enqueue_many_recorded)

    def _enqueue_fused(
        self, message: dramatiq.Message[Any], fused: dict[str, Any], msgs: str, lane: str
    ) -> None:
        """Lock, record and message in one script (``JobRecords`` left them in ``epq_fused``)."""
        record = job_key(message.message_id)
        keys = [record, STATS_KEY, fused["lock_key"] or record, msgs, lane]
        fields = fused["fields"]
        data = encode(message)  # (not from the record's payload JSON: a hook may have changed it)
        args: list[Any] = [message.message_id, fused["ttl"], fused["holder"], max(1, fused["lock_ttl"])]
        counter = f"{fields['queue']}|{fields['priority']}|{fields['state']}"
        args += [message.options["redis_message_id"], data, counter, *flat_fields(fields)]
        with ScriptStream(self._kept, self._enqueue_recorded) as call:  # (thinner than redis-py's)
            call.send(keys, args)
            current = call.read()
        if current:
            holder = current.decode()
            raise DuplicateJob(message.actor_name, holder_id(holder), holder=holder)

    @property
    def consumer_class(self) -> type[LaneConsumer]:
        return LaneConsumer

    def fetch_lanes(self, queue_name: str, count: int) -> list[tuple[str, bytes]]:
        """Take up to ``count`` messages of ``queue_name`` for this worker, highest priority
        first: ``(redis message id, data)`` pairs."""
        ns = self.namespace
        keys = [
            f"{ns}:{queue_name}",
            f"{ns}:{queue_name}.msgs",
            f"{ns}:__acks__.{self.broker_id}.{queue_name}",
            f"{ns}:__heartbeats__",
            *self.lane_keys(queue_name),
        ]
        prefix = JOB_KEY_PREFIX if self.epq_records_fused else ""
        args = [current_millis(), self.broker_id, count, REBALANCE_MAX, prefix]
        out = self._lane_fetch(keys=keys, args=args)
        return [(out[i].decode(), out[i + 1]) for i in range(0, len(out), 2)]

    def ack_completed(self, queue_name: str, rid: str, job_id: str, ttl_ms: int) -> None:
        """Acknowledge a message and mark its job completed, in one script."""
        ns = self.namespace
        keys = [
            f"{ns}:__acks__.{self.broker_id}.{queue_name}",
            f"{ns}:{queue_name}.msgs",
            f"{ns}:__heartbeats__",
            job_key(job_id),
            STATS_KEY,
            DEAD_KEY,
        ]
        with ScriptStream(self._kept, self._ack_completed) as call:  # (thinner than redis-py's)
            call.send(keys, [current_millis(), self.broker_id, rid, job_id, ttl_ms])
            call.read()

    def start_record(self, job_id: str, now_ms: int, ttl_ms: int) -> str | None:
        """``RecordStore.start`` for a job whose record lives in this Redis, on a kept connection
        (one call per job, as the ack: see ``ScriptStream``). Returns the state before."""
        with ScriptStream(self._kept, self._start_record) as call:
            call.send([job_key(job_id), STATS_KEY, DEAD_KEY], [job_id, now_ms, ttl_ms])
            before = call.read()
        return before.decode() if before else None

    def heartbeat(self) -> None:
        """Tell other workers this one is alive (every fetch and ack does too)."""
        self.client.zadd(f"{self.namespace}:__heartbeats__", {self.broker_id: current_millis()})

    def maintain(self, queue_name: str) -> None:
        """Run Dramatiq's queue maintenance for ``queue_name`` now: messages fetched by workers
        whose heartbeat stopped go back to the plain list (the next fetch puts them back in their
        lanes), and expired dead letters are dropped.

        Dramatiq runs it by chance (0.1 % of its own commands); epq's consumers run it every
        ``MAINTENANCE_INTERVAL_MS`` instead, so a crashed worker's jobs come back in seconds.
        """
        args = [
            "qsize",
            current_millis(),
            queue_name,
            self.broker_id,
            self.heartbeat_timeout,
            self.dead_message_ttl,
            1,
            self._max_unpack_size(),  # type: ignore[no-untyped-call]
        ]
        self.scripts["dispatch"](keys=[self.namespace], args=args)

    def flush(self, queue_name: str) -> None:
        self.client.delete(*self.lane_keys(queue_name))  # first, so no lane id outlives its message
        super().flush(queue_name)

    def waiting(self, queue_name: str) -> int:
        """Messages of ``queue_name`` waiting to be fetched (every lane and the plain list)."""
        pipe = self.client.pipeline(transaction=False)
        for key in [f"{self.namespace}:{queue_name}", *self.lane_keys(queue_name)]:
            pipe.llen(key)
        return sum(int(n) for n in pipe.execute())


class LaneConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, fetching through the lanes.

    More changes:
    - a message refused off the wire (``epq.wire``: undecodable, the wrong shape, too large, an
      unknown actor) is recorded and dead-lettered (moved to ``.XQ`` with its data) instead of
      crashing the consumer or reaching the worker's threads; a message whose
      ``redis_message_id`` is missing or wrong gets the one it is stored under, so it can be acked;
    - a message the worker gives back (``epq.outage``: the state store was unreachable when the
      worker stopped) is requeued instead of acked or dead-lettered;
    - while every prefetched message is being worked on, the consumer looks for a free slot every
      ``BUSY_POLL_MS`` rather than backing off (so a new high-priority message is fetched as
      soon as one job ends), and beats its heartbeat every ``HEARTBEAT_INTERVAL_MS``, so that
      long jobs do not make the worker look dead;
    - Dramatiq's maintenance (recovering the messages of dead workers) runs every
      ``MAINTENANCE_INTERVAL_MS`` per consumer, not by chance.
    """

    broker: LaneRedisBroker

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        # (not at once: after an outage, other workers' heartbeats are stale until their
        # consumers have reconnected and fetched, and their jobs must not be taken from them)
        self.maintained_at = time.monotonic()  # monotonic seconds
        self.beaten_at = time.monotonic()

    def __next__(self) -> MessageProxy | None:
        try:
            while True:
                if self.message_cache:
                    rid, data = self.message_cache.pop(0)
                    try:
                        message = wire.decode(data, self.broker.actors)
                    except wire.MalformedMessage as exc:
                        self._refuse(rid, exc)
                        continue
                    if rid is not None and message.options.get("redis_message_id") != rid:
                        message.options["redis_message_id"] = rid  # stored under it: acked by it
                    self.misses = 0
                    self.queued_message_ids.add(message.message_id)
                    proxy = MessageProxy(message)
                    if rid is not None and self.broker.epq_records_fused:
                        proxy.epq_fused_ack = True  # type: ignore[attr-defined]  # see JobRecords
                    return proxy
                now = time.monotonic()
                if now - self.maintained_at >= MAINTENANCE_INTERVAL_MS / 1000:
                    self.maintained_at = now
                    self.broker.maintain(self.queue_name)
                free = self.prefetch - self.outstanding_message_count
                if free <= 0:
                    if now - self.beaten_at >= HEARTBEAT_INTERVAL_MS / 1000:
                        self.beaten_at = now
                        self.broker.heartbeat()
                    time.sleep(BUSY_POLL_MS / 1000)
                    return None
                self.beaten_at = now  # a fetch beats the heartbeat
                if self.queue_name.endswith(".DQ"):
                    fetched = self.broker.do_fetch(self.queue_name, free)
                    self.message_cache = [(None, data) for data in fetched if data is not None]
                else:
                    self.message_cache = self.broker.fetch_lanes(self.queue_name, free)
                if not self.message_cache:
                    self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self.timeout)
                    time.sleep(backoff_ms / 1000)
                    return None
        except redis.TimeoutError as exc:
            # a Redis that does not answer (stopped, stuck): Dramatiq would log CRITICAL with a
            # traceback and restart the consumer; the next call reconnects and tries again
            logger.warning("Redis did not answer on queue %r (%s); trying again", self.queue_name, exc)
            return None
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def ack(self, message: Any) -> None:
        if must_requeue(message):
            self._give_back(message)
            return
        ttl = getattr(message, "epq_complete_ttl_ms", None)
        if ttl is None or self.queue_name.endswith(".DQ"):
            super().ack(message)  # type: ignore[no-untyped-call]
            return
        try:
            rid = message.options["redis_message_id"]
            self.broker.ack_completed(self.queue_name, rid, message.message_id, ttl)
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        finally:
            self.queued_message_ids.discard(message.message_id)

    def nack(self, message: Any) -> None:
        if must_requeue(message):
            self._give_back(message)
            return
        super().nack(message)  # type: ignore[no-untyped-call]

    def _give_back(self, message: Any) -> None:
        try:
            self.broker.do_requeue(self.queue_name, message.options["redis_message_id"])
        except (redis.ConnectionError, redis.TimeoutError):
            # the broker is down too (the stopping worker's Redis holds its state): the message
            # stays in this worker's ack set, and comes back when its heartbeat has expired
            logger.warning("Could not give message %s back to %r; it comes back when this worker's "
                           "heartbeat expires", message.message_id, self.queue_name)  # fmt: skip
        finally:
            self.queued_message_ids.discard(message.message_id)

    def close(self) -> None:
        """Give back what was fetched but never handed to the worker (Dramatiq's consumer leaves
        it in the ack set until a heartbeat times out)."""
        cached, self.message_cache = self.message_cache, []
        rids = [rid for rid, _ in cached if rid]
        try:
            if rids:
                self.broker.do_requeue(self.queue_name, *rids)
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def _refuse(self, rid: str | None, exc: wire.MalformedMessage) -> None:
        """Record and dead-letter a malformed message (or requeue it if the record cannot be
        written before the worker stops)."""
        if rid is None:  # (a .DQ message: Dramatiq's fetch gives no id, and epq sends none there)
            logger.error("Dropping a malformed message on %r: %s", self.queue_name, exc.reason)
            return
        try:
            refuse_malformed(self.broker, self.queue_name, exc)
        except StateUnavailable as unavailable:
            logger.warning("%s; giving it back for later", unavailable)
            self.broker.do_requeue(self.queue_name, rid)
            time.sleep(wire.REFUSE_RETRY_MS / 1000)
            return
        self.broker.do_nack(self.queue_name, rid)
