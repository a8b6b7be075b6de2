"""Handlers for the crash and outage tests: each job notes its start on ``<key>:started``, works
EPQ_TEST_WORK_MS milliseconds, and notes its end on ``<key>`` in the results Redis
(EPQ_TEST_RESULTS_URL, EPQ_TEST_RESULTS_KEY); with EPQ_TEST_HOLD set it hangs instead, as a job
does in a worker about to be killed."""

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
_hold = bool(os.environ.get("EPQ_TEST_HOLD"))
_work_s = int(os.environ.get("EPQ_TEST_WORK_MS", "0")) / 1000


def _run(request: Any) -> None:
    message = CurrentMessage.get_current_message()
    note = json.dumps({"job_id": message.message_id, "pid": os.getpid(), "at": time.time()})
    _client.rpush(f"{_key}:started", note)
    if _hold:
        time.sleep(3600)
    time.sleep(_work_s)
    _client.rpush(_key, note)


for _kind in KINDS:
    epq.handler(_kind)(_run)
