"""What a worker process knows of the paused queues (``epq.pausing.Pausing``): read at most every
interval, held while they cannot be read at all, kept as last read while the store is down."""

from __future__ import annotations

import time

import pytest
import redis

from epq.backends.memory import MemoryStateStore
from epq.pausing import Pausing


class Flaky(MemoryStateStore):
    """A state store that counts its reads of the paused queues and fails them while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.reads = 0

    def paused_queues(self) -> set[str]:
        self.reads += 1
        if self.down:
            raise redis.ConnectionError("Connection refused")
        return super().paused_queues()


def test_a_pause_is_seen_within_the_interval_and_read_at_most_once_per_interval() -> None:
    store = Flaky()
    pausing = Pausing(store, interval_ms=50)
    assert pausing.paused("default") is False
    store.pause_queue("default")
    assert pausing.paused("default") is False  # (read less than an interval ago)
    assert store.reads == 1
    time.sleep(0.06)
    assert pausing.paused("default") is True
    assert pausing.paused("events") is False
    assert store.reads == 2


def test_queues_are_held_until_the_paused_queues_could_be_read_once(caplog: pytest.LogCaptureFixture) -> None:
    # Given a state store that is down as the worker process starts
    store = Flaky()
    store.down = True
    pausing = Pausing(store, interval_ms=10)
    # Then no queue is fetched, and the process says why
    assert pausing.paused("default") is True
    assert pausing.held("events") is True
    assert any("no queue is fetched until they are read" in m for m in caplog.messages)
    # When it is back, the queues not paused are fetched
    store.down = False
    time.sleep(0.02)
    assert pausing.paused("default") is False


def test_the_paused_queues_last_read_hold_while_the_store_is_down() -> None:
    store = Flaky()
    store.pause_queue("default")
    pausing = Pausing(store, interval_ms=10)
    assert pausing.paused("default") is True
    store.down = True
    store.resume_queue("default")
    time.sleep(0.02)
    assert pausing.paused("default") is True
    assert pausing.paused("events") is False
