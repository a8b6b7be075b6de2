"""Every Redis key epq reads or writes: its own (``epq:*``) and those of Dramatiq's Redis layout
that it writes into. A key's format is written here once; the Lua scripts get keys as ``KEYS``
(or, where a script makes them itself, the prefix from here as an argument)."""

from __future__ import annotations

from ..base import KEY_PREFIX
from ..base import RELAYED_PREFIX as RELAYED_PREFIX  # (the scripts get it from here)

# ---- epq's own ---------------------------------------------------------------------------------

#: The durable schedule: entry ids by due time (ms), their messages, claimed entries by lease end,
#: and entries the Redis promotion could not read (set aside rather than block the schedule).
SCHEDULE = KEY_PREFIX + "schedule"
SCHEDULE_DATA = KEY_PREFIX + "schedule:data"
SCHEDULE_CLAIMED = KEY_PREFIX + "schedule:claimed"
SCHEDULE_UNREADABLE = SCHEDULE_DATA + ":unreadable"
#: Job records (a hash per job), per queue|priority|state counters, and dead jobs by time.
JOB_PREFIX = KEY_PREFIX + "job:"
STATS = KEY_PREFIX + "stats"
DEAD = KEY_PREFIX + "dead"
#: Completed jobs by finalization time (ms): the newest ``completed_max`` of them keep a record.
DONE = KEY_PREFIX + "done"
#: Enqueues refused as duplicates, per kind (a hash: kind -> count).
REFUSED = STATS + ":refused"
#: A periodic job's schedule: its state (a hash: since, tick, job, at).
PERIODIC_PREFIX = KEY_PREFIX + "periodic:"
#: Each bulk enqueue script call leaves its reply under a token key of its own.
BULK_TOKEN_PREFIX = KEY_PREFIX + "bulk:"
#: A request to cancel a running job (a string with a TTL per job: ``epq.cancellation``).
CANCEL_PREFIX = KEY_PREFIX + "cancel:"
#: The queues paused (a set of queue names: ``epq.pausing``).
PAUSED = KEY_PREFIX + "paused"


def job(job_id: str) -> str:
    """The hash of a job's record."""
    return JOB_PREFIX + job_id


def record_keys(job_id: str) -> list[str]:
    """What every record script takes first: the record, the counters, the dead index."""
    return [JOB_PREFIX + job_id, STATS, DEAD]


#: Set on a Redis whose job records live beside their messages (the Redis broker keeping epq's
#: state): the record scripts keep no waiting index there, since each priority lane's head is its
#: oldest waiting job (``lua/lib/counter.lua`` reads it; ``RedisRecords.oldest_waiting``).
LAG_FROM_LANES = STATS + ":lag-from-lanes"


def waiting(queue_name: str, priority: int) -> str:
    """The index of a queue and priority's available jobs by when they became due (the scripts
    make it from ``STATS`` too: ``lua/lib/counter.lua``)."""
    return f"{STATS}:waiting:{queue_name}|{priority}"


#: The listing indexes (``lua/lib/index.lua``): every name starts with this.
INDEX_PREFIX = STATS + ":ix:"


def index(field: str | None = None, value: object = None) -> str:
    """The listing index of the records whose ``field`` is ``value`` (one of
    ``epq.records.INDEXED_FIELDS``), or, without a field, of every record (the scripts make these
    names from ``STATS`` too: ``lua/lib/index.lua``)."""
    return f"{INDEX_PREFIX}{field}:{value}" if field is not None else INDEX_PREFIX + "all"


def cancel_request(job_id: str) -> str:
    """The request to cancel running job ``job_id`` (its value: when it was asked for, in ms)."""
    return CANCEL_PREFIX + job_id


def periodic(name: str) -> str:
    """The state of periodic job ``name``'s schedule."""
    return PERIODIC_PREFIX + name


def relayed(job_id: str) -> str:
    """The mark of a job a relay moved from the outbox (``relay_create.lua`` makes it from
    ``RELAYED_PREFIX`` too)."""
    return RELAYED_PREFIX + job_id


def bulk_token(token: str) -> str:
    return BULK_TOKEN_PREFIX + token


# ---- Dramatiq's Redis layout (namespace ``ns``, "dramatiq" by default) --------------------------


def queue(ns: str, queue_name: str) -> str:
    """Dramatiq's list of a queue's waiting message ids (epq's lanes empty it as they fetch)."""
    return f"{ns}:{queue_name}"


def messages(ns: str, queue_name: str) -> str:
    """The hash of a queue's messages by their ``redis_message_id``."""
    return f"{ns}:{queue_name}.msgs"


def lane(ns: str, queue_name: str, priority: int) -> str:
    """epq's list of a queue's waiting message ids of one priority (1..4)."""
    return f"{ns}:{queue_name}.P{priority}"


def acks(ns: str, worker_id: str, queue_name: str) -> str:
    """The set of message ids a worker fetched from a queue and has not acknowledged."""
    return f"{ns}:__acks__.{worker_id}.{queue_name}"


def heartbeats(ns: str) -> str:
    """Worker ids by their last heartbeat (ms)."""
    return f"{ns}:__heartbeats__"


def dead_letters(ns: str, queue_name: str) -> tuple[str, str]:
    """A queue's dead-letter index (ids by time) and messages (``<queue>.XQ``)."""
    return f"{ns}:{queue_name}.XQ", f"{ns}:{queue_name}.XQ.msgs"
