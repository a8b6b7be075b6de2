"""Uniqueness windows, on every broker.

The stub moves its fake clock. Real brokers use 60 s windows, far longer than any stall of a
loaded machine, and time passes for the locks by moving them closer to their expiry (PEXPIRE in
the state Redis, which then expires them itself): no test waits for a real-time window.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import dramatiq
import pika
import pytest
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import SkipMessage

import epq
from epq.backends.base import KEY_PREFIX
from epq.backends.redis.connections import ScriptStream
from epq.middleware.uniqueness import Uniqueness
from epq.settings import reset_settings
from epq.testing import HandlerRegistry, backend, drain
from tests.support.helpers import VALID, actor, message_count, total_waiting, wait_for

REAL_WINDOW_S = 60.0


@pytest.fixture(autouse=True)
def _short_windows_on_real_brokers(
    _clean_epq_env: None, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if getattr(request.node, "callspec", None) and request.node.callspec.params.get("broker") != "stub":
        monkeypatch.setenv("EPQ_INDEX_UNIQUE_FOR", str(REAL_WINDOW_S))
        monkeypatch.setenv("EPQ_REGISTER_UNIQUE_FOR", str(REAL_WINDOW_S))
        reset_settings()


@dataclass
class Timeline:
    """How long a kind's window is here, and how to let time pass."""

    windows_s: dict[str, float]
    advance: Callable[[float], None]
    fake: bool
    now: Callable[[], float]  # seconds since the epoch, as the state store sees it

    def window(self, kind: str) -> float:
        return self.windows_s[kind]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
        """Wait in real time; a fake clock also moves 10 ms a poll, so short backoffs come due."""
        if not self.fake:
            return wait_for(predicate, timeout=timeout)

        def tick_then_check() -> bool:
            self.advance(0.01)
            return predicate()

        return wait_for(tick_then_check, timeout=timeout)


@pytest.fixture
def timeline(broker: dramatiq.Broker, request: pytest.FixtureRequest) -> Timeline:
    if isinstance(broker, StubBroker):
        clock = request.getfixturevalue("epq_clock")
        windows = {k: 300.0 for k in VALID} | {"index_endpoint": 900.0}
        return Timeline(windows, clock.advance, fake=True, now=clock)
    return Timeline(dict.fromkeys(VALID, REAL_WINDOW_S), age_locks, fake=False, now=time.time)


def age_locks(seconds: float) -> None:
    """Let ``seconds`` pass for the uniqueness locks in the state Redis: shorten each one's TTL."""
    client = backend().state.client  # type: ignore[attr-defined]
    shift_ms = round(seconds * 1000)
    for key in client.scan_iter(match=f"{KEY_PREFIX}unique:*", count=1000):
        ttl_ms = client.pttl(key)
        if ttl_ms <= 0:
            continue
        if ttl_ms <= shift_ms:
            client.delete(key)
        else:
            client.pexpire(key, ttl_ms - shift_ms)


def lock_key(kind: str, fields: dict[str, Any]) -> str:
    a = actor(kind)
    payload = a.kind.model.model_validate(fields).model_dump(mode="json")
    return Uniqueness.key_for(kind, a.options["unique_by"], payload)


def lock_ttl_ms(key: str) -> int | None:
    state = backend().state
    if isinstance(state, epq.backends.memory.MemoryStateStore):
        return state.ttl_ms(key)
    ttl = state.client.pttl(key)  # type: ignore[attr-defined]
    return None if ttl < 0 else int(ttl)


@pytest.mark.parametrize("kind", list(VALID))
def test_a_second_enqueue_inside_the_window_enqueues_nothing(
    broker: dramatiq.Broker, timeline: Timeline, kind: str
) -> None:
    svc = epq.QueueService(broker)
    first = svc.enqueue(kind, VALID[kind])

    # the facade reports the holder; send() raises DuplicateJob naming it
    again = svc.enqueue(kind, VALID[kind])
    with pytest.raises(epq.DuplicateJob) as caught:
        actor(kind).send(**VALID[kind])

    assert first.unique_skipped_as_duplicate is False
    assert again.unique_skipped_as_duplicate is True
    assert again.job.id == first.job.id == caught.value.existing_job_id
    assert (again.job.kind, again.job.queue, again.job.priority) == (kind, "default", 2)
    assert again.job.created_at == first.job.created_at
    assert total_waiting(broker) == 1


@pytest.mark.parametrize("kind", list(VALID))
def test_the_window_ends(broker: dramatiq.Broker, timeline: Timeline, kind: str) -> None:
    svc = epq.QueueService(broker)
    first = svc.enqueue(kind, VALID[kind])
    timeline.advance(timeline.window(kind) * 0.5)
    assert svc.enqueue(kind, VALID[kind]).unique_skipped_as_duplicate is True

    timeline.advance(timeline.window(kind) * 0.5 + 0.1)
    later = svc.enqueue(kind, VALID[kind])

    assert later.unique_skipped_as_duplicate is False
    assert later.job.id != first.job.id
    assert total_waiting(broker) == 2


def test_index_is_unique_by_endpoint_and_source_only(broker: dramatiq.Broker, timeline: Timeline) -> None:
    svc = epq.QueueService(broker)
    base = VALID["index_endpoint"]
    first = svc.enqueue_index_endpoint(base)

    # other reason, data, queue, priority: the same key
    same_key = svc.enqueue_index_endpoint(
        {**base, "reason": "other", "source_data": {"x": 1}, "queue_name": "events", "priority": 1}
    )
    other_source = svc.enqueue_index_endpoint({**base, "source": "HOOK"})
    other_endpoint = svc.enqueue_index_endpoint(
        {**base, "endpoint_id": "0d0f7a52-8a8e-4b8e-9b1f-3c7f2f4d9a10"}
    )

    assert same_key.unique_skipped_as_duplicate
    assert same_key.job.id == first.job.id
    assert not other_source.unique_skipped_as_duplicate
    assert not other_endpoint.unique_skipped_as_duplicate
    assert total_waiting(broker) == 3


@pytest.mark.parametrize(
    ("kind", "id_field", "payload_field"),
    [
        ("register_job", "job_id", "job_metadata"),
        ("register_source", "source_id", "source_metadata"),
        ("register_dynamic_trigger", "trigger_id", "trigger_metadata"),
        ("register_dynamic_schedule", "schedule_id", "schedule_metadata"),
    ],
)
def test_a_changed_registration_payload_is_a_new_job(
    broker: dramatiq.Broker, timeline: Timeline, kind: str, id_field: str, payload_field: str
) -> None:
    svc = epq.QueueService(broker)
    base = {**VALID[kind], payload_field: {"version": "1", "steps": [1, 2]}}
    first = svc.enqueue(kind, base)

    reordered = svc.enqueue(kind, {**base, payload_field: {"steps": [1, 2], "version": "1"}})
    changed = svc.enqueue(kind, {**base, payload_field: {"version": "2", "steps": [1, 2]}})
    other_item = svc.enqueue(kind, {**base, id_field: "another"})

    assert reordered.unique_skipped_as_duplicate
    assert reordered.job.id == first.job.id
    assert not changed.unique_skipped_as_duplicate
    assert not other_item.unique_skipped_as_duplicate
    assert total_waiting(broker) == 3


def test_kinds_do_not_share_keys(broker: dramatiq.Broker, timeline: Timeline) -> None:
    svc = epq.QueueService(broker)
    shared = {"endpoint_id": VALID["register_job"]["endpoint_id"]}
    results = [
        svc.enqueue_register_job({**shared, "job_id": "x", "job_metadata": {}}),
        svc.enqueue_register_source({**shared, "source_id": "x", "source_metadata": {}}),
        svc.enqueue_register_dynamic_trigger({**shared, "trigger_id": "x", "trigger_metadata": {}}),
        svc.enqueue_register_dynamic_schedule({**shared, "schedule_id": "x", "schedule_metadata": {}}),
    ]
    assert not any(r.unique_skipped_as_duplicate for r in results)


def test_the_lock_never_outlives_its_window(broker: dramatiq.Broker, timeline: Timeline) -> None:
    epq.QueueService(broker).enqueue_register_job(VALID["register_job"])
    ttl = lock_ttl_ms(lock_key("register_job", VALID["register_job"]))
    assert ttl is not None
    assert 0 < ttl <= timeline.window("register_job") * 1000


def test_a_delayed_job_holds_its_key_until_window_after_its_run_time(
    broker: dramatiq.Broker, timeline: Timeline
) -> None:
    kind = "register_dynamic_schedule"
    window = timeline.window(kind)
    delay = 2 * window
    run_at = datetime.fromtimestamp(timeline.now(), timezone.utc) + timedelta(seconds=delay)
    svc = epq.QueueService(broker)
    first = svc.enqueue(kind, {**VALID[kind], "run_at": run_at})
    ttl = lock_ttl_ms(lock_key(kind, VALID[kind]))
    assert ttl is not None
    # generous below (a loaded machine may pause between now() and the read), exact above
    assert (delay + window) * 1000 - 5000 < ttl <= (delay + window) * 1000 + 2  # ms rounding up of run_at

    timeline.advance(window * 1.5)  # past a plain window, before the run time
    assert svc.enqueue(kind, VALID[kind]).job.id == first.job.id


def test_completed_job_keeps_its_key_until_the_window_ends(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry, timeline: Timeline
) -> None:
    received = epq_handlers.record("index_endpoint")
    svc = epq.QueueService(broker)
    first = svc.enqueue_index_endpoint(VALID["index_endpoint"])
    drain(broker, worker)
    assert len(received) == 1

    assert svc.enqueue_index_endpoint(VALID["index_endpoint"]).job.id == first.job.id
    timeline.advance(timeline.window("index_endpoint") + 0.1)
    assert svc.enqueue_index_endpoint(VALID["index_endpoint"]).unique_skipped_as_duplicate is False


def test_dead_lettered_index_job_frees_its_key_at_once(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry, timeline: Timeline
) -> None:
    calls: list[int] = []

    def always_fails(request: Any) -> None:
        calls.append(1)
        raise RuntimeError("down")

    epq_handlers.register("index_endpoint", always_fails)
    # a window far longer than the test, so only the release can free the key
    first = epq.actors.index_endpoint.send_with_options(
        kwargs=VALID["index_endpoint"], backoff_ms=[5], unique_for=600_000
    )
    key = lock_key("index_endpoint", VALID["index_endpoint"])

    assert timeline.wait_for(lambda: message_count(broker, "default.XQ") == 1)
    assert len(calls) == 7  # every attempt passed through its own lock
    assert wait_for(lambda: lock_ttl_ms(key) is None)
    again = epq.QueueService(broker).enqueue_index_endpoint(VALID["index_endpoint"])
    assert again.unique_skipped_as_duplicate is False
    assert again.job.id != first.message_id


def test_retries_pass_through_their_own_lock(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry, timeline: Timeline
) -> None:
    calls: list[int] = []

    def flaky(request: Any) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("not yet")

    epq_handlers.register("register_job", flaky)
    first = epq.actors.register_job.send_with_options(kwargs=VALID["register_job"], backoff_ms=[5])

    assert timeline.wait_for(lambda: len(calls) == 3)
    drain(broker, worker)
    assert message_count(broker, "default.XQ") == 0
    # success: the key is still held by the first job
    with pytest.raises(epq.DuplicateJob) as caught:
        epq.actors.register_job.send(**VALID["register_job"])
    assert caught.value.existing_job_id == first.message_id


def test_a_retry_is_never_dropped_even_when_a_newer_job_holds_the_key(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry, timeline: Timeline
) -> None:
    # Given a job whose first attempt fails and whose retry is due after its window has ended
    calls: list[str] = []

    def first_attempt_fails(request: Any) -> None:
        message = dramatiq.middleware.CurrentMessage.get_current_message()
        calls.append(message.message_id)
        if calls.count(message.message_id) == 1 and len(calls) == 1:
            raise RuntimeError("first attempt fails")

    epq_handlers.register("register_job", first_attempt_fails)
    first = epq.actors.register_job.send_with_options(kwargs=VALID["register_job"], backoff_ms=[1500])
    assert wait_for(lambda: len(calls) == 1)
    # When the window passes and a new job takes the key before the retry is due
    timeline.advance(timeline.window("register_job") + 0.1)
    newer = epq.QueueService(broker).enqueue_register_job(VALID["register_job"])
    assert newer.unique_skipped_as_duplicate is False
    # Then both the retry and the new job run
    assert timeline.wait_for(lambda: len(calls) == 3)
    assert sorted(calls) == sorted([first.message_id, first.message_id, newer.job.id])


def test_a_delayed_re_enqueue_passes_through_its_own_lock(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry
) -> None:
    # The promoter moves a due delayed message to its queue with another enqueue of the same id.
    received = epq_handlers.record("register_source")
    epq.actors.register_source.send_with_options(kwargs=VALID["register_source"], delay=200)
    assert wait_for(lambda: len(received) == 1, timeout=10)
    drain(broker, worker)
    assert message_count(broker, "default.XQ") == 0


def test_a_skipped_job_frees_its_key(
    broker: dramatiq.Broker, worker: dramatiq.Worker, epq_handlers: HandlerRegistry, timeline: Timeline
) -> None:
    class SkipAll(dramatiq.Middleware):
        def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
            raise SkipMessage()

    received = epq_handlers.record("register_job")
    broker.add_middleware(SkipAll())
    worker.pause()  # the worker picked its middleware up at start; restart it with SkipAll
    worker.stop()
    skipping = dramatiq.Worker(broker, worker_timeout=50, worker_threads=1)
    skipping.start()
    try:
        epq.actors.register_job.send(**VALID["register_job"])
        key = lock_key("register_job", VALID["register_job"])
        assert wait_for(lambda: lock_ttl_ms(key) is None, timeout=10)
    finally:
        skipping.stop()
    assert received == []


@pytest.fixture
def broken_publish(broker: dramatiq.Broker, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make the next publishes fail inside the broker, after the middleware has run."""
    if isinstance(broker, StubBroker):

        def fail_put(*args: Any, **kwargs: Any) -> None:
            raise OSError("simulated publish failure")

        monkeypatch.setattr(broker.queues["default"], "put", fail_put)
    elif isinstance(broker, RedisBroker):

        def fail_enqueue(*args: Any, **kwargs: Any) -> None:
            raise redis.ConnectionError("simulated publish failure")

        monkeypatch.setitem(broker._lua, "lane_enqueue", fail_enqueue)  # type: ignore[attr-defined]
        monkeypatch.setattr(ScriptStream, "_send", fail_enqueue)  # lock + record + message
    else:
        assert isinstance(broker, RabbitmqBroker)

        def fail_publish(*args: Any, **kwargs: Any) -> None:
            raise pika.exceptions.UnroutableError([])

        monkeypatch.setattr(pika.adapters.blocking_connection.BlockingChannel, "basic_publish", fail_publish)
    yield
    monkeypatch.undo()


def test_a_failed_publish_releases_the_lock(
    broker: dramatiq.Broker, timeline: Timeline, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue("broken_publish")
    with pytest.raises(epq.BrokerUnavailable):
        epq.QueueService(broker).enqueue_register_job(VALID["register_job"])
    assert lock_ttl_ms(lock_key("register_job", VALID["register_job"])) is None

    # once the broker is back, the same job enqueues at once
    request.getfixturevalue("monkeypatch").undo()
    again = epq.QueueService(broker).enqueue_register_job(VALID["register_job"])
    assert again.unique_skipped_as_duplicate is False
    assert total_waiting(broker) == 1
