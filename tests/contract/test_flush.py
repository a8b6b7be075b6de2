"""``broker.flush(queue)`` and ``broker.flush_all()`` on every epq broker also drop the queue's
messages waiting in epq's schedule (delays, retries), as Dramatiq's drop its delay queues."""

from __future__ import annotations

import dramatiq

from epq.testing import backend


def _later_actors(broker: dramatiq.Broker) -> tuple[dramatiq.Actor, dramatiq.Actor]:  # type: ignore[type-arg]
    @dramatiq.actor(broker=broker, queue_name="default")
    def later_default() -> None:
        pass

    @dramatiq.actor(broker=broker, queue_name="events")
    def later_events() -> None:
        pass

    return later_default, later_events


def test_flush_drops_the_queues_delayed_messages_and_no_others(broker: dramatiq.Broker) -> None:
    later_default, later_events = _later_actors(broker)
    later_default.send_with_options(delay=60_000)
    later_default.send_with_options(delay=120_000)
    later_events.send_with_options(delay=60_000)
    store = backend(broker).state
    assert store.schedule_pending("default") == 2

    broker.flush("default")

    assert (store.schedule_pending("default"), store.schedule_pending("events")) == (0, 1)
    broker.join("default", timeout=5_000)  # returns: nothing of the queue is left to wait for


def test_flush_all_drops_every_delayed_message(broker: dramatiq.Broker) -> None:
    later_default, later_events = _later_actors(broker)
    later_default.send_with_options(delay=60_000)
    later_events.send_with_options(delay=60_000)

    broker.flush_all()

    assert backend(broker).state.schedule_size() == 0
    broker.join("events", timeout=5_000)
