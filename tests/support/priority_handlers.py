"""Handlers for the priority tests' worker processes: report the start of each job, then work
10 ms. The results list is in start order (Redis serializes the pushes)."""

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


def _start_then_work(request: Any) -> None:
    message = CurrentMessage.get_current_message()
    _client.rpush(
        _key,
        json.dumps(
            {
                "job_id": message.message_id,
                "priority": message.options.get("epq_priority"),
                "pid": os.getpid(),
            }
        ),
    )
    time.sleep(0.01)


for _kind in KINDS:
    epq.handler(_kind)(_start_then_work)
