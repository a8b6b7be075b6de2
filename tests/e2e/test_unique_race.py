"""Uniqueness is atomic: 8 OS processes enqueue the same key at the same moment, 20 rounds."""

from __future__ import annotations

import multiprocessing
import uuid
from typing import Any

import dramatiq
import pytest

import epq
from epq.testing import install, reset
from tests.conftest import RABBITMQ_URL, REDIS_URL, STATE_URL
from tests.support.helpers import message_count

PROCESSES = 8
ROUNDS = 20

pytestmark = pytest.mark.slow


def _racer(broker_url: str, state_url: str | None, barrier: Any, endpoints: list[str], out: Any) -> None:
    install(broker_url, state_url=state_url)
    svc = epq.QueueService()
    results = []
    for round_no, endpoint in enumerate(endpoints):
        barrier.wait(timeout=60)
        result = svc.enqueue_index_endpoint({"endpoint_id": endpoint, "source": "API"})
        results.append((round_no, result.job.id, result.unique_skipped_as_duplicate))
    out.put(results)
    reset()


def _race(broker: dramatiq.Broker, broker_url: str, state_url: str | None) -> None:
    # Given 8 processes that meet at a barrier before each of 20 enqueues of one key per round
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    out = ctx.Queue()
    endpoints = [str(uuid.uuid4()) for _ in range(ROUNDS)]
    procs = [
        ctx.Process(target=_racer, args=(broker_url, state_url, barrier, endpoints, out))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    # Then each round enqueued exactly one job, and every loser was told the winner's id
    for round_no in range(ROUNDS):
        outcomes = [
            (job_id, skipped) for per_proc in results for r, job_id, skipped in per_proc if r == round_no
        ]
        assert len(outcomes) == PROCESSES
        winners = [job_id for job_id, skipped in outcomes if not skipped]
        assert len(winners) == 1, f"round {round_no}: {len(winners)} jobs enqueued"
        assert {job_id for job_id, _ in outcomes} == {winners[0]}
    assert message_count(broker, "default") == ROUNDS


@pytest.mark.redis
def test_race_on_redis(redis_broker: dramatiq.Broker) -> None:
    _race(redis_broker, REDIS_URL, None)


@pytest.mark.rabbitmq
def test_race_on_rabbitmq_with_redis_state(rabbitmq_broker: dramatiq.Broker) -> None:
    _race(rabbitmq_broker, RABBITMQ_URL, STATE_URL)
