"""Handlers for the per-queue concurrency tests' worker processes: each job counts itself running
in its queue (``<key>:running:<queue>`` in the results Redis: EPQ_TEST_RESULTS_URL,
EPQ_TEST_RESULTS_KEY), notes on ``<key>:started`` how many jobs of its queue and of ``default``
were running as it started (Redis serializes the counts, so these are exact across threads and
processes), works EPQ_TEST_WORK_MS (``default=300,events=50``: milliseconds per queue), then
counts itself out and notes its end on ``<key>``."""

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
_work_s = {
    queue: int(ms) / 1000
    for queue, _, ms in (
        pair.partition("=") for pair in os.environ.get("EPQ_TEST_WORK_MS", "").split(",") if pair
    )
}


def _run(request: Any) -> None:
    message = CurrentMessage.get_current_message()
    queue = message.queue_name
    pipe = _client.pipeline(transaction=True)
    pipe.incr(f"{_key}:running:{queue}")
    pipe.get(f"{_key}:running:default")
    mine, default = pipe.execute()
    note = {
        "job_id": message.message_id,
        "queue": queue,
        "running": mine,
        "default_running": int(default or 0),
    }
    _client.rpush(f"{_key}:started", json.dumps(note))
    try:
        time.sleep(_work_s.get(queue, 0.0))
    finally:
        _client.decr(f"{_key}:running:{queue}")
    _client.rpush(_key, json.dumps(note))


for _kind in KINDS:
    epq.handler(_kind)(_run)
