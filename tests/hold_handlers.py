"""Handlers for the crash tests: each job notes its start on ``<key>:started`` and, unless
EPQ_TEST_HOLD is set (then it hangs, as a job does in a worker about to be killed), its end on
``<key>`` in the results Redis (EPQ_TEST_RESULTS_URL, EPQ_TEST_RESULTS_KEY)."""

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


def _run(request: Any) -> None:
    message = CurrentMessage.get_current_message()
    note = json.dumps({"job_id": message.message_id, "pid": os.getpid(), "at": time.time()})
    _client.rpush(f"{_key}:started", note)
    if _hold:
        time.sleep(3600)
    _client.rpush(_key, note)


for _kind in KINDS:
    epq.handler(_kind)(_run)
