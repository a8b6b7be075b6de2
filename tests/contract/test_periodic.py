"""Periodic jobs on every broker: each tick is enqueued once however many tickers try it (through
the insert path, with a record, for epq kinds; for an application's own actor too), a restarted
ticker goes on from the last tick noted, faults leave a tick to the next pass; on the stub, ticks
follow ``epq_clock``."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import dramatiq
import pytest

import epq
from epq import metrics
from epq.backends.memory import FakeClock
from epq.middleware.common import find_middleware
from epq.periodic_jobs import PeriodicJob, Tick, Ticking, Ticks, define, enqueue_tick, status
from epq.testing import HandlerRegistry, backend, drain, install
from tests.support.helpers import VALID, message_count, wait_for

Declare = Callable[..., PeriodicJob]
REGISTER = VALID["register_job"]


def run_tickers(broker: dramatiq.Broker, job: PeriodicJob, n: int) -> list[list[Tick]]:
    """``n`` tickers (as in ``n`` worker processes) make one pass each, at the same moment."""
    store = backend(broker).state
    barrier = threading.Barrier(n)
    out: list[list[Tick]] = [[] for _ in range(n)]

    def one(i: int) -> None:
        barrier.wait(timeout=10)
        out[i] = Ticks().run(broker, store, [job])[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return out


def seen_since(broker: dramatiq.Broker, job: PeriodicJob, seconds: float) -> int:
    """Make it as if a ticker first saw ``job`` (a job not declared: passed to the tickers)
    ``seconds`` ago: its ticks since are due."""
    store = backend(broker).state
    since = store.now_ms() - int(seconds * 1000)
    assert store.periodic_begin(job.name, since, 3_600_000) == since
    return since


# ---- once per tick ------------------------------------------------------------------------------


def test_each_tick_is_enqueued_once_however_many_tickers_try_it(broker: dramatiq.Broker) -> None:
    # Given a 1-second schedule whose last 5 ticks are due
    job = define("every-second", "register_job", every=1, request=REGISTER)
    seen_since(broker, job, 5.5)
    # When 4 tickers try them at the same moment
    passes = run_tickers(broker, job, 4)
    # Then each tick was enqueued by exactly one of them, and all of them agree on its job
    by_tick: dict[int, set[str]] = {}
    enqueued = Counter[int]()
    for ticks in passes:
        for tick in ticks:
            by_tick.setdefault(tick.tick_ms, set()).add(tick.job_id)
            enqueued[tick.tick_ms] += tick.enqueued
    assert 5 <= len(by_tick) <= 6
    assert set(enqueued.values()) == {1}
    assert all(len(ids) == 1 for ids in by_tick.values())
    ticks = sorted(by_tick)
    assert {b - a for a, b in itertools.pairwise(ticks)} == {1000}
    # and each is a job of the kind, with its record, waiting on its queue
    assert message_count(broker, "default") == len(ticks)
    svc = epq.QueueService(broker)
    for (job_id,) in by_tick.values():
        record = svc.get_job(job_id)
        assert record is not None
        assert (record.kind, record.args["job_id"]) == ("register_job", REGISTER["job_id"])
    # and the schedule's state notes the last one
    state = backend(broker).state.periodic_states([job.name])[0]
    assert (int(state["tick"]), state["job"]) == (ticks[-1], next(iter(by_tick[ticks[-1]])))
    # and the tickers refused were not counted as duplicates the application sent
    metrics.flush_refusals()
    assert backend(broker).state.refused() == {}


@pytest.mark.parametrize("options", [{}, {"max_attempts": 3}], ids=["plain", "recorded"])
def test_an_actor_of_the_applications_ticks_once_too(
    broker: dramatiq.Broker, options: dict[str, Any]
) -> None:
    # Given a maintenance task of the application's, a Dramatiq actor (with max_attempts, epq
    # keeps its jobs' records: its lock is taken with the record), ticking every second
    name = f"purge_{uuid.uuid4().hex[:8]}"
    purge = dramatiq.actor(
        lambda days: None, broker=broker, actor_name=name, queue_name="maintenance", **options
    )
    job = define("purge", purge, every=1, request={"days": 30})
    seen_since(broker, job, 3.5)
    # When 3 tickers try its due ticks
    passes = run_tickers(broker, job, 3)
    # Then each due tick is one message on its queue
    ticks = {tick.tick_ms for ticks in passes for tick in ticks}
    assert 3 <= len(ticks) <= 4
    assert sum(tick.enqueued for ticks in passes for tick in ticks) == len(ticks)
    assert message_count(broker, "maintenance") == len(ticks)
    recorded = [epq.QueueService(broker).get_job(t.job_id) for ticks in passes for t in ticks if t.enqueued]
    assert all((record is not None) == bool(options) for record in recorded)
    metrics.flush_refusals()
    assert backend(broker).state.refused() == {}


def test_a_restarted_ticker_goes_on_from_the_last_tick_noted(broker: dramatiq.Broker) -> None:
    job = define("every-second", "register_job", every=1, request=REGISTER)
    seen_since(broker, job, 2.5)
    first = Ticks().run(broker, backend(broker).state, [job])[0]
    assert first
    assert all(tick.enqueued for tick in first)
    # a ticker that starts now (a worker restarted) finds nothing more due before the next tick
    again = Ticks().run(broker, backend(broker).state, [job])[0]
    assert [tick for tick in again if tick.tick_ms <= first[-1].tick_ms] == []
    assert message_count(broker, "default") == len(first) + len(again)


def test_a_tick_enqueued_by_a_ticker_that_died_before_noting_it_is_not_enqueued_again(
    broker: dramatiq.Broker,
) -> None:
    # Given a tick enqueued by a ticker that was killed before it noted the tick
    job = define("every-minute", "register_job", every=60, request=REGISTER)
    store = backend(broker).state
    tick = job.latest_at_or_before(store.now_ms())
    assert tick is not None
    seen_since(broker, job, (store.now_ms() - tick) / 1000 + 1)
    job_id, enqueued = enqueue_tick(broker, store, job, tick)
    assert enqueued
    # When another ticker (or the restarted one) finds the tick due
    handled = Ticks().run(broker, store, [job])[0]
    # Then it is refused as the same tick: noted with the job that was enqueued, not enqueued again
    assert handled == [Tick(job.name, tick, job_id, enqueued=False)]
    assert store.periodic_states([job.name])[0]["job"] == job_id
    assert message_count(broker, "default") == 1


def test_after_an_hour_with_no_worker_the_last_minutes_ticks_are_enqueued_and_the_rest_dropped(
    broker: dramatiq.Broker, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a 10-second schedule whose last tick noted is an hour old (every worker was down)
    job = define("every-10s", "register_job", every=10, request=REGISTER)
    store = backend(broker).state
    hour_ago = job.latest_at_or_before(store.now_ms() - 3_600_000)
    assert hour_ago is not None
    store.periodic_mark(job.name, hour_ago, "before-the-outage", hour_ago, 7_200_000)
    # When a worker starts again
    before = store.now_ms()
    with caplog.at_level(logging.WARNING, "epq.periodic"):
        handled = Ticks().run(broker, store, [job])[0]
    # Then the ticks of the last minute are enqueued, late, in order, once; the older ones dropped
    assert len(handled) == 6
    assert all(tick.enqueued for tick in handled)
    assert {b.tick_ms - a.tick_ms for a, b in itertools.pairwise(handled)} == {10_000}
    assert before - 60_000 < handled[0].tick_ms
    assert message_count(broker, "default") == 6
    assert f"Periodic job every-10s: its ticks from {_utc(hour_ago + 10_000)}" in caplog.text


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def test_the_workers_own_tickers_enqueue_each_tick_once(
    broker: dramatiq.Broker, epq_handlers: HandlerRegistry, epq_periodic: Declare
) -> None:
    # Given two workers on the broker (each with its ticker), and a 1-second schedule
    received = epq_handlers.record("register_job")
    ticks: list[str] = []

    def note(request: Any) -> None:
        ticks.append(dramatiq.middleware.CurrentMessage.get_current_message().options["epq_periodic"])
        received.append(request)

    epq_handlers.register("register_job", note)
    workers = [dramatiq.Worker(broker, worker_timeout=50, worker_threads=2) for _ in range(2)]
    epq_periodic("every-second", "register_job", every=1, request=REGISTER)
    for worker in workers:
        worker.start()
    try:
        # When 4 s pass
        assert wait_for(lambda: len(ticks) >= 4, timeout=15)
    finally:
        for worker in workers:
            worker.stop()
    # Then each tick ran once, one second after the one before
    at = sorted(int(tag.rpartition("@")[2]) for tag in ticks)
    assert len(set(at)) == len(at)
    assert {b - a for a, b in itertools.pairwise(at)} == {1000}


# ---- faults -------------------------------------------------------------------------------------


def test_a_tick_whose_publish_failed_is_enqueued_at_the_next_pass(
    epq_broker: dramatiq.Broker, epq_clock: FakeClock, epq_periodic: Declare, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a tick due while the broker refuses to publish
    job = epq_periodic("every-minute", "register_job", every=60, request=REGISTER)
    epq_clock.advance(60)
    publish = epq_broker.enqueue_planned

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("the broker is away")

    epq_broker.enqueue_planned = refuse  # type: ignore[method-assign]
    ticks = Ticks()
    store = backend(epq_broker).state
    with caplog.at_level(logging.ERROR, "epq.periodic"):
        assert ticks.run(epq_broker, store, [job])[0] == []
        assert ticks.run(epq_broker, store, [job])[0] == []
    # Then it was said once, and nothing was noted or left locked
    said = [r.getMessage() for r in caplog.records if "every-minute" in r.getMessage()]
    assert len(said) == 1
    assert "the broker is away" in said[0]
    assert "tick" not in store.periodic_states([job.name])[0]
    # When the broker is back, the next pass enqueues it
    epq_broker.enqueue_planned = publish  # type: ignore[method-assign]
    (tick,) = ticks.run(epq_broker, store, [job])[0]
    assert tick.enqueued
    assert message_count(epq_broker, "default") == 1


def test_a_tick_whose_request_fails_its_checks_is_said_and_noted_without_a_job(
    epq_broker: dramatiq.Broker, epq_clock: FakeClock, epq_periodic: Declare, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a request function that makes a bad request for one tick
    bad = {"count": 1}

    def request(tick: Any) -> dict[str, Any]:
        if bad["count"]:
            bad["count"] -= 1
            return {**REGISTER, "endpoint_id": "not-a-uuid"}
        return REGISTER

    job = epq_periodic("every-minute", "register_job", every=60, request=request)
    store = backend(epq_broker).state
    epq_clock.advance(60)
    with caplog.at_level(logging.ERROR, "epq.periodic"):
        (skipped,) = Ticks().run(epq_broker, store, [job])[0]
    assert (skipped.job_id, skipped.enqueued) == ("", False)
    assert "endpoint_id" in caplog.text
    assert store.periodic_states([job.name])[0]["tick"] == str(skipped.tick_ms)
    # the next tick goes as usual
    epq_clock.advance(60)
    (tick,) = Ticks().run(epq_broker, store, [job])[0]
    assert tick.enqueued
    assert message_count(epq_broker, "default") == 1


def test_a_job_whose_kind_is_no_actor_is_not_run_and_said_once(
    epq_broker: dramatiq.Broker, epq_periodic: Declare, caplog: pytest.LogCaptureFixture
) -> None:
    epq_periodic("ghost", "no_such_actor", every=60)
    ticking = find_middleware(epq_broker, Ticking)
    assert ticking is not None
    with caplog.at_level(logging.ERROR, "epq.periodic"):
        assert ticking.usable(epq_broker) == []
        assert ticking.usable(epq_broker) == []
    assert caplog.text.count("Periodic job ghost is not run: kind: no actor 'no_such_actor'") == 1
    (row,) = status(epq_broker, ticking)
    assert "no_such_actor" in (row.problem or "")


# ---- the stub follows epq_clock -----------------------------------------------------------------


def test_on_the_stub_ticks_follow_the_fake_clock_without_sleeping(
    epq_broker: dramatiq.Broker,
    epq_worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
    epq_clock: FakeClock,
    epq_periodic: Declare,
) -> None:
    received = epq_handlers.record("index_endpoint")
    epq_periodic("reindex", "index_endpoint", every=30 * 60, request={**VALID["index_endpoint"]})
    started = time.monotonic()
    drain(epq_broker, epq_worker)
    assert received == []  # a new schedule starts with its next tick
    for n in range(1, 11):  # ten half-hours
        epq_clock.advance(30 * 60)
        drain(epq_broker, epq_worker)
        assert len(received) == n
    assert time.monotonic() - started < 10  # (five hours of ticks, in seconds)


def test_on_the_stub_ticks_missed_while_no_worker_ran_follow_the_catch_up_rule(
    epq_broker: dramatiq.Broker,
    epq_worker: dramatiq.Worker,
    epq_handlers: HandlerRegistry,
    epq_clock: FakeClock,
    epq_periodic: Declare,
    caplog: pytest.LogCaptureFixture,
) -> None:
    received = epq_handlers.record("register_job")
    epq_clock.advance(10 - epq_clock() % 10 + 0.5)  # (half a second after a tick: 4 ticks in 45 s)
    epq_periodic("every-10s", "register_job", every=10, request=REGISTER)
    # ticks missed by less than a minute all run when a worker is back, late
    epq_clock.advance(45)
    drain(epq_broker, epq_worker)
    assert len(received) == 4
    # of an hour without a worker, the last minute's ticks run, the others are said to be dropped
    with caplog.at_level(logging.WARNING, "epq.periodic"):
        epq_clock.advance(3600)
        drain(epq_broker, epq_worker)
    assert len(received) == 4 + 6
    assert "were missed while no worker ran, and are dropped" in caplog.text


def test_a_job_in_the_settings_takes_the_place_of_one_declared_in_code_under_its_name(
    monkeypatch: pytest.MonkeyPatch, epq_periodic: Declare
) -> None:
    value = {"reindex": {"kind": "register_job", "every": 120, "request": REGISTER}}
    monkeypatch.setenv("EPQ_PERIODIC", json.dumps(value))
    epq_periodic("reindex", "register_job", every=60, request=REGISTER)
    epq_periodic("other", "register_job", every=60, request=REGISTER)
    broker = install("stub://")
    ticking = find_middleware(broker, Ticking)
    assert ticking is not None
    assert [(job.name, job.every_ms) for job in ticking.jobs()] == [("other", 60_000), ("reindex", 120_000)]
