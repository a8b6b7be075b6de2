"""Handlers for the end-to-end tests: each job reports itself on a list in the results Redis.

Loaded by worker subprocesses through EPQ_HANDLERS. EPQ_TEST_RESULTS_URL names the Redis,
EPQ_TEST_RESULTS_KEY the list.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from dramatiq.middleware import CurrentMessage

import epq
from epq.kinds import KINDS

_client = redis.Redis.from_url(os.environ["EPQ_TEST_RESULTS_URL"])
_key = os.environ["EPQ_TEST_RESULTS_KEY"]


def _report(request: Any) -> None:
    message = CurrentMessage.get_current_message()
    _client.rpush(
        _key,
        json.dumps(
            {
                "kind": message.actor_name,
                "job_id": message.message_id,
                "queue": message.queue_name,
                "pid": os.getpid(),
                "periodic": message.options.get("epq_periodic"),  # a periodic job's schedule@tick
                "request": request.model_dump(mode="json"),
            }
        ),
    )


for _kind in KINDS:
    epq.handler(_kind)(_report)
