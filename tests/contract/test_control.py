"""The control plane on every broker: jobs listed by filter and page, deleted, retried by filter,
and a handler's output on its record."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import pytest

import epq
from epq.testing import HandlerRegistry, backend, drain
from tests.support.helpers import wait_for

S = epq.JobState
ENDPOINT_A = "00000000-0000-4000-8000-00000000000a"
ENDPOINT_B = "00000000-0000-4000-8000-00000000000b"


def svc(broker: dramatiq.Broker) -> epq.QueueService:
    return epq.QueueService(broker)


def register(n: int, endpoint: str = ENDPOINT_A, **options: Any) -> dict[str, Any]:
    """A register_job request of its own unique key (``n``)."""
    return {"endpoint_id": endpoint, "job_id": f"job-{n}", "job_metadata": {"n": n}, **options}


def index(endpoint: str, **options: Any) -> dict[str, Any]:
    return {"endpoint_id": endpoint, "source": "API", **options}


def every_page(service: epq.QueueService, **filters: Any) -> list[str]:
    """The ids of every job listed with ``filters``, page by page (pages of 2)."""
    ids: list[str] = []
    cursor = None
    while True:
        page = service.list_jobs(**filters, limit=2, cursor=cursor)
        ids += [job.id for job in page.jobs]
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


def in_order(records: list[epq.JobRecord], order: str) -> list[str]:
    """Ids in creation order (creation time, then id), newest or oldest first."""
    ranked = sorted(records, key=lambda r: (r.created_at, r.id), reverse=order == "newest")
    return [r.id for r in ranked]


@pytest.fixture
def mixed(broker: dramatiq.Broker) -> dict[str, list[epq.JobRecord]]:
    """Jobs of every filter's values: two kinds, two queues, three priorities, two endpoints,
    waiting and scheduled."""
    s = svc(broker)
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    groups: dict[str, list[epq.JobRecord]] = {"a": [], "b": [], "scheduled": []}
    for n in range(3):
        groups["a"].append(s.enqueue_register_job(register(n, priority=1)).job)
        groups["b"].append(s.enqueue_register_job(register(10 + n, ENDPOINT_B, queue_name="events")).job)
    groups["b"].append(s.enqueue_index_endpoint(index(ENDPOINT_B, priority=3)).job)
    groups["scheduled"].append(s.enqueue_register_job(register(20, run_at=later)).job)
    return groups


@pytest.mark.parametrize("order", ["newest", "oldest"])
def test_each_filter_lists_exactly_its_jobs_in_creation_order(
    broker: dramatiq.Broker, mixed: dict[str, list[epq.JobRecord]], order: str
) -> None:
    s = svc(broker)
    every = [*mixed["a"], *mixed["b"], *mixed["scheduled"]]

    def expect(pred: Any) -> list[str]:
        return in_order([r for r in every if pred(r)], order)

    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({}, expect(lambda r: True)),
        ({"state": "available"}, expect(lambda r: r.state is S.AVAILABLE)),
        ({"state": S.SCHEDULED}, expect(lambda r: r.state is S.SCHEDULED)),
        ({"kind": "index_endpoint"}, expect(lambda r: r.kind == "index_endpoint")),
        ({"kind": "register_job"}, expect(lambda r: r.kind == "register_job")),
        ({"queue": "events"}, expect(lambda r: r.queue == "events")),
        ({"priority": 1}, expect(lambda r: r.priority == 1)),
        ({"priority": 3}, expect(lambda r: r.priority == 3)),
        ({"endpoint_id": ENDPOINT_B}, expect(lambda r: r.args["endpoint_id"] == ENDPOINT_B)),
        ({"endpoint_id": uuid.UUID(ENDPOINT_A)}, expect(lambda r: r.args["endpoint_id"] == ENDPOINT_A)),
        (
            {"endpoint_id": ENDPOINT_A, "state": "available", "priority": 1},
            expect(
                lambda r: r.args["endpoint_id"] == ENDPOINT_A and r.state is S.AVAILABLE and r.priority == 1
            ),
        ),
        ({"queue": "events", "kind": "index_endpoint"}, []),
        ({"state": "completed"}, []),
        ({"kind": "register_source"}, []),
    ]
    for filters, expected in cases:
        assert expected or not filters.get("queue") or True
        listed = s.list_jobs(**filters, order=order, limit=100)
        assert [job.id for job in listed.jobs] == expected, filters
        assert listed.next_cursor is None, filters
        assert every_page(s, **filters, order=order) == expected, filters


def test_listed_jobs_are_whole_records(
    broker: dramatiq.Broker, mixed: dict[str, list[epq.JobRecord]]
) -> None:
    listed = svc(broker).list_jobs(kind="index_endpoint").jobs
    assert listed == [svc(broker).get_job(mixed["b"][-1].id)]
    assert listed[0].args["endpoint_id"] == ENDPOINT_B


@pytest.mark.parametrize("order", ["newest", "oldest"])
def test_pages_neither_repeat_nor_skip_jobs_while_jobs_are_added(broker: dramatiq.Broker, order: str) -> None:
    # Given 30 jobs, enqueued a few per millisecond (created at the same time, ordered by id)
    s = svc(broker)
    first = [r.job for r in s.enqueue_many([("register_job", register(n)) for n in range(30)])]
    # When they are read 7 at a time while 3 more jobs are enqueued before each page
    seen: list[str] = []
    added: list[str] = []
    cursor = None
    n = 100
    while True:
        page = s.list_jobs(limit=7, cursor=cursor, order=order)
        seen += [job.id for job in page.jobs]
        for _ in range(3):
            added.append(s.enqueue_register_job(register(n)).job.id)
            n += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    # Then no job is listed twice, and every job that was there at the start is listed in order
    assert len(seen) == len(set(seen))
    assert [i for i in seen if i not in added] == in_order(first, order)
    if order == "oldest":  # (jobs added behind the cursor come later in the listing)
        assert set(added) & set(seen)


def test_bad_filters_are_refused_naming_them(broker: dramatiq.Broker) -> None:
    s = svc(broker)
    for kwargs, name in [
        ({"state": "lost"}, "state"),
        ({"state": "pending"}, "state"),
        ({"priority": 5}, "priority"),
        ({"priority": True}, "priority"),
        ({"endpoint_id": "not-a-uuid"}, "endpoint_id"),
        ({"kind": ""}, "kind"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"order": "random"}, "order"),
        ({"cursor": "bm90IGEgY3Vyc29y"}, "cursor"),
        ({"cursor": "!!"}, "cursor"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}:"):
            s.list_jobs(**kwargs)


def test_a_cursor_of_the_other_order_is_refused(broker: dramatiq.Broker) -> None:
    s = svc(broker)
    s.enqueue_many([("register_job", register(n)) for n in range(3)])
    cursor = s.list_jobs(limit=1).next_cursor
    assert cursor is not None
    with pytest.raises(ValueError, match=r"^cursor: .*other order"):
        s.list_jobs(limit=1, cursor=cursor, order="oldest")


def test_states_follow_the_jobs(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    def handle(request: Any) -> None:
        if request.job_id == "job-1":
            raise epq.Discard("no")

    epq_handlers.register("register_job", handle)
    s = svc(broker)
    ok = s.enqueue_register_job(register(0)).job.id
    dead = s.enqueue_register_job(register(1)).job.id
    drain(broker, worker, fail_fast=False)
    assert [j.id for j in s.list_jobs(state="completed").jobs] == [ok]
    assert [j.id for j in s.list_jobs(state="discarded").jobs] == [dead]
    assert s.list_jobs(state="available").jobs == []
    assert s.list_jobs(state="running").jobs == []


# ---- delete -----------------------------------------------------------------------------------


def test_a_deleted_waiting_job_never_runs_its_key_is_free_and_nothing_else_changes(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # Given three waiting jobs (the worker paused)
    worker.pause()
    ran = epq_handlers.record("register_job")
    s = svc(broker)
    jobs = [s.enqueue_register_job(register(n)).job for n in range(3)]
    locks_before = backend(broker).state.unique_locks()
    # When the middle one is deleted
    deleted = s.delete_job(jobs[1].id)
    # Then its record is gone at once, from reads and listings, and its key is free
    assert (deleted.id, deleted.state) == (jobs[1].id, S.AVAILABLE)
    assert s.get_job(jobs[1].id) is None
    assert s.find_job_ids(jobs[1].id) == []
    assert sorted(j.id for j in s.list_jobs().jobs) == sorted(
        [jobs[0].id, jobs[2].id]
    )  # (same ms: either order)
    assert backend(broker).state.unique_locks() == {"register_job": locks_before["register_job"] - 1}
    again = s.enqueue_register_job(register(1))
    assert not again.unique_skipped_as_duplicate
    assert again.job.id != jobs[1].id
    # and the others are untouched
    assert [s.get_job(j.id) for j in (jobs[0], jobs[2])] == [jobs[0], jobs[2]]
    # When the worker runs
    worker.resume()
    drain(broker, worker)
    # Then the deleted job never ran: the two others and the new one did, once each
    assert sorted(r.job_id for r in ran) == ["job-0", "job-1", "job-2"]
    assert s.get_job(jobs[1].id) is None
    assert {s.get_job(i).state for i in (jobs[0].id, jobs[2].id, again.job.id)} == {S.COMPLETED}  # type: ignore[union-attr]


def test_a_deleted_scheduled_job_never_runs(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    ran = epq_handlers.record("register_job")
    s = svc(broker)
    soon = datetime.now(timezone.utc) + timedelta(seconds=1)
    doomed = s.enqueue_register_job(register(0, run_at=soon)).job
    kept = s.enqueue_register_job(register(1, run_at=soon)).job
    s.delete_job(doomed.id)
    assert s.get_job(doomed.id) is None
    time.sleep(1.2)
    drain(broker, worker)
    assert [r.job_id for r in ran] == ["job-1"]
    assert s.get_job(kept.id).state is S.COMPLETED  # type: ignore[union-attr]
    assert s.get_job(doomed.id) is None


def test_deleting_a_running_job_stops_it_and_nothing_of_it_is_written_again(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    started = threading.Event()
    ended: list[str] = []

    def handle(request: Any) -> None:
        started.set()
        try:
            for _ in range(200):  # (interruptible: Python code runs between the sleeps)
                time.sleep(0.05)
        except epq.JobCancelled:
            ended.append("cancelled")
            raise

    epq_handlers.register("register_job", handle)
    s = svc(broker)
    job = s.enqueue_register_job(register(0)).job
    assert started.wait(10)
    wait_for(lambda: s.get_job(job.id).state is S.RUNNING)  # type: ignore[union-attr]
    assert s.delete_job(job.id).state is S.RUNNING
    wait_for(lambda: ended == ["cancelled"], timeout=10)
    drain(broker, worker, fail_fast=False)
    assert s.get_job(job.id) is None
    assert s.list_jobs().jobs == []
    assert not s.enqueue_register_job(register(0)).unique_skipped_as_duplicate


def test_delete_of_an_unknown_job_raises(broker: dramatiq.Broker) -> None:
    with pytest.raises(epq.JobNotFound):
        svc(broker).delete_job("no-such-job")


def test_delete_by_filter_deletes_exactly_the_matching_jobs(
    broker: dramatiq.Broker, mixed: dict[str, list[epq.JobRecord]]
) -> None:
    s = svc(broker)
    others = [s.get_job(r.id) for r in (*mixed["a"], *mixed["scheduled"])]
    with pytest.raises(ValueError, match="all=True"):
        s.delete_jobs()
    assert s.delete_jobs(endpoint_id=ENDPOINT_B) == len(mixed["b"])
    assert {j.id for j in s.list_jobs().jobs} == {r.id for r in (*mixed["a"], *mixed["scheduled"])}
    assert [s.get_job(r.id) for r in (*mixed["a"], *mixed["scheduled"])] == others
    assert s.delete_jobs(all=True) == len(mixed["a"]) + 1
    assert s.list_jobs().jobs == []
    assert backend(broker).state.unique_locks() == {}


# ---- retry by filter ----------------------------------------------------------------------------


def test_retry_dead_by_filter_retries_exactly_the_matching_dead_jobs(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    failing = {"on": True}
    ran: list[str] = []

    def handle(request: Any) -> None:
        ran.append(request.job_id)
        if failing["on"]:
            raise epq.Discard("down")

    epq_handlers.register("register_job", handle)
    s = svc(broker)
    a = [s.enqueue_register_job(register(n)).job.id for n in range(2)]
    b = [s.enqueue_register_job(register(10 + n, ENDPOINT_B)).job.id for n in range(2)]
    drain(broker, worker, fail_fast=False)
    assert {j.id for j in s.list_jobs(state="discarded").jobs} == {*a, *b}
    failing["on"] = False
    ran.clear()
    worker.pause()  # (so that the records read just after the retry are still waiting)
    with pytest.raises(ValueError, match=r"^state:"):
        s.retry_dead_jobs(state="completed")
    retried = s.retry_dead_jobs(endpoint_id=ENDPOINT_A)
    assert {r.id for r in retried} == set(a)
    assert {r.state for r in retried} == {S.AVAILABLE}
    worker.resume()
    drain(broker, worker)
    assert sorted(ran) == ["job-0", "job-1"]
    assert {s.get_job(i).state for i in a} == {S.COMPLETED}  # type: ignore[union-attr]
    assert {s.get_job(i).state for i in b} == {S.DISCARDED}  # type: ignore[union-attr]


# ---- output -----------------------------------------------------------------------------------


def test_a_handlers_json_return_value_is_the_jobs_output(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    epq_handlers.register("register_job", lambda request: {"registered": request.job_id, "n": [1, 2.5, None]})
    epq_handlers.register("register_source", lambda request: None)
    s = svc(broker)
    job = s.enqueue_register_job(register(0)).job
    quiet = s.enqueue_register_source(
        {"endpoint_id": ENDPOINT_A, "source_id": "s", "source_metadata": {}}
    ).job
    assert job.output is None
    drain(broker, worker)
    assert s.get_job(job.id).output == {"registered": "job-0", "n": [1, 2.5, None]}  # type: ignore[union-attr]
    assert s.get_job(quiet.id).output is None  # type: ignore[union-attr]
    assert s.list_jobs(state="completed", kind="register_job").jobs[0].output == {
        "registered": "job-0",
        "n": [1, 2.5, None],
    }


def test_an_output_too_large_or_not_json_fails_the_job_naming_kind_and_limit(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    epq_handlers.register("register_job", lambda request: "x" * (64 * 1024))
    epq_handlers.register("register_source", lambda request: {"when": object()})
    s = svc(broker)
    big = s.enqueue_register_job(register(0)).job
    odd = s.enqueue_register_source({"endpoint_id": ENDPOINT_A, "source_id": "s", "source_metadata": {}}).job
    drain(broker, worker, fail_fast=False)
    big_record, odd_record = s.get_job(big.id), s.get_job(odd.id)
    assert big_record is not None
    assert odd_record is not None
    # dead at once (another attempt would return the same), the error says why
    assert (big_record.state, big_record.attempt, big_record.output) == (S.DISCARDED, 1, None)
    assert big_record.errors[-1].error_type == "InvalidOutput"
    assert "register_job" in big_record.errors[-1].message
    assert "65536 bytes" in big_record.errors[-1].message
    assert "EPQ_OUTPUT_MAX_BYTES" in big_record.errors[-1].message
    assert (odd_record.state, odd_record.attempt) == (S.DISCARDED, 1)
    assert odd_record.errors[-1].error_type == "InvalidOutput"
    assert "register_source" in odd_record.errors[-1].message
    assert "JSON" in odd_record.errors[-1].message
