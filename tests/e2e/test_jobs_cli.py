"""``epq jobs list|delete|retry`` and a job's output in ``epq jobs show``, against a real Redis."""

from __future__ import annotations

import json
from typing import Any

import dramatiq
import pytest

import epq
from epq.testing import HandlerRegistry, drain
from tests.e2e.test_cli import run_epq
from tests.e2e.test_ops_cli import ENV
from tests.e2e.test_ops_cli import jobs as jobs  # (the fixture: one job in each state)
from tests.support.helpers import VALID

pytestmark = pytest.mark.redis


def test_jobs_list_filters_pages_and_json(jobs: dict[str, str]) -> None:
    out = run_epq("jobs", "list", env=ENV)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:5] == ["id", "kind", "state", "queue", "priority"]
    assert [line.split()[0] for line in lines[2:]] == [
        jobs["waiting"],
        jobs["scheduled"],
        jobs["dies"],
        jobs["done"],
    ]  # newest first
    dead = run_epq("jobs", "list", "--state", "discarded", env=ENV)
    assert [line.split()[0] for line in dead.stdout.splitlines()[2:]] == [jobs["dies"]]
    assert "the endpoint answered 500" in dead.stdout

    first = json.loads(run_epq("jobs", "list", "--oldest", "--limit", "2", "--json", env=ENV).stdout)
    assert [j["id"] for j in first["jobs"]] == [jobs["done"], jobs["dies"]]
    rest = run_epq(
        "jobs", "list", "--oldest", "--limit", "2", "--json", "--cursor", first["next_cursor"], env=ENV
    )
    data = json.loads(rest.stdout)
    assert [j["id"] for j in data["jobs"]] == [jobs["scheduled"], jobs["waiting"]]
    assert data["next_cursor"] is None
    filtered = run_epq(
        "jobs",
        "list",
        "--json",
        "--priority",
        "1",
        "--endpoint-id",
        VALID["register_job"]["endpoint_id"],
        env=ENV,
    )
    assert [j["id"] for j in json.loads(filtered.stdout)["jobs"]] == [jobs["waiting"]]


def test_jobs_list_refuses_bad_filters_naming_the_option() -> None:
    for args, option in [
        (("--endpoint-id", "x"), "--endpoint-id"),  # (checked before connecting)
        (("--cursor", "nonsense"), "--cursor"),  # (checked by the listing)
    ]:
        out = run_epq("jobs", "list", *args, env=ENV)
        assert out.returncode == 2, (args, out.stderr)
        assert f"epq: error: {option}:" in out.stderr


def test_jobs_delete_needs_an_id_a_filter_or_all_and_asks_first(jobs: dict[str, str]) -> None:
    refused = run_epq("jobs", "delete", env=ENV)
    assert refused.returncode == 2
    assert "--all" in refused.stderr
    # without a terminal and without --yes: nothing deleted
    asked = run_epq("jobs", "delete", "--state", "scheduled", env=ENV)
    assert asked.returncode == 1
    assert "--yes" in asked.stderr
    svc = epq.QueueService()
    assert svc.get_job(jobs["scheduled"]) is not None

    deleted = run_epq("jobs", "delete", "--state", "scheduled", "--yes", "--json", env=ENV)
    assert json.loads(deleted.stdout) == {"deleted": 1}
    one = run_epq("jobs", "delete", jobs["waiting"], env=ENV)
    assert one.returncode == 0, one.stderr
    assert "deleted (was available)" in one.stdout
    left = json.loads(run_epq("jobs", "list", "--json", env=ENV).stdout)["jobs"]
    assert {j["id"] for j in left} == {jobs["done"], jobs["dies"]}


def test_jobs_retry_by_filter(jobs: dict[str, str]) -> None:
    out = run_epq("jobs", "retry", "--kind", "register_job", env=ENV)
    assert out.returncode == 0, out.stderr
    assert f"{jobs['dies']}: available" in out.stdout
    assert "retried 1 job(s)" in out.stdout


def test_jobs_show_prints_the_output(redis_broker: dramatiq.Broker, epq_handlers: HandlerRegistry) -> None:
    def handler(request: Any) -> dict[str, Any]:
        return {"registered": request.job_id}

    epq_handlers.register("register_job", handler)
    worker = dramatiq.Worker(redis_broker, worker_timeout=50, worker_threads=1)
    worker.start()
    try:
        job_id = epq.QueueService(redis_broker).enqueue_register_job(VALID["register_job"]).job.id
        drain(redis_broker, worker)
    finally:
        worker.stop()
    out = run_epq("jobs", "show", job_id, env=ENV)
    assert out.returncode == 0, out.stderr
    assert 'output     {"registered": "job-1"}' in out.stdout
