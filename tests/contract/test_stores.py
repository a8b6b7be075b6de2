"""The store contract: what ``epq.backends.base`` promises of a ``StateStore`` and a ``RecordStore``,
written once and run on the memory stores and on the Redis stores.

Where a store differs from the contract, its test is an expected failure for that store, listed
with what the store does instead in ``DIFFERENCES``.

Time: the memory stores run on a :class:`FakeClock`; the Redis record store takes its clock as an
argument (the times it writes), and Redis counts TTLs down itself, so letting time pass there
shortens every TTL in the test database (:meth:`Stores.advance`), as the uniqueness suite does.
The schedule takes its ``now`` from the caller, on every store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from epq.backends.base import Move, NewRecord, RecordStore, RelayedJob, StateStore, counter_group, holder_id
from epq.backends.memory import FakeClock, MemoryRecords, MemoryStateStore
from epq.backends.redis.store import RedisRecords, RedisStateStore
from epq.records import MAX_ERRORS
from tests.conftest import REDIS_URL

LOCK = "epq:unique:register_job:0123abcd"
OTHER_LOCK = "epq:unique:register_job:4567ef01"
HOLDER = "job-1|1700000000000|1700000000000|default|2"  # job id|created|due|queue|priority
RIVAL = "job-2|1700000000500|1700000000500|default|2"
TTL_MS = 10_000
DAY_MS = 24 * 3600 * 1000
T0 = 1_700_000_000_000  # a schedule's "now" (the schedule takes it from its caller)
LEASE_MS = 1_000


@dataclass
class Stores:
    """A state store and a record store over the same data, and a way to let time pass."""

    name: str
    state: StateStore
    records: RecordStore
    clock: FakeClock
    client: redis.Redis | None = None  # type: ignore[type-arg]

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for every lock and record (and move the clock records are written
        with)."""
        self.clock.advance(seconds)
        if self.client is None:
            return  # the memory stores read the fake clock
        shift_ms = round(seconds * 1000)
        for key in self.client.scan_iter(count=1000):
            ttl_ms = self.client.pttl(key)
            if ttl_ms < 0:
                continue  # no TTL
            if ttl_ms <= shift_ms:
                self.client.delete(key)
            else:
                self.client.pexpire(key, ttl_ms - shift_ms)

    def live_counters(self) -> dict[str, int]:
        """The counters that count something (a counter that went back to 0 may stay, as 0)."""
        return {group: n for group, n in self.records.counters().items() if n}


#: Where a store does not do what the contract says: (test, store) -> what it does instead. Each
#: is an expected failure, strict: the day the store is fixed, its entry must go.
DIFFERENCES = {
    ("test_an_expired_record_is_no_longer_counted", "redis"): (
        "Redis expires a record's key without running a script: its counter stays (epq.service's "
        "stats count dead jobs from the records for that reason)"
    ),
}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def stores(request: pytest.FixtureRequest) -> Iterator[Stores]:
    difference = DIFFERENCES.get((request.node.originalname, request.param))
    if difference is not None:
        request.applymarker(pytest.mark.xfail(reason=difference, strict=True))
    clock = FakeClock()
    if request.param == "memory":
        memory = MemoryStateStore(clock=clock)
        yield Stores("memory", memory, MemoryRecords(memory), clock)
        return
    request.getfixturevalue("redis_client")  # the test database, flushed before and after
    client = redis.Redis.from_url(REDIS_URL)
    state = RedisStateStore(client)
    yield Stores("redis", state, RedisRecords(client, lambda: int(clock() * 1000)), clock, client)
    state.close()


def fields(
    state: str = "available", queue: str = "default", priority: int = 2, **more: str
) -> dict[str, str]:
    """A record's fields, as the middleware writes them (strings)."""
    return {
        "state": state,
        "queue": queue,
        "priority": str(priority),
        "kind": "register_job",
        "attempt": "0",
        "max_attempts": "3",
        "created_at": str(T0),
        **more,
    }


def group(state: str, queue: str = "default", priority: int = 2) -> str:
    return counter_group(queue, priority, state)


# ---- the state store: uniqueness locks -----------------------------------------------------


def test_a_free_lock_is_taken_for_its_holder(stores: Stores) -> None:
    assert stores.state.get_unique(LOCK) is None
    assert stores.state.acquire_unique(LOCK, HOLDER, TTL_MS) is None
    assert stores.state.get_unique(LOCK) == HOLDER


def test_a_lock_is_taken_again_by_the_job_that_holds_it(stores: Stores) -> None:
    stores.state.acquire_unique(LOCK, HOLDER, TTL_MS)
    # the same job id, whatever the details after it (a resent enqueue makes new ones)
    assert stores.state.acquire_unique(LOCK, "job-1|1700000000999|1700000000999|default|2", TTL_MS) is None
    assert stores.state.acquire_unique(LOCK, "job-1", TTL_MS) is None
    assert holder_id(stores.state.get_unique(LOCK) or "") == "job-1"


def test_get_unique_many_reads_each_lock_in_order(stores: Stores) -> None:
    stores.state.acquire_unique(LOCK, HOLDER, TTL_MS)
    assert stores.state.get_unique_many([OTHER_LOCK, LOCK, LOCK]) == [None, HOLDER, HOLDER]
    assert stores.state.get_unique_many([]) == []


def test_a_lock_another_job_holds_is_refused_with_the_holders_value(stores: Stores) -> None:
    stores.state.acquire_unique(LOCK, HOLDER, TTL_MS)
    assert stores.state.acquire_unique(LOCK, RIVAL, TTL_MS) == HOLDER
    assert stores.state.get_unique(LOCK) == HOLDER
    # and other keys are not affected
    assert stores.state.acquire_unique(OTHER_LOCK, RIVAL, TTL_MS) is None


def test_a_lock_is_released_only_by_its_holder(stores: Stores) -> None:
    stores.state.acquire_unique(LOCK, HOLDER, TTL_MS)
    assert stores.state.release_unique(LOCK, "job-2") is False
    assert stores.state.get_unique(LOCK) == HOLDER
    assert stores.state.release_unique(LOCK, "job-1") is True  # the job id, not the holder value
    assert stores.state.get_unique(LOCK) is None
    assert stores.state.release_unique(LOCK, "job-1") is False  # nothing left to release
    assert stores.state.acquire_unique(LOCK, RIVAL, TTL_MS) is None


def test_a_lock_expires_after_its_ttl(stores: Stores) -> None:
    stores.state.acquire_unique(LOCK, HOLDER, TTL_MS)
    stores.advance(TTL_MS / 1000 - 1)
    assert stores.state.get_unique(LOCK) == HOLDER
    assert stores.state.acquire_unique(LOCK, RIVAL, TTL_MS) == HOLDER
    stores.advance(2)
    assert stores.state.get_unique(LOCK) is None
    assert stores.state.release_unique(LOCK, "job-1") is False
    assert stores.state.acquire_unique(LOCK, RIVAL, TTL_MS) is None
    assert stores.state.get_unique(LOCK) == RIVAL


def test_now_ms_is_the_time_in_milliseconds_since_the_epoch(stores: Stores) -> None:
    # the memory store's clock is stopped at the time the fixture made it; Redis' runs
    now = stores.state.now_ms()
    assert isinstance(now, int)
    assert time.time() * 1000 - 60_000 < now <= time.time() * 1000 + 1


# ---- the state store: requests to cancel running jobs ------------------------------------


def test_cancel_requests_names_the_jobs_with_a_request_in_one_call(stores: Stores) -> None:
    assert stores.state.cancel_requests([]) == []
    assert stores.state.cancel_requests(["job-1", "job-2"]) == []
    stores.state.request_cancel("job-2", TTL_MS)
    stores.state.request_cancel("job-3", TTL_MS)
    assert stores.state.cancel_requests(["job-1", "job-2", "job-3"]) == ["job-2", "job-3"]
    stores.state.request_cancel("job-2", TTL_MS)  # (asked again: still one request)
    assert stores.state.cancel_requests(["job-3", "job-2"]) == ["job-3", "job-2"]


def test_a_cancel_request_is_forgotten_or_expires_after_its_ttl(stores: Stores) -> None:
    stores.state.request_cancel("job-1", TTL_MS)
    stores.state.request_cancel("job-2", TTL_MS)
    stores.state.forget_cancel("job-1")
    stores.state.forget_cancel("job-9")  # (none: harmless)
    assert stores.state.cancel_requests(["job-1", "job-2"]) == ["job-2"]
    stores.advance(TTL_MS / 1000 - 1)
    assert stores.state.cancel_requests(["job-2"]) == ["job-2"]
    stores.advance(2)
    assert stores.state.cancel_requests(["job-2"]) == []
    # and a request is not a lock: the locks are untouched
    assert stores.state.unique_locks() == {}


# ---- the state store: the schedule ---------------------------------------------------------


def test_paused_queues_are_kept_until_resumed_and_do_not_expire(stores: Stores) -> None:
    assert stores.state.paused_queues() == set()
    assert stores.state.pause_queue("default") is True
    assert stores.state.pause_queue("default") is False  # (paused already)
    assert stores.state.pause_queue("events") is True
    stores.advance(40 * 24 * 3600)
    assert stores.state.paused_queues() == {"default", "events"}
    assert stores.state.resume_queue("default") is True
    assert stores.state.resume_queue("default") is False  # (not paused: harmless)
    assert stores.state.paused_queues() == {"events"}


def test_schedule_add_returns_the_entry_given_or_a_new_one(stores: Stores) -> None:
    assert stores.state.schedule_add(b"m1", T0, entry="e1") == "e1"
    made = {stores.state.schedule_add(b"m", T0) for _ in range(3)}
    assert len(made) == 3
    assert all(isinstance(entry, str) and entry and entry != "e1" for entry in made)
    assert stores.state.schedule_size() == 4


def test_adding_an_entry_again_is_harmless(stores: Stores) -> None:
    for _ in range(3):
        assert stores.state.schedule_add(b"m1", T0, entry="e1") == "e1"
    assert stores.state.schedule_size() == 1
    assert stores.state.schedule_claim(T0, LEASE_MS, 10) == ([("e1", b"m1")], None)


def test_adding_a_claimed_entry_again_does_not_make_it_due_again(stores: Stores) -> None:
    # (a retry's scheduling sent again after a lost reply, while a promoter holds the entry)
    stores.state.schedule_add(b"m1", T0, entry="e1")
    assert stores.state.schedule_claim(T0, LEASE_MS, 10)[0] == [("e1", b"m1")]
    assert stores.state.schedule_add(b"m1", T0, entry="e1") == "e1"
    assert stores.state.schedule_claim(T0 + 1, LEASE_MS, 10)[0] == []
    assert (stores.state.schedule_size(), stores.state.schedule_claimed()) == (1, 1)


def test_claim_takes_only_due_entries_and_says_when_the_next_is_due(stores: Stores) -> None:
    assert stores.state.schedule_claim(T0, LEASE_MS, 10) == ([], None)
    stores.state.schedule_add(b"m3", T0 + 300, entry="e3")
    stores.state.schedule_add(b"m1", T0 + 100, entry="e1")
    stores.state.schedule_add(b"m2", T0 + 200, entry="e2")
    assert stores.state.schedule_claim(T0, LEASE_MS, 10) == ([], T0 + 100)
    assert stores.state.schedule_claim(T0 + 200, LEASE_MS, 10) == ([("e1", b"m1"), ("e2", b"m2")], T0 + 300)
    assert stores.state.schedule_claim(T0 + 300, LEASE_MS, 10) == ([("e3", b"m3")], None)


def test_claim_takes_at_most_limit_entries_the_earliest_first(stores: Stores) -> None:
    for n in (4, 0, 3, 1, 2):
        stores.state.schedule_add(f"m{n}".encode(), T0 + n, entry=f"e{n}")
    claimed, next_due = stores.state.schedule_claim(T0 + 10, LEASE_MS, 2)
    assert claimed == [("e0", b"m0"), ("e1", b"m1")]
    assert next_due == T0 + 2  # due already: the rest wait for the next claim
    claimed, next_due = stores.state.schedule_claim(T0 + 10, LEASE_MS, 10)
    assert [entry for entry, _ in claimed] == ["e2", "e3", "e4"]
    assert next_due is None


def test_a_claimed_entry_is_not_claimed_again_during_its_lease(stores: Stores) -> None:
    stores.state.schedule_add(b"m1", T0, entry="e1")
    assert stores.state.schedule_claim(T0, LEASE_MS, 10)[0] == [("e1", b"m1")]
    assert stores.state.schedule_claim(T0 + LEASE_MS - 1, LEASE_MS, 10) == ([], None)
    assert stores.state.schedule_claimed() == 1


def test_an_entry_whose_lease_ran_out_is_claimed_again(stores: Stores) -> None:
    # (a promoter that died between claiming and publishing)
    stores.state.schedule_add(b"m1", T0, entry="e1")
    stores.state.schedule_claim(T0, LEASE_MS, 10)
    assert stores.state.schedule_claim(T0 + LEASE_MS + 1, LEASE_MS, 10)[0] == [("e1", b"m1")]
    assert stores.state.schedule_claimed() == 1
    # under a new lease
    assert stores.state.schedule_claim(T0 + 2 * LEASE_MS, LEASE_MS, 10)[0] == []
    assert stores.state.schedule_claim(T0 + 2 * LEASE_MS + 2, LEASE_MS, 10)[0] == [("e1", b"m1")]


def test_ack_forgets_claimed_entries(stores: Stores) -> None:
    stores.state.schedule_add(b"m1", T0, entry="e1")
    stores.state.schedule_add(b"m2", T0, entry="e2")
    stores.state.schedule_claim(T0, LEASE_MS, 10)
    stores.state.schedule_ack(["e1"])
    assert (stores.state.schedule_size(), stores.state.schedule_claimed()) == (1, 1)
    stores.state.schedule_ack([])
    stores.state.schedule_ack(["e2"])
    assert (stores.state.schedule_size(), stores.state.schedule_claimed()) == (0, 0)
    assert stores.state.schedule_claim(T0 + 10 * LEASE_MS, LEASE_MS, 10) == ([], None)


def test_remove_forgets_entries_never_claimed(stores: Stores) -> None:
    stores.state.schedule_add(b"m1", T0 + 100, entry="e1")
    stores.state.schedule_add(b"m2", T0 + 200, entry="e2")
    stores.state.schedule_add(b"m3", T0 + 300, entry="e3")
    stores.state.schedule_remove(["e1", "e3"])
    stores.state.schedule_remove([])
    assert stores.state.schedule_size() == 1
    assert stores.state.schedule_claim(T0, LEASE_MS, 10) == ([], T0 + 200)
    assert stores.state.schedule_claim(T0 + 1000, LEASE_MS, 10) == ([("e2", b"m2")], None)


def test_size_counts_waiting_and_claimed_entries_and_claimed_the_claimed(stores: Stores) -> None:
    assert (stores.state.schedule_size(), stores.state.schedule_claimed()) == (0, 0)
    stores.state.schedule_add(b"m1", T0, entry="e1")
    stores.state.schedule_add(b"m2", T0, entry="e2")
    stores.state.schedule_add(b"m3", T0 + 1000, entry="e3")
    assert (stores.state.schedule_size(), stores.state.schedule_claimed()) == (3, 0)
    stores.state.schedule_claim(T0, LEASE_MS, 1)
    assert (stores.state.schedule_size(), stores.state.schedule_claimed()) == (3, 1)
    stores.state.schedule_claim(T0, LEASE_MS, 10)
    assert (stores.state.schedule_size(), stores.state.schedule_claimed()) == (3, 2)
    stores.state.schedule_ack(["e1", "e2"])
    assert (stores.state.schedule_size(), stores.state.schedule_claimed()) == (1, 0)


# ---- the record store: writing records -----------------------------------------------------


def test_create_writes_the_record_and_counts_it(stores: Stores) -> None:
    assert stores.records.create(NewRecord("j1", fields(), DAY_MS)) is None
    assert stores.records.get("j1") == fields()
    assert stores.live_counters() == {group("available"): 1}


def test_create_with_a_lock_takes_the_lock_and_writes_the_record(stores: Stores) -> None:
    assert stores.records.create(NewRecord("job-1", fields(), DAY_MS, LOCK, HOLDER, TTL_MS)) is None
    assert stores.records.get("job-1") == fields()
    assert stores.state.get_unique(LOCK) == HOLDER
    assert stores.live_counters() == {group("available"): 1}


def test_create_with_a_lock_another_job_holds_returns_the_holder_and_writes_nothing(stores: Stores) -> None:
    stores.records.create(NewRecord("job-1", fields(), DAY_MS, LOCK, HOLDER, TTL_MS))
    assert stores.records.create(NewRecord("job-2", fields(), DAY_MS, LOCK, RIVAL, TTL_MS)) == HOLDER
    assert stores.records.get("job-2") is None
    assert stores.state.get_unique(LOCK) == HOLDER
    assert stores.live_counters() == {group("available"): 1}


def test_create_many_writes_each_entry_in_order_and_answers_duplicates(stores: Stores) -> None:
    stores.state.acquire_unique(OTHER_LOCK, "job-0|1|1|default|2", TTL_MS)  # held before the batch
    holder_3 = "job-3|1700000000000|1700000000000|default|2"
    answers = stores.records.create_many(
        [
            NewRecord("job-1", fields(), DAY_MS, LOCK, HOLDER, TTL_MS),
            NewRecord("job-2", fields("scheduled"), DAY_MS),  # no lock
            NewRecord("job-3", fields(), DAY_MS, LOCK, holder_3, TTL_MS),  # job-1 took it
            NewRecord("job-4", fields(), DAY_MS, OTHER_LOCK, "job-4|1|1|default|2", TTL_MS),
        ]
    )
    assert answers == [None, None, HOLDER, "job-0|1|1|default|2"]
    assert stores.records.get_many(["job-1", "job-2", "job-3", "job-4"]) == [
        fields(),
        fields("scheduled"),
        None,
        None,
    ]
    assert stores.live_counters() == {group("available"): 1, group("scheduled"): 1}
    assert stores.records.create_many([]) == []


def _relayed(job_id: str, lock: str = "", holder: str = "", state: str = "available") -> RelayedJob:
    record = NewRecord(job_id, fields(state), DAY_MS, lock, holder, TTL_MS if lock else 0)
    return RelayedJob(record, f"{job_id}:0", f"message of {job_id}".encode(), T0)


def test_create_relayed_writes_records_locks_and_schedule_entries_and_answers_duplicates(
    stores: Stores,
) -> None:
    stores.state.acquire_unique(OTHER_LOCK, "job-0|1|1|default|2", TTL_MS)  # held before the batch
    answers = stores.records.create_relayed(
        [
            _relayed("job-1", LOCK, HOLDER),
            _relayed("job-2", state="scheduled"),  # no lock
            _relayed("job-3", LOCK, "job-3|1|1|default|2"),  # job-1 took it
            _relayed("job-4", OTHER_LOCK, "job-4|1|1|default|2"),
        ]
    )
    assert answers == [None, None, HOLDER, "job-0|1|1|default|2"]
    assert stores.records.get_many(["job-1", "job-2", "job-3", "job-4"]) == [
        fields(),
        fields("scheduled"),
        None,
        None,
    ]
    assert stores.state.get_unique(LOCK) == HOLDER
    assert stores.live_counters() == {group("available"): 1, group("scheduled"): 1}
    claimed, _ = stores.state.schedule_claim(T0, LEASE_MS, 10)
    assert sorted(claimed) == [("job-1:0", b"message of job-1"), ("job-2:0", b"message of job-2")]
    assert stores.records.create_relayed([]) == []


def test_a_relayed_job_written_again_is_marked_and_nothing_is_written_twice(stores: Stores) -> None:
    # Given a batch written, its messages then promoted and its records moved on (a relay died
    # before it could forget the batch's outbox rows)
    stores.records.create_relayed([_relayed("job-1", LOCK, HOLDER), _relayed("job-2")])
    stores.state.schedule_ack([entry for entry, _ in stores.state.schedule_claim(T0, LEASE_MS, 10)[0]])
    stores.records.move("job-1", "completed", {}, DAY_MS)
    # When another relay writes the same batch
    answers = stores.records.create_relayed([_relayed("job-1", LOCK, HOLDER), _relayed("job-2")])
    # Then each job is said to be relayed already, and nothing is written again
    assert answers == [True, True]
    assert stores.records.get("job-1") == fields("completed")
    assert stores.state.schedule_size() == 0
    assert stores.live_counters() == {group("completed"): 1, group("available"): 1}
    # and once the marks are forgotten (the rows are gone), a batch of those ids would be new
    stores.records.forget_relayed(["job-1", "job-2"])
    stores.records.forget_relayed([])
    assert stores.records.create_relayed([_relayed("job-2")]) == [None]


def test_get_many_returns_each_record_or_none_in_order(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields(), DAY_MS))
    stores.records.create(NewRecord("j2", fields("scheduled", queue="events", priority=1), DAY_MS))
    assert stores.records.get_many(["j2", "missing", "j1"]) == [
        fields("scheduled", queue="events", priority=1),
        None,
        fields(),
    ]
    assert stores.records.get("missing") is None
    assert stores.records.get_many([]) == []


# ---- the record store: transitions ---------------------------------------------------------


def test_move_sets_the_state_and_fields_and_returns_the_state_before(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields(), DAY_MS))
    assert stores.records.move("j1", "cancelled", {"finalized_at": "5"}, DAY_MS) == "available"
    assert stores.records.get("j1") == fields("cancelled", finalized_at="5")
    assert stores.live_counters() == {group("cancelled"): 1}


def test_move_changes_nothing_unless_the_state_is_allowed(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields(), DAY_MS))
    allowed = ("scheduled", "retryable")
    assert stores.records.move("j1", "cancelled", {"finalized_at": "5"}, DAY_MS, allowed) == "available"
    assert stores.records.get("j1") == fields()
    assert stores.live_counters() == {group("available"): 1}
    allowed = ("scheduled", "available")
    assert stores.records.move("j1", "cancelled", {"finalized_at": "5"}, DAY_MS, allowed) == "available"
    assert stores.records.get("j1") == fields("cancelled", finalized_at="5")


def test_move_of_a_job_without_a_record_returns_none_and_writes_nothing(stores: Stores) -> None:
    assert stores.records.move("missing", "cancelled", {"finalized_at": "5"}, DAY_MS) is None
    assert stores.records.get("missing") is None
    assert stores.live_counters() == {}


def test_only_the_newest_completed_jobs_keep_their_record(stores: Stores) -> None:
    stores.records.completed_max = 3  # type: ignore[attr-defined]  # (each store has the setting)
    for n in range(8):
        stores.records.create(NewRecord(f"j{n}", fields("running"), DAY_MS))
    stores.records.create(NewRecord("waiting", fields(), DAY_MS))
    for n in range(8):
        stores.clock.advance(1)
        assert stores.records.move(f"j{n}", "completed", {"finalized_at": str(n)}, DAY_MS) == "running"
    # the three completed last keep their record, with their count; other states are not touched
    assert [f"j{n}" for n in range(8) if stores.records.get(f"j{n}") is not None] == ["j5", "j6", "j7"]
    assert stores.live_counters() == {group("completed"): 3, group("available"): 1}
    assert stores.records.get("waiting") == fields()


def test_only_the_newest_dead_jobs_keep_their_record(stores: Stores) -> None:
    stores.records.dead_max = 3  # type: ignore[attr-defined]  # (each store has the setting)
    for n in range(7):
        stores.records.create(NewRecord(f"j{n}", fields("running"), DAY_MS))
    stores.records.create(NewRecord("waiting", fields(), DAY_MS))
    # jobs die by each way a record becomes discarded: a failed last attempt, a move, a new record
    for n in range(7):
        stores.clock.advance(1)
        if n % 2:
            stores.records.fail(f"j{n}", "discarded", _error(n), {"finalized_at": str(n)}, DAY_MS)
        else:
            stores.records.move(f"j{n}", "discarded", {"finalized_at": str(n)}, DAY_MS)
    stores.clock.advance(1)
    stores.records.create(NewRecord("j7", fields("discarded", finalized_at="7"), DAY_MS))
    # the three that died last keep their record, with their count; other states are not touched
    ids = [f"j{n}" for n in range(8)]
    assert [job_id for job_id in ids if stores.records.get(job_id) is not None] == ["j5", "j6", "j7"]
    assert stores.records.dead_ids(10) == ["j7", "j6", "j5"]
    assert stores.live_counters() == {group("discarded"): 3, group("available"): 1}
    assert stores.records.get("waiting") == fields()


def test_start_marks_the_job_running_and_counts_an_attempt(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields(), DAY_MS))
    assert stores.records.start("j1", T0 + 5, DAY_MS) == "available"
    assert stores.records.get("j1") == fields("running", attempt="1", attempted_at=str(T0 + 5))
    assert stores.live_counters() == {group("running"): 1}
    stores.records.move("j1", "retryable", {}, DAY_MS)
    assert stores.records.start("j1", T0 + 9, DAY_MS) == "retryable"
    assert stores.records.get("j1") == fields("running", attempt="2", attempted_at=str(T0 + 9))


def test_start_leaves_a_cancelled_job_cancelled(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields(), DAY_MS))
    stores.records.move("j1", "cancelled", {"finalized_at": "5"}, DAY_MS)
    assert stores.records.start("j1", T0 + 5, DAY_MS) == "cancelled"
    assert stores.records.get("j1") == fields("cancelled", finalized_at="5")
    assert stores.live_counters() == {group("cancelled"): 1}


def test_start_of_a_job_without_a_record_returns_none_and_writes_nothing(stores: Stores) -> None:
    assert stores.records.start("missing", T0, DAY_MS) is None
    assert stores.records.get("missing") is None
    assert stores.live_counters() == {}


def test_move_many_moves_each_job_in_order_and_returns_each_state_before(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields("running"), DAY_MS))
    stores.records.create(NewRecord("j2", fields("cancelled"), DAY_MS))
    moves = [
        Move("j1", "completed", {"finalized_at": "5"}, DAY_MS, ("running",)),
        Move("j2", "completed", {"finalized_at": "6"}, DAY_MS, ("running",)),  # not allowed
        Move("missing", "completed", {"finalized_at": "7"}, DAY_MS),
        Move("j1", "discarded", {}, DAY_MS, ("running",)),  # after the first: completed now
    ]
    assert stores.records.move_many(moves) == ["running", "cancelled", None, "completed"]
    assert stores.records.get("j1") == fields("completed", finalized_at="5")
    assert stores.records.get("j2") == fields("cancelled")
    assert stores.records.get("missing") is None
    assert stores.live_counters() == {group("completed"): 1, group("cancelled"): 1}
    assert stores.records.move_many([]) == []


def test_start_many_starts_each_job_and_returns_each_state_before(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields(), DAY_MS))
    stores.records.create(NewRecord("j2", fields("cancelled"), DAY_MS))
    stores.records.create(NewRecord("j3", fields("retryable", attempt="1"), DAY_MS))
    assert stores.records.start_many(["j1", "j2", "missing", "j3"], T0 + 5, DAY_MS) == [
        "available", "cancelled", None, "retryable",
    ]  # fmt: skip
    assert stores.records.get("j1") == fields("running", attempt="1", attempted_at=str(T0 + 5))
    assert stores.records.get("j2") == fields("cancelled")
    assert stores.records.get("j3") == fields("running", attempt="2", attempted_at=str(T0 + 5))
    assert stores.live_counters() == {group("running"): 2, group("cancelled"): 1}
    assert stores.records.start_many([], T0, DAY_MS) == []


def test_a_batch_runs_on_a_server_that_lost_the_scripts(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields(), DAY_MS))
    if stores.client is not None:
        stores.client.script_flush()  # (a restarted Redis without its scripts)
    assert stores.records.start_many(["j1"], T0 + 5, DAY_MS) == ["available"]
    if stores.client is not None:
        stores.client.script_flush()
    assert stores.records.move_many([Move("j1", "completed", {}, DAY_MS)]) == ["running"]
    assert stores.records.get("j1") == fields("completed", attempt="1", attempted_at=str(T0 + 5))


def _error(n: int) -> dict[str, Any]:
    return {"at": T0 + n, "error_type": "RuntimeError", "message": f"failure {n}", "traceback": "tb"}


def test_fail_appends_the_attempts_error_and_sets_the_state(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields(), DAY_MS))
    stores.records.start("j1", T0, DAY_MS)
    stores.records.fail("j1", "retryable", _error(1), {"scheduled_at": str(T0 + 60_000)}, DAY_MS)
    record = stores.records.get("j1")
    assert record is not None
    assert json.loads(record.pop("errors")) == [{**_error(1), "attempt": 1}]
    assert record == fields("retryable", attempt="1", attempted_at=str(T0), scheduled_at=str(T0 + 60_000))
    assert stores.live_counters() == {group("retryable"): 1}
    stores.records.start("j1", T0 + 60_000, DAY_MS)
    stores.records.fail("j1", "discarded", _error(2), {"finalized_at": str(T0 + 60_001)}, DAY_MS)
    record = stores.records.get("j1")
    assert record is not None
    assert json.loads(record["errors"]) == [{**_error(1), "attempt": 1}, {**_error(2), "attempt": 2}]
    assert (record["state"], record["finalized_at"]) == ("discarded", str(T0 + 60_001))
    assert stores.live_counters() == {group("discarded"): 1}


def test_fail_keeps_the_newest_max_errors(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields(), DAY_MS))
    attempts = MAX_ERRORS + 3
    for n in range(1, attempts + 1):
        stores.records.start("j1", T0 + n, DAY_MS)
        stores.records.fail("j1", "retryable", _error(n), {}, DAY_MS)
    record = stores.records.get("j1")
    assert record is not None
    errors = json.loads(record["errors"])
    assert len(errors) == MAX_ERRORS
    assert errors == [{**_error(n), "attempt": n} for n in range(4, attempts + 1)]


def test_fail_of_a_job_without_a_record_writes_nothing(stores: Stores) -> None:
    stores.records.fail("missing", "discarded", _error(1), {}, DAY_MS)
    assert stores.records.get("missing") is None
    assert stores.records.dead_ids(10) == []
    assert stores.live_counters() == {}


def test_counters_follow_every_transition_per_queue_priority_and_state(stores: Stores) -> None:
    records = stores.records
    records.create(NewRecord("a", fields(), DAY_MS))
    records.create(NewRecord("b", fields(queue="events", priority=1), DAY_MS))
    records.create(NewRecord("c", fields("scheduled", priority=4), DAY_MS))
    steps: list[tuple[Any, dict[str, int]]] = [
        (
            lambda: None,
            {group("available"): 1, group("available", "events", 1): 1, group("scheduled", priority=4): 1},
        ),
        (
            lambda: records.start("a", T0, DAY_MS),
            {group("running"): 1, group("available", "events", 1): 1, group("scheduled", priority=4): 1},
        ),
        (
            lambda: records.fail("a", "retryable", _error(1), {}, DAY_MS),
            {group("retryable"): 1, group("available", "events", 1): 1, group("scheduled", priority=4): 1},
        ),
        (
            lambda: records.move("c", "available", {}, DAY_MS, ("scheduled",)),
            {group("retryable"): 1, group("available", "events", 1): 1, group("available", priority=4): 1},
        ),
        (
            lambda: records.start("b", T0, DAY_MS),
            {group("retryable"): 1, group("running", "events", 1): 1, group("available", priority=4): 1},
        ),
        (
            lambda: records.move("b", "completed", {"finalized_at": "1"}, DAY_MS, ("running",)),
            {group("retryable"): 1, group("completed", "events", 1): 1, group("available", priority=4): 1},
        ),
        (
            lambda: records.fail("a", "discarded", _error(2), {}, DAY_MS),
            {group("discarded"): 1, group("completed", "events", 1): 1, group("available", priority=4): 1},
        ),
        (
            lambda: records.move("a", "available", {}, DAY_MS, ("discarded",)),  # retried from dead
            {group("available"): 1, group("completed", "events", 1): 1, group("available", priority=4): 1},
        ),
        (
            lambda: records.delete("c"),
            {group("available"): 1, group("completed", "events", 1): 1},
        ),
    ]
    for n, (step, expected) in enumerate(steps):
        step()
        assert stores.live_counters() == expected, f"step {n}"


# ---- the record store: looking records up, dead jobs, deleting -----------------------------

TWINS = ("0123abcd-1111-4000-8000-000000000001", "0123abcd-2222-4000-8000-000000000002")
NEIGHBOUR = "0123abce-3333-4000-8000-000000000003"


def test_find_ids_returns_the_ids_with_the_prefix(stores: Stores) -> None:
    for job_id in (*TWINS, NEIGHBOUR):
        stores.records.create(NewRecord(job_id, fields(), DAY_MS))
    assert sorted(stores.records.find_ids("0123abcd", 10)) == list(TWINS)
    assert stores.records.find_ids("0123abcd-2", 10) == [TWINS[1]]
    assert sorted(stores.records.find_ids("0123", 10)) == sorted([*TWINS, NEIGHBOUR])
    assert stores.records.find_ids(TWINS[0], 10) == [TWINS[0]]
    assert stores.records.find_ids("99999999", 10) == []


def test_find_ids_returns_at_most_limit_ids(stores: Stores) -> None:
    for job_id in (*TWINS, NEIGHBOUR):
        stores.records.create(NewRecord(job_id, fields(), DAY_MS))
    found = stores.records.find_ids("0123", 2)
    assert len(found) == 2
    assert set(found) <= {*TWINS, NEIGHBOUR}


@pytest.mark.parametrize("prefix", ["", "0123*", "0123?", "0123[a]", "01\\23", "01 23", "01|23"])
def test_find_ids_refuses_a_bad_prefix(stores: Stores, prefix: str) -> None:
    stores.records.create(NewRecord(TWINS[0], fields(), DAY_MS))
    with pytest.raises(ValueError, match="job id prefix"):
        stores.records.find_ids(prefix, 10)


def test_dead_ids_lists_discarded_jobs_newest_first(stores: Stores) -> None:
    for job_id in ("j1", "j2", "j3", "j4"):
        stores.records.create(NewRecord(job_id, fields(), DAY_MS))
    for job_id in ("j2", "j4", "j1"):  # discarded one second apart
        stores.records.move(job_id, "discarded", {}, DAY_MS)
        stores.advance(1)
    assert stores.records.dead_ids(10) == ["j1", "j4", "j2"]
    assert stores.records.dead_ids(2) == ["j1", "j4"]


def test_a_job_leaves_the_dead_list_when_it_is_retried_deleted_or_forgotten(stores: Stores) -> None:
    for job_id in ("j1", "j2", "j3", "j4"):
        stores.records.create(NewRecord(job_id, fields(), DAY_MS))
        stores.records.move(job_id, "discarded", {}, DAY_MS)
        stores.advance(1)
    stores.records.move("j1", "available", {}, DAY_MS, ("discarded",))  # retried from dead
    stores.records.delete("j2")
    stores.records.forget_dead(["j3"])
    assert stores.records.dead_ids(10) == ["j4"]
    assert stores.records.get_many(["j1", "j2", "j3"]) == [fields(), None, None]
    assert stores.live_counters() == {group("available"): 1, group("discarded"): 1}


def test_delete_forgets_the_record_and_uncounts_it(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields(), DAY_MS))
    stores.records.create(NewRecord("j2", fields(), DAY_MS))
    stores.records.delete("j1")
    assert stores.records.get("j1") is None
    assert stores.records.find_ids("j", 10) == ["j2"]
    assert stores.live_counters() == {group("available"): 1}
    stores.records.delete("j1")  # again: nothing happens
    stores.records.delete("missing")
    assert stores.live_counters() == {group("available"): 1}


# ---- the record store: retention -----------------------------------------------------------


def test_a_record_expires_after_its_ttl(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields(), 10_000))
    stores.records.create(NewRecord("j2", fields(), 10_000))
    stores.records.move("j2", "discarded", {}, 10_000)
    stores.advance(9)
    assert stores.records.get_many(["j1", "j2"]) == [fields(), fields("discarded")]
    stores.advance(2)
    assert stores.records.get_many(["j1", "j2"]) == [None, None]
    assert stores.records.find_ids("j", 10) == []
    assert stores.records.dead_ids(10) == []


def test_a_transition_with_a_ttl_restarts_it_and_one_without_keeps_it(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields(), 10_000))
    stores.advance(8)
    stores.records.start("j1", T0, 10_000)  # 10 s from now
    stores.advance(8)
    stores.records.move("j1", "running", {"note": "x"}, 0)  # no ttl: the one running keeps
    stores.advance(1)
    assert stores.records.get("j1") is not None
    stores.advance(2)
    assert stores.records.get("j1") is None


def test_an_expired_record_is_no_longer_counted(stores: Stores) -> None:
    stores.records.create(NewRecord("j1", fields(), 10_000))
    stores.records.create(NewRecord("j2", fields(), DAY_MS))
    stores.advance(11)
    assert stores.live_counters() == {group("available"): 1}


# ---- the state store: the periodic jobs' state ----------------------------------------------


def test_a_schedule_without_state_has_none(stores: Stores) -> None:
    assert stores.state.periodic_states([]) == []
    assert stores.state.periodic_states(["reindex", "purge"]) == [{}, {}]


def test_begin_notes_when_a_ticker_first_saw_a_schedule_once(stores: Stores) -> None:
    assert stores.state.periodic_begin("reindex", T0, DAY_MS) == T0
    assert stores.state.periodic_begin("reindex", T0 + 5000, DAY_MS) == T0  # the first one stays
    assert stores.state.periodic_states(["reindex", "purge"]) == [{"since": str(T0)}, {}]


def test_mark_notes_a_tick_and_its_job(stores: Stores) -> None:
    stores.state.periodic_begin("reindex", T0, DAY_MS)
    assert stores.state.periodic_mark("reindex", T0 + 60_000, "job-1", T0 + 60_010, DAY_MS) is True
    assert stores.state.periodic_states(["reindex"]) == [
        {"since": str(T0), "tick": str(T0 + 60_000), "job": "job-1", "at": str(T0 + 60_010)}
    ]


def test_the_noted_tick_only_moves_forward(stores: Stores) -> None:
    stores.state.periodic_mark("reindex", T0 + 120_000, "job-2", T0 + 120_005, DAY_MS)
    # a ticker that noted an earlier tick late, or the same tick again (with the holder's id)
    assert stores.state.periodic_mark("reindex", T0 + 60_000, "job-1", T0 + 120_010, DAY_MS) is False
    assert stores.state.periodic_mark("reindex", T0 + 120_000, "job-2", T0 + 120_020, DAY_MS) is False
    assert stores.state.periodic_states(["reindex"])[0] == {
        "tick": str(T0 + 120_000), "job": "job-2", "at": str(T0 + 120_005)
    }  # fmt: skip
    assert stores.state.periodic_mark("reindex", T0 + 180_000, "", T0 + 180_001, DAY_MS) is True
    assert stores.state.periodic_states(["reindex"])[0]["job"] == ""  # (a tick that enqueued nothing)


def test_a_schedules_state_expires_after_its_ttl_from_the_last_note(stores: Stores) -> None:
    stores.state.periodic_begin("reindex", T0, TTL_MS)
    stores.advance(TTL_MS / 1000 - 1)
    stores.state.periodic_mark("reindex", T0 + 60_000, "job-1", T0 + 60_000, TTL_MS)  # (restarts it)
    stores.advance(TTL_MS / 1000 - 1)
    assert stores.state.periodic_states(["reindex"])[0]["tick"] == str(T0 + 60_000)
    stores.advance(2)
    assert stores.state.periodic_states(["reindex"]) == [{}]


# ---- what the metrics read (epq.metrics.StoreCollector) ------------------------------------------


def test_schedule_due_counts_the_due_entries_no_promoter_claimed(stores: Stores) -> None:
    stores.state.schedule_add(b"m1", T0, entry="e1")
    stores.state.schedule_add(b"m2", T0 + 10, entry="e2")
    stores.state.schedule_add(b"m3", T0 + 1000, entry="e3")
    assert stores.state.schedule_due(T0 - 1) == 0
    assert stores.state.schedule_due(T0 + 10) == 2
    stores.state.schedule_claim(T0, LEASE_MS, 1)
    assert stores.state.schedule_due(T0 + 10) == 1
    assert stores.state.schedule_due(T0 + 1000) == 2


def test_unique_locks_counts_the_locks_held_per_kind(stores: Stores) -> None:
    assert stores.state.unique_locks() == {}
    stores.state.acquire_unique(LOCK, HOLDER, TTL_MS)
    stores.state.acquire_unique(OTHER_LOCK, RIVAL, TTL_MS)
    stores.state.acquire_unique("epq:unique:index_endpoint:89ab", "job-3", TTL_MS)
    assert stores.state.unique_locks() == {"register_job": 2, "index_endpoint": 1}
    stores.state.release_unique(LOCK, "job-1")
    assert stores.state.unique_locks() == {"register_job": 1, "index_endpoint": 1}


def test_oldest_waiting_is_the_earliest_due_available_job_per_queue_and_priority(stores: Stores) -> None:
    # Given available jobs due at different times, in two queues and priorities, and others
    records = stores.records
    records.create(NewRecord("a", fields(scheduled_at=str(T0 + 20)), DAY_MS))
    records.create(NewRecord("b", fields(scheduled_at=str(T0 + 10)), DAY_MS))
    records.create(NewRecord("c", fields(priority=1, scheduled_at=str(T0 + 30)), DAY_MS))
    records.create(NewRecord("d", fields(queue="events", scheduled_at=str(T0 + 40)), DAY_MS))
    records.create(NewRecord("e", fields("scheduled", scheduled_at=str(T0)), DAY_MS))
    assert records.oldest_waiting() == {
        ("default", 2): T0 + 10,
        ("default", 1): T0 + 30,
        ("events", 2): T0 + 40,
    }
    # When the oldest starts, one is deleted and a scheduled one becomes available
    records.start("b", T0 + 50, DAY_MS)
    records.delete("d")
    records.move("e", "available", {}, DAY_MS)
    # Then the oldest waiting are the others
    assert records.oldest_waiting() == {("default", 2): T0, ("default", 1): T0 + 30}
    records.start("e", T0 + 60, DAY_MS)
    records.start("a", T0 + 60, DAY_MS)
    assert records.oldest_waiting() == {("default", 1): T0 + 30}


def test_oldest_waiting_leaves_out_expired_records(stores: Stores) -> None:
    stores.records.create(NewRecord("old", fields(scheduled_at=str(T0)), 1000))
    stores.records.create(NewRecord("new", fields(scheduled_at=str(T0 + 5)), DAY_MS))
    stores.advance(2)
    assert stores.records.oldest_waiting() == {("default", 2): T0 + 5}


# ---- the record store: listing and tombstones ---------------------------------------------------


def _listed(
    stores: Stores, filters: dict[str, str], newest_first: bool = False, limit: int = 100
) -> list[str]:
    ids, _ = stores.records.list_ids(filters, newest_first=newest_first, after=None, limit=100)
    return ids


def test_records_are_listed_by_their_fields_in_creation_order_with_a_position_to_go_on(
    stores: Stores,
) -> None:
    for n, job_id in enumerate(["b", "a", "c", "d"]):  # (a and b made in the same millisecond)
        more = {"endpoint_id": "e1" if n < 2 else "e2"}
        stores.records.create(NewRecord(job_id, fields(created_at=str(T0 + max(0, n - 1)), **more), DAY_MS))
    stores.records.move("c", "running", {}, DAY_MS)
    assert _listed(stores, {}) == ["a", "b", "c", "d"]
    assert _listed(stores, {}, newest_first=True) == ["d", "c", "b", "a"]
    assert _listed(stores, {"state": "available"}) == ["a", "b", "d"]
    assert _listed(stores, {"state": "running"}) == ["c"]
    assert _listed(stores, {"endpoint_id": "e2", "state": "available"}) == ["d"]
    assert _listed(stores, {"kind": "index_endpoint"}) == []
    ids, position = stores.records.list_ids({}, newest_first=False, after=None, limit=2)
    assert (ids, position) == (["a", "b"], f"{T0:013d}:b")
    assert stores.records.list_ids({}, newest_first=False, after=position, limit=2) == (["c", "d"], None)
    assert stores.records.list_ids({}, newest_first=True, after=position, limit=2) == (["a"], None)


def test_an_expired_record_is_no_longer_listed(stores: Stores) -> None:
    stores.records.create(NewRecord("short", fields(), 1_000))
    stores.records.create(NewRecord("long", fields(created_at=str(T0 + 1)), DAY_MS))
    stores.advance(2)
    assert _listed(stores, {}) == ["long"]
    assert _listed(stores, {"state": "available"}) == ["long"]


def test_a_buried_record_leaves_a_tombstone_that_no_transition_writes_again(stores: Stores) -> None:
    stores.records.create(NewRecord("gone", fields(), DAY_MS))
    stores.records.create(NewRecord("kept", fields(created_at=str(T0 + 1)), DAY_MS))
    assert stores.records.bury("gone", DAY_MS) == "available"
    assert stores.records.get("gone") is None
    assert _listed(stores, {}) == ["kept"]
    assert stores.live_counters() == {group("available"): 1}
    assert stores.records.start("gone", T0, DAY_MS) == "deleted"  # (a worker skips it)
    assert stores.records.move("gone", "completed", {}, DAY_MS) == "deleted"
    stores.records.fail("gone", "discarded", {"at": T0, "error_type": "E", "message": "m"}, {}, DAY_MS)
    assert stores.records.get("gone") is None
    assert stores.records.dead_ids(10) == []
    assert stores.records.bury("gone", DAY_MS) is None
    assert stores.records.get("kept") is not None
    stores.advance(DAY_MS / 1000 + 1)
    assert stores.records.start("gone", T0, DAY_MS) is None  # (the tombstone expired)
