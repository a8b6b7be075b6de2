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
import time
from collections.abc import Iterable, Sequence
from typing import Any

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff, current_millis
from dramatiq.errors import ConnectionClosed

from ... import wire
from ..._messages import data_template, encode, new_id
from ...errors import DuplicateJob, StateUnavailable
from ...middleware.common import enqueue_hook_errors, find_middleware
from ...middleware.job_records import JobRecords, refuse_malformed
from ...middleware.uniqueness import count_refused
from ...outage import GivesBack, must_requeue
from ...pausing import PAUSED_POLL_MS, PausableConsumer
from ...priority import LANES, lane_of
from ...records import OPEN_RECORD_TTL_MS, payload_json, without_payload
from ..base import BulkJob, DurableDelays, NewRecord, counter_group, holder_id, in_flight
from . import keys, scripts
from .connections import KeptConnections, ScriptStream
from .store import RedisRecords, RedisStateStore, fields_json, flat_fields

logger = logging.getLogger("epq.backends.redis")

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
#: The longest an idle consumer sleeps between polls (Dramatiq's default is the worker timeout,
#: 1 s), so a promoted or newly enqueued job starts quickly on idle workers.
IDLE_POLL_MS = 200
#: The same for Dramatiq's delay queues (``.DQ``), which epq's own delays never use (they wait in
#: epq's schedule): only messages delayed by a plain Dramatiq broker before a move to epq can be
#: there, and a few seconds late is on time for them. Polling them as often as the work queues
#: was half of an idle worker's calls to Redis.
DELAY_QUEUE_POLL_MS = 5_000
#: Each bulk enqueue script call leaves its reply under a token key this long, so that sending the
#: call again after its reply was lost (see enqueue_many_recorded.lua) cannot enqueue a job twice.
BULK_TOKEN_TTL_MS = 5 * 60 * 1000


class EpqRedisBroker(DurableDelays, RedisBroker):
    """Dramatiq's Redis broker with a list per priority lane (see the module docstring), epq's
    durable delays and a shorter idle poll.

    When epq's state lives in this same Redis (``Backend.fused``), an enqueue writes the job's
    record (and takes its lock) in the same script as the message, the fetch drops jobs whose
    record is cancelled, the schedule's due messages move into the lanes in one script, and the
    ack completes the record (a worker thread starts it: ``JobRecords.before_process_message``).
    """

    #: The driver's errors an enqueue maps to ``BrokerUnavailable`` (see
    #: ``epq.backends.errors.unreachable_errors``).
    epq_driver_errors: tuple[type[BaseException], ...] = (redis.RedisError,)

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("heartbeat_timeout", HEARTBEAT_TIMEOUT_MS)
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._lua = scripts.register_all(
            self.client,
            "lane_enqueue",
            "lane_fetch",
            "enqueue_recorded",
            "enqueue_many_recorded",
            "ack_completed",
            "record_start",
        )
        self._kept = KeptConnections(self.client.connection_pool)

    @property
    def fused(self) -> bool:
        """Whether epq's records and locks live in this Redis (see the class docstring)."""
        return self.epq is not None and self.epq.fused

    def close(self) -> None:
        self._kept.close()  # the kept connections go back to the pool, which owns them
        super().close()

    def lane_keys(self, queue_name: str) -> list[str]:
        return [keys.lane(self.namespace, queue_name, lane) for lane in LANES]

    # ---- enqueue --------------------------------------------------------------------------------

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        if delay and delay > 0 and self.epq_store is not None:
            return super().enqueue(message, delay=delay)  # into the schedule (DurableDelays)
        message = message.copy(options={"redis_message_id": new_id()})
        records = find_middleware(self, JobRecords) if self.fused else None
        if records is not None and records.unrecorded(self, message):
            # an epq job enqueued by hand: its lock, record and message in one script, as an insert
            with enqueue_hook_errors("taking the uniqueness lock and writing the job record", message):
                record = records.new_record(self, message, None)
            holder = self.insert_recorded(message, record, None)
            if holder is not None:
                count_refused(records.store, message)
                raise DuplicateJob(message.actor_name, holder_id(holder), holder=holder)
            return message
        self.emit_before("enqueue", message, None)
        self.lane_enqueue(message)
        self.emit_after("enqueue", message, None)
        return message

    def _scheduled_options(self) -> dict[str, Any]:
        return {"redis_message_id": new_id()}  # what the schedule's move into the lanes files it under

    def lane_enqueue(self, message: dramatiq.Message[Any], *, pipe: Any = None) -> None:
        """Put a message (with its ``redis_message_id``) on its lane; no hooks, no record.
        With ``pipe``, only queue the command on that pipeline."""
        queue = message.queue_name
        lane = keys.lane(self.namespace, queue, lane_of(message.options))
        args = [message.options["redis_message_id"], message.encode()]
        self._lua["lane_enqueue"](keys=[keys.messages(self.namespace, queue), lane], args=args, client=pipe)

    def _prepare_immediate(self, message: dramatiq.Message[Any]) -> dramatiq.Message[Any]:
        return message.copy(options={"redis_message_id": new_id()})

    def _publish_batch(self, items: Sequence[tuple[dramatiq.Message[Any], int | None]]) -> None:
        """One MULTI/EXEC: every message or none (the schedule too, when it lives here)."""
        store = self.epq_store
        same = isinstance(store, RedisStateStore) and store.client is self.client
        pipe = self.client.pipeline(transaction=True)
        elsewhere: list[str] = []
        try:
            for message, due in items:
                if due is None:
                    self.lane_enqueue(message, pipe=pipe)
                elif same:
                    assert isinstance(store, RedisStateStore)
                    store.schedule_add(message.encode(), due, pipe=pipe)
                else:
                    assert store is not None
                    elsewhere.append(store.schedule_add(message.encode(), due))
            pipe.execute()
        except BaseException:
            if elsewhere and store is not None:
                store.schedule_remove(elsewhere)
            raise

    def insert_recorded(
        self, message: dramatiq.Message[Any], record: NewRecord, payload_json: str | None
    ) -> str | None:
        """Insert one planned job due at once (``epq.insert``): take its lock (if ``record`` has
        one), write its record and put the message on its lane, in one script. Returns None when
        inserted, or the holder value of the job that holds the lock (nothing is written then).

        Other middleware's enqueue hooks run around it (epq's own act on unplanned messages
        only). The message is filed under its own id (a new message: no copy needed)."""
        message.options["redis_message_id"] = rid = message.message_id
        before = self.foreign_hooks("before_enqueue")
        if before:
            self.emit_before("enqueue", message, None)
        queue = message.queue_name
        script_keys = [
            keys.job(rid),
            keys.STATS,
            record.lock_key or keys.job(rid),
            keys.messages(self.namespace, queue),
            keys.lane(self.namespace, queue, lane_of(message.options)),
        ]
        # (from the payload's JSON when the caller has it, unless a hook may have changed the payload)
        data = encode(message) if before or payload_json is None else encode(message, payload_json)
        fields = without_payload(record.fields)  # (the message holds it: see RedisRecords)
        counter = counter_group(fields["queue"], fields["priority"], fields["state"])
        args: list[Any] = [
            rid,
            record.ttl_ms,
            record.holder if record.lock_key else "",
            max(1, record.lock_ttl_ms),
        ]
        args += [rid, data, counter, *flat_fields(fields)]
        with ScriptStream(self._kept, self._lua["enqueue_recorded"]) as call:  # (thinner than redis-py's)
            call.send(script_keys, args)
            holder = call.read()
        if holder:
            return str(holder.decode())
        if self.foreign_hooks("after_enqueue"):
            self.emit_after("enqueue", message, None)
        return None

    # ---- bulk enqueue -------------------------------------------------------------------------

    def bulk_call(self, jobs: Sequence[BulkJob]) -> tuple[list[str], list[Any]]:
        """The keys and arguments of one ``enqueue_many_recorded`` call enqueueing ``jobs``
        (immediate jobs with their records and locks). Other middleware's ``before_enqueue``
        hooks run here, for each message."""
        before = self.foreign_hooks("before_enqueue")
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
            job_args += [number, message.message_id, job.lock_key, data, job.args_json, job.endpoint_id]
        head = [keys.JOB_PREFIX, OPEN_RECORD_TTL_MS, self.namespace, BULK_TOKEN_TTL_MS, len(groups)]
        return [keys.STATS, keys.bulk_token(new_id())], head + group_args + job_args

    def bulk_replies(self, jobs: Sequence[BulkJob], reply: list[Any]) -> list[str | None]:
        """For each job of a ``bulk_call``, from its reply: None when enqueued, or the holder value
        of the job that holds its lock. Enqueued messages get other middleware's ``after_enqueue``."""
        out: list[str | None] = [None] * len(jobs)
        for i in range(0, len(reply), 2):
            out[int(reply[i]) - 1] = reply[i + 1].decode()
        if self.foreign_hooks("after_enqueue"):
            for job, holder in zip(jobs, out, strict=True):
                if holder is None:
                    self.emit_after("enqueue", job.message, None)
        return out

    def bulk_stream(self) -> ScriptStream:
        """A connection to make ``bulk_call`` calls on while preparing the next one."""
        return ScriptStream(self._kept, self._lua["enqueue_many_recorded"])

    # ---- the schedule -------------------------------------------------------------------------

    def promote_due(self, now_ms: int, limit: int) -> tuple[int, int | None] | None:
        """Move due scheduled messages into the lanes in one script when the schedule lives in
        this Redis (the count and the next due time); None otherwise (``epq.schedule`` claims and
        publishes them instead)."""
        store = self.epq_store
        if isinstance(store, RedisStateStore) and store.client is self.client:
            return store.schedule_move_to_redis_queues(now_ms, limit, self.namespace)
        return None

    # ---- consume ------------------------------------------------------------------------------

    @property
    def consumer_class(self) -> type[LaneConsumer]:
        return LaneConsumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Any:
        idle_poll = DELAY_QUEUE_POLL_MS if queue_name.endswith(".DQ") else IDLE_POLL_MS
        return super().consume(queue_name, self.prefetch_for(queue_name, prefetch), min(timeout, idle_poll))

    def fetch_lanes(self, queue_name: str, count: int) -> list[tuple[str, bytes]]:
        """Take up to ``count`` messages of ``queue_name`` for this worker, highest priority
        first: ``(redis message id, data)`` pairs."""
        ns = self.namespace
        script_keys = [
            keys.queue(ns, queue_name),
            keys.messages(ns, queue_name),
            keys.acks(ns, self.broker_id, queue_name),
            keys.heartbeats(ns),
            *self.lane_keys(queue_name),
        ]
        prefix = keys.JOB_PREFIX if self.fused else ""
        args = [current_millis(), self.broker_id, count, REBALANCE_MAX, prefix]
        out = self._lua["lane_fetch"](keys=script_keys, args=args)
        return [(out[i].decode(), out[i + 1]) for i in range(0, len(out), 2)]

    def ack_completed(
        self, queue_name: str, rid: str, job_id: str, ttl_ms: int, payload: str, output: str = ""
    ) -> None:
        """Acknowledge a message and mark its job completed, in one script; the record keeps the
        job's ``payload`` (JSON) from then on, and its ``output`` (JSON, '' for none)."""
        ns = self.namespace
        script_keys = [
            keys.acks(ns, self.broker_id, queue_name),
            keys.messages(ns, queue_name),
            keys.heartbeats(ns),
            *keys.record_keys(job_id),
            keys.DONE,
        ]
        records = self.epq.records if self.epq is not None else None
        assert isinstance(records, RedisRecords)  # (fused: the records live in this Redis)
        args = [current_millis(), self.broker_id, rid, job_id, ttl_ms, records.completed_max, keys.JOB_PREFIX]
        args += [payload, output]
        with ScriptStream(self._kept, self._lua["ack_completed"]) as call:  # (thinner than redis-py's)
            call.send(script_keys, args)
            call.read()

    def start_record(self, job_id: str, now_ms: int, ttl_ms: int) -> str | None:
        """``RecordStore.start`` for a job whose record lives in this Redis, on a kept connection
        (one call per job, as the ack: see ``ScriptStream``). Returns the state before."""
        with ScriptStream(self._kept, self._lua["record_start"]) as call:
            call.send(keys.record_keys(job_id), [job_id, now_ms, ttl_ms])
            before = call.read()
        return before.decode() if before else None

    def heartbeat(self) -> None:
        """Tell other workers this one is alive (every fetch and ack does too)."""
        self.client.zadd(keys.heartbeats(self.namespace), {self.broker_id: current_millis()})

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

    # ---- operators ----------------------------------------------------------------------------

    def flush(self, queue_name: str) -> None:
        self.client.delete(*self.lane_keys(queue_name))  # first, so no lane id outlives its message
        super().flush(queue_name)

    def waiting(self, queue_name: str) -> int:
        """Messages of ``queue_name`` waiting to be fetched (every lane and the plain list)."""
        pipe = self.client.pipeline(transaction=False)
        for key in [keys.queue(self.namespace, queue_name), *self.lane_keys(queue_name)]:
            pipe.llen(key)
        return sum(int(n) for n in pipe.execute())

    def purge_dead_letters(self, queues: Iterable[str]) -> None:
        """Empty Dramatiq's dead-letter queues (``<queue>.XQ``) of ``queues``."""
        for queue in queues:
            self.client.delete(*keys.dead_letters(self.namespace, queue))

    def count_dead_letters(self, queues: Iterable[str]) -> dict[str, int]:
        """How many messages the dead-letter queue (``<queue>.XQ``) of each of ``queues`` holds."""
        queues = list(queues)
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.zcard(keys.dead_letters(self.namespace, queue)[0])
        return {queue: int(n) for queue, n in zip(queues, pipe.execute(), strict=True)}


class LaneConsumer(PausableConsumer, GivesBack, _RedisConsumer):
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
      ``MAINTENANCE_INTERVAL_MS`` per consumer, not by chance;
    - while its queue is paused (``epq.pausing``) it fetches nothing and gives back its fetched
      batch, and keeps beating its heartbeat and maintaining its queue.
    """

    broker: EpqRedisBroker

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        # (not at once: after an outage, other workers' heartbeats are stale until their
        # consumers have reconnected and fetched, and their jobs must not be taken from them)
        self.maintained_at = time.monotonic()  # monotonic seconds
        self.beaten_at = time.monotonic()

    def next_message(self) -> MessageProxy | None:
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
                    if rid is not None and self.broker.fused:
                        in_flight(proxy).records_here = True  # see JobRecords
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

    def wait_paused(self) -> None:
        try:
            self.close()  # (gives back the fetched batch)
            now = time.monotonic()
            if now - self.maintained_at >= MAINTENANCE_INTERVAL_MS / 1000:
                self.maintained_at = now
                self.broker.maintain(self.queue_name)
            if now - self.beaten_at >= HEARTBEAT_INTERVAL_MS / 1000:
                self.beaten_at = now  # (the jobs still running must not look like a dead worker's)
                self.broker.heartbeat()
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        time.sleep(PAUSED_POLL_MS / 1000)

    def ack(self, message: Any) -> None:
        ttl = in_flight(message).complete_ttl_ms
        if ttl is None or must_requeue(message) or self.queue_name.endswith(".DQ"):
            super().ack(message)  # (GivesBack: or back to its queue)
            return
        try:
            rid = message.options["redis_message_id"]
            payload = payload_json(message.kwargs)
            output = in_flight(message).output
            self.broker.ack_completed(self.queue_name, rid, message.message_id, ttl, payload, output)
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        finally:
            self.queued_message_ids.discard(message.message_id)

    def give_back(self, message: Any) -> None:
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
