"""Handlers for the tests that pause a queue under worker processes: each job notes its start (job
id, queue, priority, pid, ``time.time()``) on ``<key>`` in the results Redis (EPQ_TEST_RESULTS_URL,
EPQ_TEST_RESULTS_KEY), then works EPQ_TEST_WORK_S seconds (0.05 by default)."""

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
_work_s = float(os.environ.get("EPQ_TEST_WORK_S", "0.05"))


def _run(request: Any) -> None:
    message = CurrentMessage.get_current_message()
    note = {
        "job_id": message.message_id,
        "queue": message.queue_name,
        "priority": message.options.get("epq_priority"),
        "pid": os.getpid(),
        "at": time.time(),
    }
    _client.rpush(_key, json.dumps(note))
    time.sleep(_work_s)


for _kind in KINDS:
    epq.handler(_kind)(_run)
