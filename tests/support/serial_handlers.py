"""Handlers for the serial-key end-to-end test: each run reports its start and its end on a list
in the results Redis (EPQ_TEST_RESULTS_URL, EPQ_TEST_RESULTS_KEY), and takes 150 ms between."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

import epq

_client = redis.Redis.from_url(os.environ["EPQ_TEST_RESULTS_URL"])
_key = os.environ["EPQ_TEST_RESULTS_KEY"]


def _event(what: str, request: Any) -> None:
    event = {"event": what, "endpoint": str(request.endpoint_id), "job": request.job_id, "pid": os.getpid()}
    _client.rpush(_key, json.dumps(event))


@epq.handler("register_job")
def register_job(request: Any) -> None:
    _event("start", request)
    time.sleep(0.15)
    _event("end", request)
