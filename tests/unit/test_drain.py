"""``epq.testing.drain`` does not return while a schedule promoter is publishing what it claimed:
a message it publishes after the queues were joined, and lets go of before drain looks at the
schedule again, still runs before drain returns."""

from __future__ import annotations

from typing import Any

import dramatiq
import pytest

import epq
from epq.testing import backend, drain
from tests.support.helpers import ENDPOINT


def test_drain_waits_for_a_message_a_promoter_publishes_while_the_queues_are_joined(
    epq_broker: dramatiq.Broker,
    epq_worker: dramatiq.Worker,
    epq_handlers: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ran = epq_handlers.record("register_job")
    store = backend(epq_broker).state
    promoter = {"claimed": 1, "published": False}  # a promoter holds a claim as drain begins
    monkeypatch.setattr(store, "schedule_claimed", lambda: promoter["claimed"])
    join = epq_worker.join

    def join_then_promoter_finishes() -> None:
        join()
        if not promoter["published"]:  # after the queues were joined: it publishes, lets go
            promoter["published"] = True
            epq.QueueService(epq_broker).enqueue_register_job(
                {"endpoint_id": ENDPOINT, "job_id": "late", "job_metadata": {}}
            )
            promoter["claimed"] = 0

    monkeypatch.setattr(epq_worker, "join", join_then_promoter_finishes)
    drain(epq_broker, epq_worker)
    assert [r.job_id for r in ran] == ["late"]
