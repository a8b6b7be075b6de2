"""Handlers used by ``epq demo``: each reports what it received back to the demo process.

They push one JSON line per job onto a list in the broker's own Redis, which the demo reads.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

import epq
from epq.cli.demo import RESULTS_KEY
from epq.kinds import KINDS


def _report(request: Any) -> None:
    time.sleep(0.2)  # pretend to work, so that progress is visible
    message = CurrentMessage.get_current_message()
    broker = dramatiq.get_broker()
    line = {
        "kind": message.actor_name if message else "?",
        "job_id": message.message_id if message else "?",
        "queue": message.queue_name if message else "?",
        "pid": os.getpid(),
        "finished_at": time.time(),
        "request": request.model_dump(mode="json", exclude_none=True),
    }
    broker.client.rpush(RESULTS_KEY, json.dumps(line))  # type: ignore[attr-defined]


for _kind in KINDS:
    epq.handler(_kind)(_report)
