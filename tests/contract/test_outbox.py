"""Transactional enqueue (``tx=``) through the outbox, on every broker and through psycopg 3,
an SQLAlchemy Session and an SQLAlchemy Connection: a rollback enqueues nothing, a commit
exactly one job, uniqueness holds at call time and at relay time, and ``get_job`` tells a
pending job."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import psycopg
import pytest
import redis

import epq
from epq.outbox import sql
from epq.outbox.connections import Statements
from epq.outbox.relay import Relay
from epq.settings import reset_settings
from epq.testing import HandlerRegistry, backend, drain, install, relay
from tests.conftest import postgres_available
from tests.support.appdb import FORMS, AppDb
from tests.support.helpers import StartLog, index_request, run_until_drained, total_waiting, wait_for
from tests.support.postgres import POSTGRES_URL, rows

pytestmark = pytest.mark.postgres

S = epq.JobState


@pytest.fixture(params=FORMS)
def app(request: pytest.FixtureRequest) -> AppDb:
    return AppDb(request.param, postgres_available())


def svc(broker: dramatiq.Broker) -> epq.QueueService:
    return epq.QueueService(broker)


def nothing_anywhere(broker: dramatiq.Broker) -> None:
    """Nothing of any job: no message on the broker, nothing in the state store."""
    stores = backend(broker)
    assert total_waiting(broker) == 0
    assert stores.state.schedule_size() == 0
    assert stores.state.unique_locks() == {}
    assert {group: n for group, n in stores.records.counters().items() if n} == {}


def relay_all(broker: dramatiq.Broker, table: str) -> int:
    """Move every committed row now, as a relay does."""
    relayer = Relay(broker, POSTGRES_URL, table)
    moved = 0
    try:
        while n := relayer.relay_once():
            moved += n
    finally:
        relayer.close()
    return moved


# ---- rollback: nothing; commit: exactly one job -------------------------------------------------


def test_a_rolled_back_transaction_enqueues_nothing(outbox: str, broker: dramatiq.Broker, app: AppDb) -> None:
    # Given an application that creates an endpoint and enqueues its index in one transaction
    with app.transaction() as tx:
        endpoint_id = tx.create_endpoint()
        result = svc(broker).enqueue_index_endpoint({"endpoint_id": endpoint_id, "source": "API"}, tx=tx.tx)
        assert result.job.state is S.PENDING
        assert not result.unique_skipped_as_duplicate
        assert svc(broker).get_job(result.job.id, tx=tx.tx) == result.job  # its own transaction sees it
        # When the transaction rolls back
        tx.rollback()
    # Then neither the endpoint nor the job exists, and a relay finds nothing to move
    assert not app.endpoint_exists(endpoint_id)
    assert rows(POSTGRES_URL, outbox) == []
    assert relay_all(broker, outbox) == 0
    assert svc(broker).get_job(result.job.id) is None
    nothing_anywhere(broker)


def test_a_committed_transaction_enqueues_exactly_one_job(
    outbox: str, broker: dramatiq.Broker, app: AppDb, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    log = StartLog(epq_handlers)
    # Given an endpoint created and its index enqueued in one transaction, committed
    with app.transaction() as tx:
        endpoint_id = tx.create_endpoint()
        result = svc(broker).enqueue_index_endpoint({"endpoint_id": endpoint_id, "source": "API"}, tx=tx.tx)
        tx.commit()
    assert app.endpoint_exists(endpoint_id)
    # When the worker's relay moves it (woken by the commit) and the worker runs it
    assert wait_for(lambda: rows(POSTGRES_URL, outbox) == [], timeout=20)
    drain(broker, worker)
    # Then the job ran once, under the id the caller got, and its record says completed
    assert log.started == [result.job.id]
    record = svc(broker).get_job(result.job.id)
    assert record is not None
    assert record.state is S.COMPLETED
    assert record.args["endpoint_id"] == endpoint_id
    assert sum(backend(broker).records.counters().values()) == 1
    assert total_waiting(broker) == 0


def test_get_job_says_pending_until_the_relay_moves_it(
    outbox: str, broker: dramatiq.Broker, app: AppDb
) -> None:
    with app.transaction() as tx:
        result = svc(broker).enqueue_register_job(
            {"endpoint_id": str(uuid.uuid4()), "job_id": "j", "job_metadata": {}, "priority": 1}, tx=tx.tx
        )
        tx.commit()
    # committed, not relayed: no record yet, the outbox row tells (EPQ_OUTBOX_URL)
    pending = svc(broker).get_job(result.job.id)
    assert pending is not None
    assert (pending.state, pending.kind, pending.priority, pending.queue) == (
        S.PENDING,
        "register_job",
        1,
        "default",
    )
    assert pending.created_at == result.job.created_at
    assert relay_all(broker, outbox) == 1
    relayed = svc(broker).get_job(result.job.id)
    assert relayed is not None
    assert relayed.state is S.AVAILABLE
    assert (relayed.priority, relayed.created_at, relayed.args) == (1, pending.created_at, pending.args)


def test_many_and_the_actor_forms_take_tx(
    outbox: str, broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    log = StartLog(epq_handlers)
    app = AppDb("psycopg", postgres_available())
    with app.transaction() as tx:
        many = svc(broker).enqueue_many(
            [
                index_request(1),
                ("register_job", {"endpoint_id": str(uuid.uuid4()), "job_id": "a", "job_metadata": {}}),
            ],
            tx=tx.tx,
        )
        sent = epq.actors.register_source.send_with_options(
            kwargs={"endpoint_id": str(uuid.uuid4()), "source_id": "s", "source_metadata": {}}, tx=tx.tx
        )
        bulk = epq.actors.register_dynamic_trigger.send_many(
            [
                {"endpoint_id": str(uuid.uuid4()), "trigger_id": f"t{n}", "trigger_metadata": {}}
                for n in range(3)
            ],
            tx=tx.tx,
        )
        tx.commit()
    ids = [r.job.id for r in many] + [sent.message_id] + [r.job.id for r in bulk]
    assert {r.job.state for r in [*many, *bulk]} == {S.PENDING}
    assert wait_for(lambda: rows(POSTGRES_URL, outbox) == [], timeout=20)
    drain(broker, worker)
    assert sorted(log.started) == sorted(ids)


def test_run_at_and_priority_hold_through_the_outbox(outbox: str, broker: dramatiq.Broker) -> None:
    app = AppDb("psycopg", postgres_available())
    run_at = datetime.now(timezone.utc) + timedelta(hours=1)
    with app.transaction() as tx:
        later = svc(broker).enqueue_index_endpoint(index_request(1, run_at=run_at), tx=tx.tx)
        delayed = epq.actors.register_job.send_with_options(
            kwargs={"endpoint_id": str(uuid.uuid4()), "job_id": "d", "job_metadata": {}},
            delay=3_600_000,
            tx=tx.tx,
        )
        urgent = svc(broker).enqueue_index_endpoint(index_request(2, priority=1), tx=tx.tx)
        tx.commit()
    assert later.job.scheduled_at == run_at
    assert relay_all(broker, outbox) == 3
    stores = backend(broker)
    for job_id in (later.job.id, delayed.message_id):
        record = svc(broker).get_job(job_id)
        assert record is not None
        assert record.state is S.SCHEDULED
        assert record.scheduled_at > datetime.now(timezone.utc) + timedelta(minutes=59)
    assert stores.state.schedule_due(stores.state.now_ms()) == 0 or total_waiting(broker) <= 1
    first = svc(broker).get_job(urgent.job.id)
    assert first is not None
    assert (first.priority, first.state) == (1, S.AVAILABLE)


# ---- uniqueness --------------------------------------------------------------------------------


def test_a_key_held_by_an_enqueued_job_is_answered_at_call_time(
    outbox: str, broker: dramatiq.Broker, app: AppDb
) -> None:
    first = svc(broker).enqueue_index_endpoint(index_request(7))
    with app.transaction() as tx:
        again = svc(broker).enqueue_index_endpoint(index_request(7), tx=tx.tx)
        with pytest.raises(epq.DuplicateJob) as raised:
            epq.actors.index_endpoint.send_with_options(
                kwargs=index_request(7).model_dump(mode="json"), tx=tx.tx
            )
        tx.commit()
    assert again.unique_skipped_as_duplicate
    assert again.job.id == first.job.id
    assert again.job.state is S.AVAILABLE
    assert raised.value.existing_job_id == first.job.id
    assert rows(POSTGRES_URL, outbox) == []  # nothing written


def test_a_key_held_by_a_pending_job_is_answered_at_call_time(
    outbox: str, broker: dramatiq.Broker, app: AppDb
) -> None:
    with app.transaction() as tx:
        first = svc(broker).enqueue_index_endpoint(index_request(7), tx=tx.tx)
        same_tx = svc(broker).enqueue_index_endpoint(index_request(7), tx=tx.tx)
        tx.commit()
    with app.transaction() as tx:
        other_tx = svc(broker).enqueue_many([index_request(7), index_request(8), index_request(8)], tx=tx.tx)
        tx.commit()
    assert same_tx.unique_skipped_as_duplicate
    assert (same_tx.job.id, same_tx.job.state) == (first.job.id, S.PENDING)
    assert [r.unique_skipped_as_duplicate for r in other_tx] == [True, False, True]
    assert other_tx[0].job.id == first.job.id
    assert other_tx[2].job.id == other_tx[1].job.id
    assert sorted(r[0] for r in rows(POSTGRES_URL, outbox)) == sorted([first.job.id, other_tx[1].job.id])
    assert relay_all(broker, outbox) == 2
    # once relayed, the key is held in the state store
    with app.transaction() as tx:
        later = svc(broker).enqueue_index_endpoint(index_request(7), tx=tx.tx)
    assert later.unique_skipped_as_duplicate
    assert (later.job.id, later.job.state) == (first.job.id, S.AVAILABLE)


def test_a_holder_relayed_between_the_two_reads_is_found_in_the_state_store(
    outbox: str, broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a pending job that holds a key
    with psycopg.connect(POSTGRES_URL) as connection:
        first = svc(broker).enqueue_index_endpoint(index_request(5), tx=connection)
        connection.commit()
    # When another transaction's row for the key is refused, and a relay moves the holder out of
    # the outbox just before that transaction reads who holds the key
    read = Statements.rows

    def relayed_meanwhile(self: Statements, statement: str, params: Any = ()) -> Any:
        if statement == sql.holding(self.table):
            relay_all(broker, outbox)
        return read(self, statement, params)

    monkeypatch.setattr(Statements, "rows", relayed_meanwhile)
    with psycopg.connect(POSTGRES_URL) as connection:
        again = svc(broker).enqueue_index_endpoint(index_request(5), tx=connection)
        connection.commit()
    # Then the holder is found where it went, and nothing was written
    assert again.unique_skipped_as_duplicate
    assert (again.job.id, again.job.state) == (first.job.id, S.AVAILABLE)
    assert rows(POSTGRES_URL, outbox) == []


def test_a_key_taken_between_commit_and_relay_cancels_the_outbox_job(
    outbox: str, broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    log = StartLog(epq_handlers)
    app = AppDb("psycopg", postgres_available())
    # Given a job committed through the outbox, not relayed yet
    with app.transaction() as tx:
        pending = svc(broker).enqueue_index_endpoint(index_request(9), tx=tx.tx)
        tx.commit()
    # When a plain enqueue takes the same key meanwhile (it does not read the outbox)
    direct = svc(broker).enqueue_index_endpoint(index_request(9))
    assert not direct.unique_skipped_as_duplicate
    # Then the relay does not enqueue the outbox job: its record says it was cancelled, and why
    assert relay_all(broker, outbox) == 1
    run_until_drained(broker)
    assert log.started == [direct.job.id]
    record = svc(broker).get_job(pending.job.id)
    assert record is not None
    assert record.state is S.CANCELLED
    assert record.errors[0].error_type == "DuplicateJob"
    assert direct.job.id in record.errors[0].message


def test_transactions_racing_for_one_key_make_one_job(
    outbox: str, broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    log = StartLog(epq_handlers)
    app = AppDb("psycopg", postgres_available())
    racers = 8
    barrier = threading.Barrier(racers)
    outcomes: list[tuple[bool, epq.JobInsertResult]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def race(n: int) -> None:
        try:
            with app.transaction() as tx:
                tx.create_endpoint()
                barrier.wait(timeout=30)
                result = svc(broker).enqueue_index_endpoint(index_request(42), tx=tx.tx)
                time.sleep(random.uniform(0, 0.05))
                commit = n % 3 != 0  # some of them roll back after enqueueing
                tx.commit() if commit else tx.rollback()
            with lock:
                outcomes.append((commit, result))
        except BaseException as exc:  # (reported by the test, not lost in the thread)
            errors.append(exc)

    # Given 8 transactions enqueueing the same key at the same instant, some rolled back
    threads = [threading.Thread(target=race, args=(n,)) for n in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    # Then exactly one committed transaction's job holds it, and every other committed one was
    # answered with that job
    committed = [result for commit, result in outcomes if commit]
    winners = {r.job.id for r in committed if not r.unique_skipped_as_duplicate}
    assert len(winners) == 1
    (winner,) = winners
    assert {r.job.id for r in committed} == {winner}
    # and exactly one job runs: that one
    assert wait_for(lambda: rows(POSTGRES_URL, outbox) == [], timeout=20)
    drain(broker, worker)
    assert log.started == [winner]


# ---- the relay ----------------------------------------------------------------------------------


def _commit(broker: dramatiq.Broker, n: int, start: int = 0) -> list[str]:
    with psycopg.connect(POSTGRES_URL) as connection:
        results = svc(broker).enqueue_many([index_request(start + i) for i in range(n)], tx=connection)
        connection.commit()
    return [r.job.id for r in results]


def test_a_relay_dying_between_insert_and_delete_enqueues_nothing_twice(
    outbox: str, broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    log = StartLog(epq_handlers)
    ids = _commit(broker, 30)

    class Died(BaseException):
        pass

    def die(job_ids: list[str]) -> None:
        raise Died  # after the jobs are in the state store, before their rows are deleted

    # Given a relay that dies after inserting a batch and before deleting its rows
    dying = Relay(broker, POSTGRES_URL, outbox, batch=10, after_insert=die)
    try:
        with pytest.raises(Died):
            dying.relay_once()
    finally:
        dying.close()
    assert len(rows(POSTGRES_URL, outbox)) == 30  # its transaction rolled back
    # When relays take the rows again (the batch it inserted among them)
    assert relay_all(broker, outbox) == 30
    run_until_drained(broker)
    # Then each job ran exactly once
    assert Counter(log.started) == Counter(ids)
    assert sum(backend(broker).records.counters().values()) == 30


def test_relays_share_the_rows_and_never_take_the_same_one(
    outbox: str, broker: dramatiq.Broker, epq_handlers: HandlerRegistry
) -> None:
    log = StartLog(epq_handlers)
    ids = _commit(broker, 400)
    taken: dict[int, list[str]] = {0: [], 1: [], 2: []}

    def note(n: int) -> Any:
        def after_insert(job_ids: list[str]) -> None:
            taken[n].extend(job_ids)
            time.sleep(0.01)  # (rows held a while: the others must skip them)

        return after_insert

    relays = [Relay(broker, POSTGRES_URL, outbox, batch=20, after_insert=note(n)) for n in range(3)]
    threads = [threading.Thread(target=lambda r=r: [None for _ in iter(r.relay_once, 0)]) for r in relays]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for r in relays:
        r.close()
    everything = [job_id for part in taken.values() for job_id in part]
    assert Counter(everything) == Counter(ids)  # none taken twice, none left
    assert sum(1 for part in taken.values() if part) >= 2  # the work was shared
    run_until_drained(broker)
    assert Counter(log.started) == Counter(ids)


def test_an_idle_relay_wakes_on_commit_and_polls_as_a_fallback(outbox: str, broker: dramatiq.Broker) -> None:
    stop = threading.Event()
    # Given an idle relay that would poll only every 30 s
    relayer = Relay(broker, POSTGRES_URL, outbox, poll_interval_ms=30_000)
    thread = threading.Thread(target=relayer.run, args=(stop,))
    thread.start()
    try:
        time.sleep(0.5)
        # When a transaction commits a job, then the relay moves it at once (woken by NOTIFY)
        started = time.monotonic()
        (job_id,) = _commit(broker, 1)
        assert wait_for(lambda: svc(broker).get_job(job_id).state is not S.PENDING, timeout=10)  # type: ignore[union-attr]
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        thread.join(10)
    # And with no notification (the trigger off), a relay finds rows by polling
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"ALTER TABLE {outbox} DISABLE TRIGGER USER")
    stop = threading.Event()
    polling = Relay(broker, POSTGRES_URL, outbox, poll_interval_ms=200)
    thread = threading.Thread(target=polling.run, args=(stop,))
    thread.start()
    try:
        (job_id,) = _commit(broker, 1, start=1)
        assert wait_for(lambda: svc(broker).get_job(job_id).state is not S.PENDING, timeout=10)  # type: ignore[union-attr]
    finally:
        stop.set()
        thread.join(10)


def test_a_row_this_process_cannot_enqueue_is_discarded_with_why(
    outbox: str, broker: dramatiq.Broker
) -> None:
    # Given rows a newer application wrote: an unknown kind, a queue no worker here serves, and a
    # field this version's model does not know (which travels on, untouched)
    job_ids = [str(uuid.uuid4()) for _ in range(3)]
    now = int(time.time() * 1000)
    payloads = [
        '{"x": 1}',
        json.dumps({"endpoint_id": str(uuid.uuid4()), "source": "API", "queue_name": "nowhere"}),
        json.dumps({"endpoint_id": str(uuid.uuid4()), "source": "API", "new_field": [1]}),
    ]
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(
            f"INSERT INTO {outbox} (job_id, kind, payload, created_ms) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]::jsonb[], %s::bigint[])",
            (job_ids, ["from_the_future", "index_endpoint", "index_endpoint"], payloads, [now] * 3),
        )
    # When a relay takes them
    assert relay_all(broker, outbox) == 3
    # Then each is accounted for: none blocks the outbox, none is dropped unseen
    unknown, unserved, newer = (svc(broker).get_job(job_id) for job_id in job_ids)
    assert unknown is not None
    assert unknown.state is S.DISCARDED
    assert "unknown kind" in unknown.errors[0].message
    assert unserved is not None
    assert unserved.state is S.DISCARDED
    assert "queue_name" in unserved.errors[0].message
    assert newer is not None
    assert newer.state is S.AVAILABLE
    assert newer.args["new_field"] == [1]
    assert rows(POSTGRES_URL, outbox) == []


def test_the_testing_relay_moves_everything(
    outbox: str, epq_broker: dramatiq.Broker, epq_worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # what an application's own test does: commit, relay, drain (the worker's relay may be first)
    received = epq_handlers.record("index_endpoint")
    ids = _commit(epq_broker, 3)
    relay(epq_broker)
    drain(epq_broker, epq_worker)
    assert len(received) == 3
    assert {svc(epq_broker).get_job(i).state for i in ids} == {S.COMPLETED}  # type: ignore[union-attr]


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_input_names_the_field_and_writes_nothing(outbox: str, epq_broker: dramatiq.Broker) -> None:
    service = svc(epq_broker)
    with psycopg.connect(POSTGRES_URL) as connection:
        with pytest.raises(epq.InvalidRequest, match="priority"):
            service.enqueue_index_endpoint(
                {**index_request(1).model_dump(mode="json"), "priority": 5}, tx=connection
            )
        with pytest.raises(epq.InvalidRequest, match=r"\[1\]\.endpoint_id"):
            service.enqueue_many([index_request(1), ("index_endpoint", {"source": "API"})], tx=connection)
        with pytest.raises(epq.InvalidRequest, match="time_limit"):
            epq.actors.index_endpoint.send_with_options(
                kwargs=index_request(1).model_dump(mode="json"), tx=connection, time_limit=5
            )
        connection.commit()
    with pytest.raises(epq.InvalidRequest, match=r"tx.*not str"):
        service.enqueue_index_endpoint(index_request(1), tx="postgresql://")
    with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
        with pytest.raises(epq.InvalidRequest, match="autocommit"):
            service.enqueue_index_endpoint(index_request(1), tx=connection)
        with connection.transaction():  # (a transaction block on an autocommit connection is one)
            service.enqueue_index_endpoint(index_request(2), tx=connection)
    assert len(rows(POSTGRES_URL, outbox)) == 1


def test_a_missing_table_says_how_to_make_it(outbox: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPQ_OUTBOX_TABLE", outbox + "_missing")
    reset_settings()
    broker = install("stub://")  # (the table is the broker's, from the settings it was set up with)
    with (
        psycopg.connect(POSTGRES_URL) as connection,
        pytest.raises(epq.ConfigurationError, match="epq outbox migrate"),
    ):
        svc(broker).enqueue_index_endpoint(index_request(1), tx=connection)


# ---- faults -------------------------------------------------------------------------------------


def test_a_relay_waits_out_a_state_store_failure_and_a_lost_database_connection(
    outbox: str, epq_broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    stores = backend(epq_broker)
    name = f"epq-test-{uuid.uuid4().hex[:8]}"  # (its connection, told from any other)
    relayer = Relay(epq_broker, f"{POSTGRES_URL}?application_name={name}", outbox, poll_interval_ms=100)
    stop = threading.Event()
    thread = threading.Thread(target=relayer.run, args=(stop,))
    # Given a state store that fails for a while
    failing = threading.Event()
    failing.set()
    create_relayed = stores.records.create_relayed

    def flaky(jobs: Any) -> Any:
        if failing.is_set():
            raise redis.ConnectionError("the state store is down")
        return create_relayed(jobs)

    monkeypatch.setattr(stores.records, "create_relayed", flaky)
    thread.start()
    try:
        (first,) = _commit(epq_broker, 1)
        time.sleep(0.5)
        # Then the row waits (its batch rolled back), and goes once the store is back
        assert [row[0] for row in rows(POSTGRES_URL, outbox)] == [first]
        failing.clear()
        assert wait_for(lambda: rows(POSTGRES_URL, outbox) == [], timeout=10)
        # And when the relay's database connection is cut, it connects again and goes on
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            cut = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (name,)
            ).fetchall()
        assert cut == [(True,)]
        (second,) = _commit(epq_broker, 1, start=1)
        assert wait_for(lambda: rows(POSTGRES_URL, outbox) == [], timeout=10)
    finally:
        stop.set()
        thread.join(10)
    assert {svc(epq_broker).get_job(i).state for i in (first, second)} == {S.AVAILABLE}  # type: ignore[union-attr]


@pytest.fixture
def replace_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """``index_endpoint`` in uniqueness mode replace by its setting (before the broker)."""
    monkeypatch.setenv("EPQ_INDEX_UNIQUE_MODE", "replace")
    reset_settings()


def test_a_replacing_uniqueness_mode_is_refused_with_tx_and_nothing_is_written(
    outbox: str, replace_index: None, broker: dramatiq.Broker, app: AppDb
) -> None:
    # Given a transaction, and requests asking for a uniqueness mode that replaces
    with app.transaction() as tx:
        endpoint_id = tx.create_endpoint()
        request = {"endpoint_id": endpoint_id, "source": "API", "unique_mode": "replace"}
        # Then each is refused, naming the field, and nothing is written
        with pytest.raises(epq.InvalidRequest, match="unique_mode") as one:
            svc(broker).enqueue_index_endpoint(request, tx=tx.tx)
        with pytest.raises(epq.InvalidRequest, match=r"\[1\]\.unique_mode") as many:
            svc(broker).enqueue_many(
                [("index_endpoint", {**request, "unique_mode": "keep_first"}), ("index_endpoint", request)],
                tx=tx.tx,
            )
        tx.commit()
    assert "not available with tx=" in str(one.value)
    assert "[0]" not in str(many.value)
    assert rows(POSTGRES_URL, outbox) == []
    # while the kind's own mode does not apply with tx=: its first job is kept
    with app.transaction() as tx:
        plain = {"endpoint_id": tx.create_endpoint(), "source": "API"}
        first = svc(broker).enqueue_index_endpoint(plain, tx=tx.tx)
        again = svc(broker).enqueue_index_endpoint({**plain, "reason": "again"}, tx=tx.tx)
        tx.commit()
    assert not first.unique_skipped_as_duplicate
    assert again.unique_skipped_as_duplicate
    assert again.job.id == first.job.id
