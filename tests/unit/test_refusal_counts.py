"""Duplicates refused at enqueue are counted into the state store, so that a scrape of any process
shows every enqueuer's: written within ``FLUSH_S`` without being asked, at once by ``flush``,
and kept (not lost) while the store cannot be reached."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

from epq import metrics
from epq.backends.memory import MemoryStateStore
from tests.support.helpers import wait_for


class Blinking(MemoryStateStore):
    """A memory state store whose next ``failures`` writes of refusals fail as if unreachable."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def add_refused(self, counts: Mapping[str, int]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("state store unreachable")
        super().add_refused(counts)


def test_refusals_reach_the_store_within_the_flush_interval_without_a_flush() -> None:
    store = MemoryStateStore()
    metrics.duplicates_refused(store, "register_job")
    metrics.duplicates_refused(store, "register_job", 2)
    metrics.duplicates_refused(store, "index_endpoint")
    assert wait_for(lambda: store.refused() == {"register_job": 3, "index_endpoint": 1}, timeout=5)


def test_flush_writes_at_once_and_only_the_store_asked_for() -> None:
    one, other = MemoryStateStore(), MemoryStateStore()
    metrics.duplicates_refused(one, "register_job")
    metrics.duplicates_refused(other, "register_job", 4)
    metrics.flush_refusals(one)
    assert one.refused() == {"register_job": 1}
    assert other.refused() == {}  # (its timer writes it, or the flush below)
    metrics.flush()
    assert other.refused() == {"register_job": 4}


def test_refusals_counted_while_the_store_is_down_are_written_once_it_is_back() -> None:
    store = Blinking(failures=2)
    metrics.duplicates_refused(store, "register_job", 2)
    metrics.flush_refusals(store)  # fails: kept
    metrics.duplicates_refused(store, "register_job")
    metrics.flush_refusals(store)  # fails again: kept, with the newer refusal
    assert store.refused() == {}
    metrics.flush_refusals(store)
    assert store.refused() == {"register_job": 3}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_write_its_parents_refusals_again() -> None:
    store = MemoryStateStore()
    metrics.duplicates_refused(store, "register_job", 5)
    pid = os.fork()
    if pid == 0:  # the child: what it inherited is the parent's to write
        metrics.flush()
        os._exit(0 if store.refused() == {} else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    metrics.flush()
    assert store.refused() == {"register_job": 5}
