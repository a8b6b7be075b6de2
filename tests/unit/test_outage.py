"""The outage rule (``epq.outage``): a write waits while the state store is unreachable, and gives
up when the worker stops (what the worker then does with its message is in
``tests/contract/test_worker_outage.py``)."""

from __future__ import annotations

import threading

import pytest
import redis

import epq
from epq import outage


def test_until_written_waits_while_unreachable_then_writes() -> None:
    tries: list[int] = []

    def write() -> str:
        tries.append(1)
        if len(tries) < 4:
            raise redis.ConnectionError("Connection refused")
        return "written"

    outage.worker_booting()
    assert outage.until_written(write, "testing") == "written"
    assert len(tries) == 4


def test_until_written_raises_other_errors_at_once() -> None:
    tries: list[int] = []

    def write() -> None:
        tries.append(1)
        raise redis.ResponseError("WRONGTYPE")

    outage.worker_booting()
    with pytest.raises(redis.ResponseError):
        outage.until_written(write, "testing")
    assert len(tries) == 1


def test_until_written_gives_up_when_the_worker_stops() -> None:
    def write() -> None:
        raise redis.ConnectionError("Connection refused")

    outage.worker_booting()
    timer = threading.Timer(0.3, outage.worker_stopping)
    timer.start()
    try:
        with pytest.raises(epq.StateUnavailable, match="worker is stopping"):
            outage.until_written(write, "testing")
    finally:
        timer.cancel()
        outage.worker_booting()
