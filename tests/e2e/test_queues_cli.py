"""``epq queues [pause|resume QUEUE]`` against a real Redis: the listing (table and JSON), and the
pause and resume it leaves in the state store for every worker to read."""

from __future__ import annotations

import json

import dramatiq
import pytest

import epq
from tests.conftest import REDIS_URL
from tests.e2e.test_cli import run_epq
from tests.support.helpers import keyed_request

pytestmark = pytest.mark.redis
ENV = {"EPQ_BROKER_URL": REDIS_URL}


def test_queues_lists_every_queue_with_its_state_depth_per_priority_and_lag(
    redis_broker: dramatiq.Broker,
) -> None:
    svc = epq.QueueService(redis_broker)
    for n, priority in enumerate((1, 3, 3)):
        svc.enqueue_register_job(keyed_request("register_job", n, priority))
    svc.pause_queue("events")

    out = run_epq("queues", env=ENV)

    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["queue", "state", "p1", "p2", "p3", "p4", "lag", "running", "scheduled"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"default", "events", "execution", "maintenance"}
    assert rows["default"][1:6] == ["active", "1", "0", "2", "0"]
    assert rows["default"][6].endswith("s")  # (the oldest waiting job's wait)
    assert rows["events"][1:7] == ["paused", "0", "0", "0", "0", "-"]

    data = json.loads(run_epq("queues", "--json", env=ENV).stdout)
    default = next(row for row in data if row["name"] == "default")
    assert default["paused"] is False
    assert default["depth"] == {"1": 1, "2": 0, "3": 2, "4": 0}
    assert default["lag_seconds"] > 0
    assert [row["name"] for row in data if row["paused"]] == ["events"]


def test_pause_and_resume_leave_the_pause_in_the_state_store(redis_broker: dramatiq.Broker) -> None:
    svc = epq.QueueService(redis_broker)

    paused = run_epq("queues", "pause", "default", env=ENV)
    assert paused.returncode == 0, paused.stderr
    assert "queue default paused" in paused.stdout
    assert [info.name for info in svc.queues() if info.paused] == ["default"]
    again = run_epq("queues", "--json", "pause", "default", env=ENV)
    assert json.loads(again.stdout) == {"queue": "default", "paused": True, "changed": False}

    resumed = run_epq("queues", "resume", "default", "--json", env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout) == {"queue": "default", "paused": False, "changed": True}
    assert [info.name for info in svc.queues() if info.paused] == []
    assert "was not paused" in run_epq("queues", "resume", "default", env=ENV).stdout


def test_an_unknown_queue_is_refused_naming_the_queue_and_nothing_is_paused(
    redis_broker: dramatiq.Broker,
) -> None:
    out = run_epq("queues", "pause", "defualt", env=ENV)
    assert out.returncode == 2
    assert "queue: unknown queue 'defualt'" in out.stderr
    assert [info.name for info in epq.QueueService(redis_broker).queues() if info.paused] == []
    assert run_epq("queues", "pause", env=ENV).returncode == 2  # (argparse: QUEUE is required)
