"""Handlers for the tests that cancel running jobs from another process: each job notes its start
on ``<key>:started``, then works in small steps (Python code between 20 ms sleeps, so an
interruption lands at once) for EPQ_TEST_WORK_S seconds (60 by default), and notes on ``<key>``
how and when it stopped (``time.time()``, in a ``finally`` block: the moment the interruption
reached it), in the results Redis (EPQ_TEST_RESULTS_URL, EPQ_TEST_RESULTS_KEY)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from dramatiq.middleware import CurrentMessage

import epq
from epq.kinds import KINDS

_client = redis.Redis.from_url(os.environ["EPQ_TEST_RESULTS_URL"])
_key = os.environ["EPQ_TEST_RESULTS_KEY"]
_work_s = float(os.environ.get("EPQ_TEST_WORK_S", "60"))


def _run(request: Any) -> None:
    job_id = CurrentMessage.get_current_message().message_id
    _client.rpush(f"{_key}:started", json.dumps({"job_id": job_id, "pid": os.getpid(), "at": time.time()}))
    how = "returned"
    try:
        deadline = time.monotonic() + _work_s
        while time.monotonic() < deadline:
            time.sleep(0.02)
    except BaseException as exc:
        how = type(exc).__name__
        raise
    finally:
        stopped = time.time()
        _client.rpush(_key, json.dumps({"job_id": job_id, "pid": os.getpid(), "how": how, "at": stopped}))


for _kind in KINDS:
    epq.handler(_kind)(_run)
